"""Compression benchmark: every method's size, perplexity and decode speed against the fp32 source, in one run:
`python launch/bench.py bench=compress`.

Two sources, each compressed with every preset in `bench.presets` (framework/compress/ does the work):
(a) a random-weight Llama of SmolLM2-135M's shape (the serving benchmark's, `conf/bench/serve.yaml: random_model`):
    size and decode tokens/s only, since the perplexity of random weights means nothing;
(b) the tiny model trained on the stdlib shards (`bench.trained.overrides`: trained and exported first unless
    `bench.trained.model_path` names an export): size, Δ perplexity on the shards' evaluation set, greedy
    agreement and decode tokens/s, as `launch/compress.py` reports them (its quality gate included).
Decode tokens/s run through the serving engine on this machine, the same prompts and settings for every folder.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import MISSING, DictConfig

from framework.bench.common import BENCHMARKS, Benchmark, folder_params, random_model, write_figures
from framework.cluster import machine
from framework.config import ConfigError, absolute, compose, typed


@dataclass
class TrainedModelConfig:
    model_path: Optional[str] = MISSING  # an export of the tiny model; null: trained and exported here
    overrides: List[str] = MISSING  # the training job (conf/config.yaml overrides) when model_path is null
    storage_path: str = MISSING  # its run, and its export beside it


@dataclass
class CompressBenchConfig:
    name: str = MISSING
    presets: List[str] = MISSING  # conf/compress/ presets
    random_model: str = MISSING  # the conf/bench/ preset whose random_model and model_dir are the large model
    trained: TrainedModelConfig = field(default_factory=TrainedModelConfig)
    overrides: List[str] = MISSING  # compress.* overrides (conf/compress.yaml) for every folder
    output_dir: str = MISSING  # the compressed folders of the trained model
    output: str = MISSING


def to_bench_config(cfg: DictConfig) -> CompressBenchConfig:
    return typed(CompressBenchConfig, cfg.bench, "bench")


def compress_config(bench: CompressBenchConfig, preset: str, model_path: str, output_dir: str) -> Any:
    from framework.compress.config import to_compress_config

    return to_compress_config(compose([f"compress={preset}", *bench.overrides, f"compress.model_path={model_path}",
                                       f"compress.output_dir={output_dir}"], "compress"))


def check(cfg: DictConfig) -> None:
    """Checks for launch/bench.py before any work: the presets, the compress overrides, the training job."""
    from framework.compress.config import check_values
    from framework.train.config import TRAIN

    bench = to_bench_config(cfg)
    if not bench.presets:
        raise ConfigError("bench.presets=[]: expected at least one conf/compress/ preset")
    for preset in bench.presets:
        try:
            check_values(compress_config(bench, preset, "unused", "unused"))
        except ConfigError as exc:
            raise ConfigError(f"bench.presets={preset}: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - Hydra's composition errors: no such preset, a misspelt override
            raise ConfigError(f"bench.presets={preset} with bench.overrides={bench.overrides}: {type(exc).__name__}: "
                              f"{str(exc).splitlines()[0]}") from None
    random = compose([f"bench={bench.random_model}"], "bench").bench
    if "random_model" not in random or "model_dir" not in random:
        raise ConfigError(f"bench.random_model={bench.random_model}: conf/bench/{bench.random_model}.yaml has no random_model and model_dir")
    if bench.trained.model_path is None:
        try:
            TRAIN.from_overrides(bench.trained.overrides)
        except ConfigError as exc:
            raise ConfigError(f"bench.trained.overrides: {exc}") from None


# ---------------------------------------------------------------------------------------------
# The two sources

def trained_model(bench: CompressBenchConfig) -> str:
    """The trained tiny model's export: `trained.model_path`, or trained and exported here (once; reused after)."""
    from framework.export import EXPORT_MARKER, export_checkpoint
    from framework.train.config import TRAIN
    from framework.bench.train import ensure_shards
    from framework.train.checkpoint import latest_checkpoint
    from framework.train.trainer import train

    if bench.trained.model_path is not None:
        return bench.trained.model_path
    root = absolute(bench.trained.storage_path)
    export = os.path.join(root, "export", "tiny")
    if os.path.isfile(os.path.join(export, EXPORT_MARKER)):
        return export
    import ray

    job = TRAIN.from_overrides([*bench.trained.overrides, "run.name=tiny", f"run.storage_path={root}"])
    ray.init(address="local", include_dashboard=False, logging_level="WARNING")
    try:
        ensure_shards(job)
        train(job)
    finally:
        ray.shutdown()
    return export_checkpoint(latest_checkpoint(os.path.join(root, "tiny")), export)


# ---------------------------------------------------------------------------------------------
# The run

