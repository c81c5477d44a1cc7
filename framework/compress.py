"""Hugging Face folder → quantised Hugging Face folder, with its report: the cost in quality, the gain in size and speed.

    python launch/compress.py compress.model_path=outputs/export/dev1 compress=int8 compress.output_dir=outputs/compressed/dev1-int8

torchao does the work, through transformers' `TorchAoConfig`: the source folder is loaded with that
quantization_config, which gives every `torch.nn.Linear` but the output embedding a torchao weight
(int8 values and their scales), and `save_pretrained` writes it as safetensors (torchao's tensors
flattened into plain ones, described in the file's metadata; no pickle). The folder then loads with
`AutoModelForCausalLM.from_pretrained` as any other and is served unchanged by launch/serve.py.

Methods (`compress.method`; one preset each in conf/compress/):
    int8_weight_only  int8 weights, one scale per output row (or per `compress.group_size` inputs);
                      activations stay in compress.dtype
    int8_dynamic      int8 weights per row, and every activation quantised to int8 per token as it runs
    int4_weight_only  int4 weights per `compress.group_size` inputs: torchao 0.18's only int4 kernel for
                      a CUDA or CPU build of torch is CUDA's (tinygemm, bf16), so it needs compress.device=cuda

The report (`compress_report.json` in the folder, and a table printed) puts the folder beside its source:
the weights' size on disk; validation perplexity on the prepared shards' evaluation set (the one training
reports: framework/evaluate.py); greedy agreement on a fixed prompt set; decode tokens/s through the serving
engine (framework/serve/engine.py: the same prompts, batching and threads for both). A method whose
perplexity rises past `compress.max_ppl_increase` (a ratio) fails in one line naming the figures.

The folder follows export's rules (framework/export.py): written beside `output_dir`, moved into place only
once it has passed the gate; an existing output_dir is replaced only when it holds an earlier compression
(its compress_report.json, which is this stage's marker), so nothing of the user's is ever deleted.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from omegaconf import MISSING, DictConfig

from framework.config import ConfigError, RunError, absolute, register, require, typed
from framework.model import DTYPES, PROBE_TEXT

# What a compression writes into its folder: where the folder came from and what it costs; an output_dir
# holding it may be replaced by a new compression, one without it is not ours to delete.
COMPRESS_MARKER = "compress_report.json"
DEVICES = ("cpu", "cuda")


class CompressError(RunError):
    """The compressed model is not good enough to keep (its perplexity past the bound), or quantised nothing."""


@dataclass(frozen=True)
class Method:
    """A torchao quantisation: its config, and what it needs of the machine and the model's layers."""

    build: Callable[[Optional[int]], Any]  # group_size → the torchao config
    devices: Tuple[str, ...]
    dtypes: Tuple[str, ...]
    group_sizes: Optional[Tuple[int, ...]]  # None: compress.group_size must be null; () any size dividing the inputs


def _int8_weight_only(group_size: Optional[int]) -> Any:
    from torchao.quantization import Int8WeightOnlyConfig, PerGroup, PerRow

    # set_inductor_config=False: nothing here compiles, and loading the folder should not retune the inductor.
    return Int8WeightOnlyConfig(granularity=PerGroup(group_size) if group_size else PerRow(), set_inductor_config=False)


def _int8_dynamic(group_size: Optional[int]) -> Any:
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig

    return Int8DynamicActivationInt8WeightConfig(set_inductor_config=False)


def _int4_weight_only(group_size: Optional[int]) -> Any:
    from torchao.quantization import Int4WeightOnlyConfig

    return Int4WeightOnlyConfig(group_size=group_size, int4_packing_format="tile_packed_to_4d", set_inductor_config=False)


METHODS: Dict[str, Method] = {
    "int8_weight_only": Method(_int8_weight_only, DEVICES, tuple(DTYPES), ()),
    "int8_dynamic": Method(_int8_dynamic, DEVICES, tuple(DTYPES), None),
    # torchao's tinygemm layout: bf16 activations, groups of 32-256 inputs, CUDA only (its CPU variant is not in 0.18).
    "int4_weight_only": Method(_int4_weight_only, ("cuda",), ("bf16",), (32, 64, 128, 256)),
}


