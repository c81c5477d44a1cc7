"""Training throughput: the framework's tokens/s and MFU per ZeRO stage against the same loop without Ray, in one run:
`python launch/bench.py bench=train` (CPU) or `bench=train-gpu` (llama-125m, sequence 1024, bf16, one GPU).

For each stage in `bench.stages` the training job (`bench.overrides` + `deepspeed=zero<stage>`) runs
twice on identical code: as a Ray Train run (TorchTrainer, Ray's worker and process group, the run's
checkpoints through Ray Train's storage), and as the same per-worker loop on a bare session
(`framework.train.session.LocalSession`: one process, no Ray Train) inside one Ray task holding one
Train worker's resources. Both read their batches through the same data path. Figures come from each
run's own metrics.jsonl, over the log intervals after `bench.warmup_steps` (start-up and allocator
warm-up excluded, as are evaluation and checkpoint time, which the loop keeps out of its interval
timers). `ratio` = Ray Train run tokens/s per worker ÷ bare loop tokens/s: what Ray Train costs.
MFU is 6·N + 12·L·d·T FLOPs per token against the GPU's peak (`framework/model.py`). `perf/data_wait`
is the share of step time a worker waited for its next batch. If the shards the job names are
missing, they are prepared first (`framework/data/prepare.py`).

`bench.comparisons` adds rows of what fine-tuning costs, each compared with the first row of its group:
every row is the training job plus the group's overrides plus its own, trained by the loop on a bare
session (no Ray Train: its cost is the stage rows' subject) under ZeRO-`bench.comparison_stage`. The
CPU preset compares LoRA with full fine-tuning of the same model on the chat shards (SFT), and rows
packed with document boundaries (positions restart, block-diagonal attention masks) with plain packing
of the same text (`data.packing`: the same tokens in the same rows), and preference tuning on tests/data/pairs.jsonl:
SFT on prompt → chosen vs DPO with each reference (a frozen copy; LoRA with its adapters off) vs SimPO (none).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import statistics
from dataclasses import asdict, dataclass, replace
from typing import Any, Dict, Iterator, List, Optional

from omegaconf import MISSING, DictConfig

from framework.bench.common import BENCHMARKS, Benchmark, fresh_storage, write_figures
from framework.cluster import machine
from framework.config import ConfigError, absolute, typed
from framework.train.config import TrainRoot, TRAIN


@dataclass
class ComparisonConfig:
    name: str = MISSING
    # Added to the training job for every row of the comparison (the model, the data).
    overrides: List[str] = MISSING
    # Row name → its own overrides; every row's figures are divided by the first row's.
    rows: Dict[str, List[str]] = MISSING


@dataclass
class TrainBenchConfig:
    name: str = MISSING
    stages: List[int] = MISSING
    # The training job (conf/config.yaml overrides); its run name and storage are the benchmark's.
    overrides: List[str] = MISSING
    # Log intervals ending at or before this step are left out of the figures.
    warmup_steps: int = MISSING
    # Also run the same loop without Ray Train (the baseline of `ratio`).
    baseline: bool = MISSING
    # Rows of what fine-tuning costs (LoRA vs full, document masks vs plain packing), on a bare session.
    comparisons: List[ComparisonConfig] = MISSING
    comparison_stage: int = MISSING
    # CPUs of the local Ray cluster the benchmark starts; null: all of this machine's.
    num_cpus: Optional[int] = MISSING
    # The cost of a checkpoint: the first stage's job with these overrides (frequent checkpoints), on each
    # storage (local: under storage_path; s3: a loopback S3-protocol server) and upload mode.
    checkpoint_overrides: List[str] = MISSING
    checkpoint_storages: List[str] = MISSING
    checkpoint_uploads: List[str] = MISSING
    # Runs go here (cleared first); the figures go to `output`.
    storage_path: str = MISSING
    output: str = MISSING


def to_bench_config(cfg: DictConfig) -> TrainBenchConfig:
    return typed(TrainBenchConfig, cfg.bench, "bench")


def stage_config(bench: TrainBenchConfig, stage: int, name: str, extra: List[str] = ()) -> TrainRoot:
    return TRAIN.from_overrides([*bench.overrides, f"deepspeed=zero{stage}", *extra, f"run.name={name}", f"run.storage_path={absolute(bench.storage_path)}"])


def comparison_configs(bench: TrainBenchConfig) -> Dict[str, Dict[str, TrainRoot]]:
    """Every comparison row's training config, by comparison and row."""
    return {
        c.name: {row: stage_config(bench, bench.comparison_stage, f"{c.name}-{row}", [*c.overrides, *extra]) for row, extra in c.rows.items()}
        for c in bench.comparisons
    }