def bench_random(bench: CompressBenchConfig, folder: Path) -> Dict[str, Any]:
    """Size and decode tokens/s of every preset on the random-weight model (no perplexity: no gate either)."""
    from framework.compress.measure import Figures, time_decode, weights_bytes
    from framework.compress.plan import plan_compression
    from framework.compress.job import quantise
    from framework.hf_folder import quiet_progress_bars

    scratch = tempfile.mkdtemp(prefix="bench-compress-")
    figures: Dict[str, Any] = {}
    try:
        source: Optional[Figures] = None
        for preset in bench.presets:
            out = os.path.join(scratch, preset)
            plan = plan_compression(compress_config(bench, preset, str(folder), out), scored=False)
            with quiet_progress_bars():
                if source is None:
                    source = time_decode(folder, plan, Figures(weights_bytes(folder), float("nan"), float("nan"), 0))
                    figures["fp32"] = {"weights_bytes": source.weights_bytes, "tokens_per_s": round(source.tokens_per_s, 2)}
                os.makedirs(out)
                quantise(plan, out)
                compressed = time_decode(Path(out), plan, Figures(weights_bytes(Path(out)), float("nan"), float("nan"), 0))
            figures[preset] = {
                "method": plan.compress.method, "weights_bytes": compressed.weights_bytes,
                "size_ratio": round(compressed.weights_bytes / source.weights_bytes, 3),
                "tokens_per_s": round(compressed.tokens_per_s, 2),
                "tokens_per_s_ratio": round(compressed.tokens_per_s / source.tokens_per_s, 3),
            }
            shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {"path": str(folder), "parameters": folder_params(folder), **figures}


def bench_trained(bench: CompressBenchConfig, model_path: str) -> Dict[str, Any]:
    """Every preset through the whole compression (gate, report, folder) on the trained model."""
    from framework.compress.job import compress
    from framework.compress.plan import plan_compression
    from framework.compress.measure import measure_source

    plans = {p: plan_compression(compress_config(bench, p, model_path, os.path.join(absolute(bench.output_dir), f"tiny-{p}")))
             for p in bench.presets}
    source = measure_source(plans[bench.presets[0]])
    figures: Dict[str, Any] = {"fp32": {"weights_bytes": source.weights_bytes, "perplexity": round(source.perplexity, 4),
                                        "tokens_per_s": round(source.tokens_per_s, 2)}}
    for preset, plan in plans.items():
        r = compress(plan, source)
        figures[preset] = {
            "method": r["method"], "weights_bytes": r["size"]["compressed_bytes"], "size_ratio": round(r["size"]["ratio"], 3),
            "perplexity": round(r["perplexity"]["compressed"], 4), "perplexity_ratio": r["perplexity"]["ratio"],
            "delta_perplexity": round(r["perplexity"]["compressed"] - r["perplexity"]["source"], 4),
            "greedy_identical": f"{r['greedy']['identical']}/{r['greedy']['prompts']}",
            "token_agreement": r["greedy"]["token_agreement"],
            "tokens_per_s": r["decode"]["compressed_tokens_per_s"], "tokens_per_s_ratio": r["decode"]["ratio"],
        }
        rows = r["perplexity"]["rows"]
    return {"path": model_path, "parameters": folder_params(Path(model_path)), "validation_rows": rows, **figures}


def run(cfg: DictConfig) -> Dict[str, Any]:
    """Both sources, every preset; print the table, write `bench.output`; gives the figures."""
    import torch


    bench = to_bench_config(cfg)
    trained = trained_model(bench)  # first: training starts (and stops) its own Ray cluster
    plan_cfg = compress_config(bench, bench.presets[0], "unused", "unused")
    if plan_cfg.torch_threads is not None:
        torch.set_num_threads(plan_cfg.torch_threads)
    result = {
        "machine": machine(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "prompts": plan_cfg.prompts, "max_tokens": plan_cfg.max_tokens,
        "random": bench_random(bench, random_model(bench.random_model)),
        "trained": bench_trained(bench, trained),
        "config": asdict(bench),
    }
    out = write_figures(result, bench.output)
    print(_table(result, bench.presets))
    print(f"written to {out}")
    return result


def _table(r: Dict[str, Any], presets: List[str]) -> str:
    lines = [f"bench compress: {r['machine']}, {r['torch_threads']} torch threads; decode: {r['prompts']} prompts × "
             f"{r['max_tokens']} tokens through the serving engine"]
    for key, label in (("random", "random-weight Llama"), ("trained", "trained tiny model")):
        side = r[key]
        lines.append(f"{label} ({side['parameters'] / 1e6:.2f}M parameters): fp32 {side['fp32']['weights_bytes'] / 1e6:.1f} MB, "
                     f"{side['fp32']['tokens_per_s']} tokens/s" + (f", perplexity {side['fp32']['perplexity']}" if key == "trained" else ""))
        for preset in presets:
            p = side[preset]
            quality = (f", perplexity ×{p['perplexity_ratio']} (Δ {p['delta_perplexity']:+}), greedy {p['greedy_identical']} "
                       f"identical" if key == "trained" else "")
            lines.append(f"  {preset:<13} size ×{p['size_ratio']}, decode tokens/s ×{p['tokens_per_s_ratio']}{quality}")
    return "\n".join(lines)


BENCHMARKS.register("compress")(Benchmark(check, run))