@dataclass
class CompressConfig:
    """The `compress.*` keys: types here, values in conf/compress.yaml and the method presets of conf/compress/."""

    name: str = MISSING  # the preset's name: the default output folder ends with it
    # An exported Hugging Face folder, or a sweep's best.json naming one.
    model_path: str = MISSING
    # The folder to write (replaced only if it holds an earlier compression); null: outputs/compressed/<source>-<name>.
    output_dir: Optional[str] = MISSING
    method: str = MISSING  # int8_weight_only | int8_dynamic | int4_weight_only
    group_size: Optional[int] = MISSING  # inputs per scale; null: one scale per output row
    dtype: str = MISSING  # fp32 | bf16 | fp16: what stays unquantised, and the activations
    device: str = MISSING  # cpu | cuda: where quantising, evaluating and timing run
    # The quality gate: compressed ÷ source validation perplexity may not exceed this.
    max_ppl_increase: float = MISSING
    # Prepared shards to score on; null: those the source was trained on (its export.json's checkpoint says).
    data_dir: Optional[str] = MISSING
    eval_rows: Optional[int] = MISSING  # validation rows, drawn with the shards' seed as training draws them; null: all
    micro_batch: int = MISSING
    # The fixed prompt set: greedy agreement with the source, and decode tokens/s through the serving engine.
    prompts: int = MISSING
    max_tokens: int = MISSING
    torch_threads: Optional[int] = MISSING  # null: torch's default
    serve_preset: str = MISSING  # conf/serve/<preset>: the engine's batching and KV cache for the timing


@dataclass
class CompressJobConfig:
    compress: CompressConfig = field(default_factory=CompressConfig)


# Registered on import (`conf/compress.yaml` names it) so that `compose(..., "compress")` finds it from any entry point.
register("compress_schema", CompressJobConfig)


@dataclass
class Plan:
    """Everything a compression needs, checked before any weights are read."""

    compress: CompressConfig
    source: Path
    output_dir: str
    data_dir: Optional[str]  # None only for a benchmark's random-weight model, whose perplexity means nothing
    batching: Any  # framework.serve.engine.Batching
    linear_layers: int  # the layers torchao will quantise


# ---------------------------------------------------------------------------------------------
# Config: typing and every check that needs no weights

def to_compress_config(cfg: DictConfig | Dict[str, Any]) -> CompressConfig:
    """Type the `compress` node of a composed config as CompressConfig."""
    return typed(CompressConfig, cfg["compress"] if "compress" in cfg else cfg, "compress", example="outputs/export/RUN")


def check_values(c: CompressConfig) -> None:
    """Ranges, and what this machine can run."""
    require(c.method in METHODS, "compress.method", c.method, f"expected one of {tuple(METHODS)}")
    require(c.dtype in DTYPES, "compress.dtype", c.dtype, f"expected one of {tuple(DTYPES)}")
    require(c.device in DEVICES, "compress.device", c.device, f"expected one of {DEVICES}")
    method, cuda = METHODS[c.method], torch.cuda.is_available()
    require("cpu" in method.devices or cuda, "compress.method", c.method,
            f"torchao {_torchao_version()} runs it on CUDA only, and this machine has no CUDA device (compress=int8 runs on CPU)")
    require(c.device != "cuda" or cuda, "compress.device", c.device, "no CUDA device on this machine; use compress.device=cpu")
    require(c.device in method.devices, "compress.device", c.device, f"{c.method} runs on {' or '.join(method.devices)} only")
    require(c.device == "cuda" or c.dtype == "fp32", "compress.dtype", c.dtype,
            "half precision needs a GPU (compress.device=cuda); use fp32 on CPU")
    require(c.dtype in method.dtypes, "compress.dtype", c.dtype, f"{c.method} runs in {' or '.join(method.dtypes)} only")
    if method.group_sizes is None:
        require(c.group_size is None, "compress.group_size", c.group_size, f"expected null: {c.method} scales per row")
    elif method.group_sizes:
        require(c.group_size in method.group_sizes, "compress.group_size", c.group_size,
                f"{c.method} takes groups of {', '.join(map(str, method.group_sizes))} inputs")
    else:
        require(c.group_size is None or c.group_size >= 1, "compress.group_size", c.group_size, "expected at least 1, or null (per row)")
    require(c.max_ppl_increase > 0, "compress.max_ppl_increase", c.max_ppl_increase,
            "expected a positive ratio (1.05 lets perplexity rise by 5%)")
    require(c.eval_rows is None or c.eval_rows >= 1, "compress.eval_rows", c.eval_rows, "expected at least 1, or null (every row)")
    for key in ("micro_batch", "prompts", "max_tokens"):
        require(getattr(c, key) >= 1, f"compress.{key}", getattr(c, key), "expected at least 1")
    require(c.torch_threads is None or c.torch_threads >= 1, "compress.torch_threads", c.torch_threads, "expected at least 1, or null")