def check(cfg: DictConfig) -> None:
    """Checks for launch/bench.py before any work: stages, warm-up, and every stage's training config."""
    bench = to_bench_config(cfg)
    if not bench.stages or any(s not in (0, 1, 2, 3) for s in bench.stages):
        raise ConfigError(f"bench.stages={bench.stages}: expected a non-empty list of ZeRO stages 0-3")
    try:
        job = stage_config(bench, bench.stages[0], "check")
    except ConfigError as exc:
        raise ConfigError(f"bench.overrides: {exc}") from None
    if not 0 <= bench.warmup_steps < job.run.max_steps:
        raise ConfigError(f"bench.warmup_steps={bench.warmup_steps}: expected 0 or more and fewer than run.max_steps={job.run.max_steps}")
    if job.run.log_interval > job.run.max_steps - bench.warmup_steps:
        raise ConfigError(f"bench.warmup_steps={bench.warmup_steps}: leaves no full log interval (run.log_interval={job.run.log_interval})")
    if bench.baseline and job.run.num_workers != 1:
        raise ConfigError(f"bench.overrides: run.num_workers={job.run.num_workers}: the bare baseline is one process; benchmark one worker")
    for storage in bench.checkpoint_storages:
        if storage not in ("local", "s3"):
            raise ConfigError(f"bench.checkpoint_storages={bench.checkpoint_storages}: expected local and/or s3")
    for upload in bench.checkpoint_uploads:
        if upload not in ("sync", "async"):
            raise ConfigError(f"bench.checkpoint_uploads={bench.checkpoint_uploads}: expected sync and/or async")
    if bench.comparison_stage not in (0, 1, 2, 3):
        raise ConfigError(f"bench.comparison_stage={bench.comparison_stage}: expected a ZeRO stage 0-3")
    for i, comparison in enumerate(bench.comparisons):
        if not comparison.rows:
            raise ConfigError(f"bench.comparisons.{i}.rows: expected at least one row ({comparison.name})")
        for row, extra in comparison.rows.items():
            try:
                stage_config(bench, bench.comparison_stage, "check", [*comparison.overrides, *extra])
            except ConfigError as exc:
                raise ConfigError(f"bench.comparisons.{i}.rows.{row}: {exc}") from None


def read_metrics(uri: str) -> List[Dict[str, Any]]:
    from framework import storage

    return [json.loads(line) for line in storage.read_text(uri).splitlines()]


def steady_figures(metrics_jsonl: str, warmup_steps: int) -> Dict[str, Optional[float]]:
    """Median tokens/s, MFU and data wait, and the peak memory, over the log intervals after `warmup_steps`."""
    records = [r for r in read_metrics(metrics_jsonl) if "perf/tokens_per_s" in r and r["step"] > warmup_steps]
    mfu = [r["perf/mfu"] for r in records if "perf/mfu" in r]
    return {
        "tokens_per_s": statistics.median(r["perf/tokens_per_s"] for r in records),
        "mfu": statistics.median(mfu) if mfu else None,
        "data_wait": statistics.median(r["perf/data_wait"] for r in records),
        "peak_mem_gb": max(r["perf/peak_mem_gb"] for r in records),
        "intervals": len(records),
    }


def bare_run(cfg: TrainRoot) -> str:
    """The training loop on a bare session in this process (a Ray task); gives its metrics.jsonl."""
    from framework.train.trainer import run_bare

    plan, _ = run_bare(cfg)
    return os.path.join(plan.log_dir, "metrics.jsonl")