def quantisable_layers(source: Path) -> List[Tuple[str, int]]:
    """(name, input features) of every layer torchao would quantise: the model's `torch.nn.Linear` modules but its
    output embedding (transformers keeps that in full precision), found on the meta device (no weights read)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(source, local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    output = model.get_output_embeddings()
    return [(name, m.in_features) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not output]


def check_layers(c: CompressConfig, source: Path) -> int:
    """The method must find layers it can take in the source's architecture; gives their number."""
    layers = quantisable_layers(source)
    require(bool(layers), "compress.method", c.method,
            f"{source} ({_architecture(source)}) has no torch.nn.Linear layers for torchao to quantise (GPT-2's blocks, say, "
            f"are transformers' Conv1D)")
    for name, inputs in layers if c.group_size is not None else []:
        require(inputs % c.group_size == 0, "compress.group_size", c.group_size,
                f"does not divide the {inputs} inputs of {name} in {source}")
    return len(layers)


def _architecture(source: Path) -> str:
    config = json.loads((source / "config.json").read_text())
    return ", ".join(config.get("architectures") or [config.get("model_type", "unknown")])


def default_output_dir(model_path: str, name: str) -> str:
    """outputs/compressed/<the source folder's name (a best.json: its sweep's)>-<preset name>."""
    from framework.serve.folder import default_model_id

    return os.path.join("outputs", "compressed", f"{default_model_id(model_path)}-{name}")


def training_shards(source: Path) -> Optional[str]:
    """The shards the source was trained on, when its export.json names a checkpoint that is still there; else None."""
    from framework import storage
    from framework.data.shards import MANIFEST, fingerprint
    from framework.export import EXPORT_MARKER
    from framework.train import checkpoint as ckpt

    try:
        checkpoint = json.loads((source / EXPORT_MARKER).read_text())["checkpoint"]
        data_dir = ckpt.read_config(checkpoint).data.output_dir
        trained_on = ckpt.read_state(checkpoint).data_fingerprint
        manifest = storage.read_json(storage.join(data_dir, MANIFEST))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    # The same path re-prepared with other data (or another tokenizer) is not what the model trained on.
    return data_dir if not trained_on or fingerprint(manifest) == trained_on else None


def check_data_dir(c: CompressConfig, source: Path) -> str:
    """The prepared shards perplexity is measured on: there, and tokenised as the source model tokenises."""
    from transformers import AutoTokenizer

    from framework import storage
    from framework.data.shards import MANIFEST, TOKENIZER_DIR

    key = "compress.data_dir"
    data_dir = c.data_dir
    if data_dir is None:
        data_dir = training_shards(source)
        require(data_dir is not None, key, None,
                f"{source} does not lead to the shards it was trained on (no export.json naming a checkpoint that is "
                f"still there, with its shards unchanged); name the prepared shards to score on, e.g. {key}=data/stdlib")
    data_dir = absolute(data_dir)
    require(storage.exists(storage.join(data_dir, MANIFEST)), key, data_dir, f"no {MANIFEST} there; run `python launch/prep.py` first")
    shards = AutoTokenizer.from_pretrained(storage.join(data_dir, TOKENIZER_DIR), local_files_only=True)
    model = AutoTokenizer.from_pretrained(source, local_files_only=True)
    require(shards(PROBE_TEXT)["input_ids"] == model(PROBE_TEXT)["input_ids"], key, data_dir,
            f"these shards were tokenised with another tokenizer than {source}'s: its perplexity on them means nothing")
    return data_dir