def checkpoint_figures(metrics_jsonl: str) -> Dict[str, float]:
    """Median seconds a save blocked training, median seconds per training step, and their ratio."""
    records = read_metrics(metrics_jsonl)
    saves = [r["perf/checkpoint_s"] for r in records if "perf/checkpoint_s" in r]
    steps = [r["perf/step_s"] for r in records if "perf/step_s" in r]
    blocked, step = statistics.median(saves), statistics.median(steps)
    return {"checkpoint_s": blocked, "step_s": step, "steps_per_checkpoint_blocked": blocked / step, "saves": len(saves)}


@contextlib.contextmanager
def loopback_s3(enabled: bool) -> Iterator[Optional[str]]:
    """A bucket on a loopback S3-protocol server (moto), its endpoint and credentials in this process's environment
    (set before Ray starts, so every worker has them); gives the bucket's URI, or None when not `enabled`."""
    if not enabled:
        yield None
        return
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # the server's access log: a line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1").create_bucket(Bucket="bench")
    try:
        yield "s3://bench/runs"
    finally:
        server.stop()
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
def bare_task(resources: Dict[str, float]) -> Any:
    """`bare_run` as a Ray task holding one Train worker's resources, in a process of its own: a peak memory
    figure (the process's peak RSS, or CUDA's peak allocation) must not carry over from an earlier run."""
    import ray

    return ray.remote(num_cpus=resources["CPU"], num_gpus=resources.get("GPU", 0), max_calls=1)(bare_run)


def ensure_shards(cfg: TrainRoot) -> None:
    from framework.data.prepare import prepare_shards

    if not os.path.exists(os.path.join(absolute(cfg.data.output_dir), "manifest.json")):
        prepare_shards(cfg.data, cfg.run.ray_address)


def run(cfg: DictConfig) -> Dict[str, Any]:
    import ray

    from framework.train.plan import log_dir, node_resources, size_workers
    from framework.train.trainer import train

    bench = to_bench_config(cfg)
    root = fresh_storage(bench.storage_path)  # a leftover run of the same name would resume, not train
    stages: Dict[str, Any] = {}
    checkpoints: Dict[str, Any] = {}
    comparisons: Dict[str, Any] = {}
    s3 = contextlib.ExitStack()
    bucket = s3.enter_context(loopback_s3("s3" in bench.checkpoint_storages))
    ray.init(address="local", num_cpus=bench.num_cpus, include_dashboard=False, logging_level="WARNING")
    try:
        first = stage_config(bench, bench.stages[0], "check")
        ensure_shards(first)
        resources = size_workers(first.run, node_resources())
        for stage in bench.stages:
            job = stage_config(bench, stage, f"zero{stage}")
            train(job)
            figures = {"framework": steady_figures(log_dir(job) + "/metrics.jsonl", bench.warmup_steps)}
            if bench.baseline:
                bare = replace(job, run=replace(job.run, name=f"bare-zero{stage}"))
                task = bare_task(resources)
                figures["bare"] = steady_figures(ray.get(task.remote(bare)), bench.warmup_steps)
                figures["ratio"] = round(figures["framework"]["tokens_per_s"] / figures["bare"]["tokens_per_s"], 3)
            stages[f"zero{stage}"] = figures
        for place in bench.checkpoint_storages:
            for upload in bench.checkpoint_uploads:
                name = f"checkpoint-{place}-{upload}"
                where = bucket if place == "s3" else root
                job = TRAIN.from_overrides([*bench.overrides, *bench.checkpoint_overrides, f"deepspeed=zero{bench.stages[0]}",
                                   f"run.name={name}", f"run.storage_path={where}", f"run.checkpoint_upload={upload}"])
                train(job)
                checkpoints[f"{place} {upload}"] = checkpoint_figures(log_dir(job) + "/metrics.jsonl")
        for name, rows in comparison_configs(bench).items():
            comparisons[name] = compare(rows, resources, bench.warmup_steps)
    finally:
        ray.shutdown()
        s3.close()

    result = {
        "machine": machine(),
        "model": first.model.name,
        "seq_len": first.data.seq_len,
        "precision": first.run.precision,
        "global_batch_size": first.run.global_batch_size,
        "micro_batch_size": first.run.micro_batch_size,
        "stages": stages,
        "checkpoints": checkpoints,
        "comparisons": comparisons,
        "comparison_stage": bench.comparison_stage,
        "config": asdict(bench),
    }
    write_figures(result, bench.output)
    print_table(result)
    return result