def make_plan(c: CompressConfig, scored: bool = True) -> Plan:
    """Check everything a compression can check before reading weights; raises ConfigError naming the first bad key.

    `scored=False` (a benchmark's random-weight model) leaves out the shards and so the perplexity."""
    from framework.export import check_output_dir
    from framework.serve.config import compose_serve_config
    from framework.serve.engine import Batching
    from framework.serve.folder import TORCHAO, check_model_folder, resolve_model_path

    check_values(c)
    key = "compress.model_path"
    source = resolve_model_path(c.model_path, key)
    check_model_folder(source, key)
    quantised = json.loads((source / "config.json").read_text()).get("quantization_config")
    require(quantised is None, key, c.model_path,
            f"is quantised already ({(quantised or {}).get('quant_method', TORCHAO)}); compress its full-precision source")
    layers = check_layers(c, source)
    output_dir = c.output_dir or default_output_dir(c.model_path, c.name)
    check_output_dir(output_dir, str(source), "compress.output_dir", COMPRESS_MARKER, "compression", "the source folder")
    data_dir = check_data_dir(c, source) if scored else None
    try:
        serve = compose_serve_config({"preset": c.serve_preset, "model_path": str(source)})
    except ConfigError as exc:
        raise ConfigError(f"compress.serve_preset={c.serve_preset}: {exc}") from None
    batching = Batching(serve.max_sequences, serve.max_batch_tokens, serve.kv_cache_blocks, serve.kv_block_size)
    return Plan(c, source, os.path.abspath(output_dir), data_dir, batching, layers)


def check_compress(cfg: DictConfig) -> None:
    """The check for `launch/compress.py`: schema, values, the machine, the source, the shards (no weights read)."""
    make_plan(to_compress_config(cfg))


# ---------------------------------------------------------------------------------------------
# Measuring a folder: size, perplexity, greedy decoding through the serving engine

@dataclass
class Figures:
    """One folder's figures, the source's or a compressed one's (`tokens` empty until its decoding is timed)."""

    weights_bytes: int
    loss: float
    perplexity: float
    rows: int  # validation rows scored
    tokens: List[List[int]] = field(default_factory=list)  # each prompt's greedy continuation
    decode_seconds: float = math.nan

    @property
    def tokens_per_s(self) -> float:
        return sum(len(t) for t in self.tokens) / self.decode_seconds


def weights_bytes(folder: Path) -> int:
    """Bytes of the folder's weights on disk (its safetensors files)."""
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def score(folder: Path, plan: Plan) -> Figures:
    """The folder's size and its validation loss and perplexity on the plan's shards (framework/evaluate.py)."""
    from framework.data.sampler import evaluation_rows
    from framework.data.shards import read_manifest
    from framework.evaluate import evaluate_folder

    c = plan.compress
    manifest = read_manifest(plan.data_dir)
    rows = len(evaluation_rows(manifest["splits"]["validation"]["rows"], c.eval_rows, manifest["seed"]))
    scored = evaluate_folder(str(folder), plan.data_dir, c.eval_rows, c.micro_batch, c.device, DTYPES[c.dtype])
    return Figures(weights_bytes(folder), scored["val/loss"], scored["val/perplexity"], rows)


def fixed_prompts(count: int) -> List[str]:
    """The prompt set: `count` runs of consecutive stdlib source lines (the serving benchmark's)."""
    from framework.serve.bench import bench_prompts

    return bench_prompts(count)


def greedy_params(engine: Any, max_tokens: int) -> Any:
    """Greedy decoding of exactly `max_tokens` tokens (end of sequence suppressed), each token's id kept (logprobs=0)."""
    from framework.serve.sampling import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, top_p=1.0, logprobs=0,
                          logit_bias={eos: -100.0 for eos in engine.eos_ids})


async def _greedy(engine: Any, prompts: List[List[int]], max_tokens: int) -> Tuple[List[List[int]], float]:
    """Every prompt decoded at once through the engine; the continuations and the seconds from submitting them to the last token."""
    from framework.serve.engine import Sequence

    async def one(ids: List[int], tokens: int) -> List[int]:
        out: List[int] = []
        async for deltas in engine.generate([Sequence(ids, greedy_params(engine, tokens))]):
            for delta in deltas:
                out.extend(lp.token for lp in delta.logprobs)
        return out

    await one(prompts[0], 2)  # warm-up: the first step pays for lazy initialisation
    start = time.perf_counter()
    tokens = await asyncio.gather(*(one(ids, max_tokens) for ids in prompts))
    return list(tokens), time.perf_counter() - start