def compare(rows: Dict[str, TrainRoot], resources: Dict[str, float], warmup_steps: int) -> Dict[str, Any]:
    """Each row trained by the loop on a bare session (in a Ray task of one worker's resources), its figures,
    its model's trainable parameters, and its ratios to the first row."""
    import ray

    from framework.train.plan import make_plan

    out: Dict[str, Any] = {}
    for row, job in rows.items():
        ensure_shards(job)
        figures = steady_figures(ray.get(bare_task(resources).remote(job)), warmup_steps)
        figures["trainable_params"], figures["params"] = model_params(make_plan(job))
        figures["model"], figures["data"], figures["packing"] = job.model.name, job.data.name, job.data.packing
        out[row] = figures
    first = next(iter(out.values()))
    for figures in out.values():
        figures["tokens_per_s_ratio"] = round(figures["tokens_per_s"] / first["tokens_per_s"], 3)
        figures["peak_mem_ratio"] = round(figures["peak_mem_gb"] / first["peak_mem_gb"], 3)
    return out


def model_params(plan: Any) -> tuple:
    """(trainable, all) parameters of the plan's model, built on the meta device (no memory, no weights read)."""
    import torch
    from transformers import AutoModelForCausalLM

    from framework.model import trainable_params, with_lora

    with torch.device("meta"):
        net = AutoModelForCausalLM.from_config(plan.model_config)
        if plan.config.model.lora is not None:
            net = with_lora(net, plan.config.model.lora)
    return trainable_params(net)


def print_table(result: Dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    def pct(value: Optional[float]) -> str:
        return f"{100 * value:.1f}%" if value is not None else "—"

    table = Table(title=f"bench train: {result['model']}, seq {result['seq_len']}, one worker, {result['machine']}")
    for column in ("run", "tokens/s", "MFU", "data wait", "peak mem GB", "Ray Train ÷ bare loop"):
        table.add_column(column, justify="right")
    for name, stage in result["stages"].items():
        for side in ("framework", "bare"):
            if side in stage:
                f = stage[side]
                ratio = f"×{stage['ratio']:.2f}" if side == "framework" and "ratio" in stage else ""
                label = f"{name} Ray Train" if side == "framework" else f"{name} bare loop"
                table.add_row(label, f"{f['tokens_per_s']:,.0f}", pct(f["mfu"]), pct(f["data_wait"]), f"{f['peak_mem_gb']:.2f}", ratio)
    Console().print(table)
    if result["checkpoints"]:
        saves = Table(title="the cost of a checkpoint: time a save blocks training")
        for column in ("storage, upload", "blocked s", "step s", "steps' worth"):
            saves.add_column(column, justify="right")
        for name, f in result["checkpoints"].items():
            saves.add_row(name, f"{f['checkpoint_s']:.3f}", f"{f['step_s']:.3f}", f"{f['steps_per_checkpoint_blocked']:.1f}")
        Console().print(saves)
    for name, rows in result.get("comparisons", {}).items():
        first = next(iter(rows.values()))
        table = Table(title=f"bench train: {name}: {first['model']} on {first['data']}, bare loop, ZeRO-{result['comparison_stage']}, {result['machine']}")
        for column in ("row", "trains", "tokens/s", "peak mem GB"):
            table.add_column(column, justify="right")
        for row, f in rows.items():
            share = f"{f['trainable_params']:,} ({f['trainable_params'] / f['params']:.1%})"
            table.add_row(row, share, f"{f['tokens_per_s']:,.0f} (×{f['tokens_per_s_ratio']:.2f})", f"{f['peak_mem_gb']:.2f} (×{f['peak_mem_ratio']:.2f})")
        Console().print(table)


BENCHMARKS.register("train")(Benchmark(check, run))