def time_decode(folder: Path, plan: Plan, figures: Figures) -> Figures:
    """Fill `figures` with the fixed prompts' greedy continuations through the serving engine on `folder`, and their time."""
    from framework.serve.engine import load_engine

    c = plan.compress
    # The engine's start-up notes (paged cache sizes, no flash attention on CPU) say nothing about the figures.
    logging.getLogger("ContinuousBatchingLogger").setLevel(logging.WARNING)
    engine = load_engine(folder, plan.batching, c.dtype, c.device)
    try:
        prompts = [engine.prompts.encode(p) for p in fixed_prompts(c.prompts)]
        figures.tokens, figures.decode_seconds = asyncio.run(_greedy(engine, prompts, c.max_tokens))
    finally:
        engine.shutdown()
    return figures


def measure_source(plan: Plan) -> Figures:
    """The source folder's figures, to compare every compression of it with (a benchmark measures them once)."""
    from framework.export import _quiet_progress_bars

    _set_threads(plan)
    with _quiet_progress_bars():
        return time_decode(plan.source, plan, score(plan.source, plan))


def _set_threads(plan: Plan) -> None:
    if plan.compress.torch_threads is not None:
        torch.set_num_threads(plan.compress.torch_threads)


def agreement(source: List[List[int]], compressed: List[List[int]]) -> Dict[str, Any]:
    """How far the compressed model's greedy continuations follow the source's: prompts continued identically, and
    the mean share of each source continuation reproduced before the first token that differs."""
    shares = []
    for a, b in zip(source, compressed):
        same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        shares.append(same / max(len(a), 1))
    return {"prompts": len(source), "identical": sum(a == b for a, b in zip(source, compressed)),
            "token_agreement": round(sum(shares) / max(len(shares), 1), 4)}


def machine() -> str:
    """This machine in words, for figures that depend on it: the CPU model and count, and the GPU if any."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{cpu}, {os.cpu_count()} CPUs{gpu}"


# ---------------------------------------------------------------------------------------------
# The compression

def quantise(plan: Plan, staged: str) -> int:
    """Load the source with the method's TorchAoConfig, save it (and its tokenizer) to `staged`; gives how many
    weights came out quantised."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, TorchAoConfig

    from safetensors import safe_open

    from framework.serve.folder import quantised_tensors

    c = plan.compress
    config = TorchAoConfig(METHODS[c.method].build(c.group_size))
    model = AutoModelForCausalLM.from_pretrained(plan.source, local_files_only=True, dtype=DTYPES[c.dtype],
                                                 device_map=c.device, quantization_config=config)
    model.save_pretrained(staged)
    del model
    AutoTokenizer.from_pretrained(plan.source, local_files_only=True).save_pretrained(staged)
    count = 0
    for file in Path(staged).glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as handle:
            count += quantised_tensors(handle.metadata())
    if count == 0:
        raise CompressError(f"compress.method={c.method}: torchao quantised none of the {plan.linear_layers} linear layers of {plan.source}")
    return count


def report(plan: Plan, source: Figures, compressed: Figures, quantised: int) -> Dict[str, Any]:
    """compress_report.json: where the folder came from, how it was made, and its figures beside the source's."""
    from framework.export import EXPORT_MARKER

    c = plan.compress
    exported = plan.source / EXPORT_MARKER
    return {
        "source": str(plan.source),
        "source_export": json.loads(exported.read_text()) if exported.is_file() else None,
        "preset": c.name, "method": c.method, "group_size": c.group_size, "dtype": c.dtype, "device": c.device,
        "torchao": _torchao_version(), "quantised_layers": quantised, "linear_layers": plan.linear_layers,
        "size": {"source_bytes": source.weights_bytes, "compressed_bytes": compressed.weights_bytes,
                 "ratio": round(compressed.weights_bytes / source.weights_bytes, 4)},
        "perplexity": {"data_dir": plan.data_dir, "rows": compressed.rows, "source": source.perplexity,
                       "compressed": compressed.perplexity, "ratio": round(compressed.perplexity / source.perplexity, 5),
                       "max_ratio": c.max_ppl_increase, "source_loss": source.loss, "compressed_loss": compressed.loss},
        "greedy": {**agreement(source.tokens, compressed.tokens), "max_tokens": c.max_tokens},
        "decode": {"prompts": c.prompts, "max_tokens": c.max_tokens, "torch_threads": torch.get_num_threads(),
                   "source_tokens_per_s": round(source.tokens_per_s, 2), "compressed_tokens_per_s": round(compressed.tokens_per_s, 2),
                   "ratio": round(compressed.tokens_per_s / source.tokens_per_s, 3), "machine": machine()},
    }


def gate(plan: Plan, source: Figures, compressed: Figures) -> None:
    """Raise CompressError (one line naming the figures) when perplexity rose past compress.max_ppl_increase."""
    c = plan.compress
    ratio = compressed.perplexity / source.perplexity
    if not ratio <= c.max_ppl_increase:  # also catches NaN
        raise CompressError(
            f"compress.max_ppl_increase={c.max_ppl_increase}: {c.name} ({c.method}) takes validation perplexity from "
            f"{source.perplexity:.4f} to {compressed.perplexity:.4f} (×{ratio:.5f}, past the bound) on {compressed.rows} "
            f"rows of {plan.data_dir}; nothing written to {plan.output_dir}"
        )


def compress(plan: Plan, source: Optional[Figures] = None) -> Dict[str, Any]:
    """Write the compressed folder the plan describes, once it passes the quality gate; gives its report.

    `source` (the source folder's figures, from `measure_source`, for a caller that compresses one folder several
    ways) is measured here when left out. Raises CompressError and leaves output_dir untouched when the gate fails.
    """
    from framework.export import _quiet_progress_bars, _replace_dir, _share_permissions

    _set_threads(plan)
    parent = os.path.dirname(plan.output_dir)
    os.makedirs(parent, exist_ok=True)
    # Written beside the target (same filesystem, so the final move is a rename) and moved only once it passes.
    staged = tempfile.mkdtemp(prefix=f".{os.path.basename(plan.output_dir)}.partial-", dir=parent)
    try:
        with _quiet_progress_bars():
            quantised = quantise(plan, staged)
            compressed = score(Path(staged), plan)  # loaded back with from_pretrained, as a user would
            if source is None:
                source = score(plan.source, plan)
            gate(plan, source, compressed)  # before any timing: a model that is not kept is not worth timing
            if not source.tokens:
                time_decode(plan.source, plan, source)
            time_decode(Path(staged), plan, compressed)
        result = report(plan, source, compressed, quantised)
        with open(os.path.join(staged, COMPRESS_MARKER), "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
        _share_permissions(staged)
        _replace_dir(staged, plan.output_dir)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    print(table(result, plan.output_dir), flush=True)
    return result


def table(r: Dict[str, Any], output_dir: str) -> str:
    """The report as a few printed lines."""
    size, ppl, greedy, dec = r["size"], r["perplexity"], r["greedy"], r["decode"]
    mb = 1e6
    rows = [
        ("", "source", r["preset"], "ratio"),
        ("weights on disk (MB)", f"{size['source_bytes'] / mb:.2f}", f"{size['compressed_bytes'] / mb:.2f}", f"{size['ratio']:.3f}"),
        (f"val perplexity ({ppl['rows']} rows)", f"{ppl['source']:.4f}", f"{ppl['compressed']:.4f}", f"{ppl['ratio']:.5f}"),
        (f"decode tokens/s ({dec['prompts']}×{dec['max_tokens']})", f"{dec['source_tokens_per_s']:.1f}",
         f"{dec['compressed_tokens_per_s']:.1f}", f"{dec['ratio']:.3f}"),
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [f"compress: {r['source']} → {output_dir}: {r['method']}, {r['quantised_layers']} of {r['linear_layers']} "
             f"linear layers quantised (torchao {r['torchao']}, {r['dtype']} on {r['device']})"]
    lines += ["  " + "  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))) for row in rows]
    lines.append(f"  greedy agreement: {greedy['identical']}/{greedy['prompts']} prompts identical, "
                 f"{greedy['token_agreement']:.1%} of the source's tokens before the first difference "
                 f"(perplexity bound ×{ppl['max_ratio']}; {dec['torch_threads']} torch threads on {dec['machine']})")
    return "\n".join(lines)


def _torchao_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torchao")
    except PackageNotFoundError:
        return "(not installed)"


def run(cfg: DictConfig) -> Dict[str, Any]:
    """Compress the folder `compress.model_path` names into `compress.output_dir`; gives the report."""
    return compress(make_plan(to_compress_config(cfg)))


__all__ = ["COMPRESS_MARKER", "CompressConfig", "CompressError", "METHODS", "check_compress", "compress", "make_plan", "run"]
