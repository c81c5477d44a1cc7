"""Training throughput: the framework's tokens/s and MFU per ZeRO stage against a bare PyTorch loop on
the same model, in one run: `python launch/bench.py bench=train` (CPU) or `bench=train-gpu` (llama-125m,
sequence 1024, bf16, one GPU).

For each stage in `bench.stages` the training job (`bench.overrides` + `deepspeed=zero<stage>`) runs
as a fresh Ray Train + DeepSpeed run; its figures come from the run's own metrics.jsonl, over the log
intervals after `bench.warmup_steps` (start-up, compilation and allocator warm-up excluded, as are
evaluation and checkpoint time, which the loop keeps out of its interval timers).

The baseline is the same model, built by the same code, trained by a plain PyTorch loop in one Ray
task holding one Train worker's resources: `torch.optim.AdamW` (fused on GPU), bf16 autocast where the
job trains in bf16, the same micro-batch, accumulation and clipping, on random token batches already
on the device (so it pays for no data loading at all). `ratio` = framework tokens/s ÷ baseline tokens/s
per worker. MFU is 6·N + 12·L·d·T FLOPs per token against the GPU's peak (`framework/model.py`).
If the shards the job names are missing, they are prepared first (`framework/data/prepare.py`).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig

from framework.config import ConfigError, JobConfig, absolute, load_job_config, typed


@dataclass
class TrainBenchConfig:
    name: str = "train"
    stages: List[int] = field(default_factory=lambda: [0, 1, 2, 3])
    # The training job (conf/config.yaml overrides); its run name and storage are the benchmark's.
    overrides: List[str] = field(default_factory=list)
    # Log intervals ending at or before this step are left out of the figures.
    warmup_steps: int = 10
    # Also time the bare PyTorch loop on the same model.
    baseline: bool = True
    # CPUs of the local Ray cluster the benchmark starts; null: all of this machine's.
    num_cpus: Optional[int] = None
    # Runs go here (cleared first); the figures go to `output`.
    storage_path: str = "outputs/bench/train"
    output: str = "outputs/bench/train.json"


def to_bench_config(cfg: DictConfig) -> TrainBenchConfig:
    return typed(TrainBenchConfig, cfg.bench, "bench")


def stage_job(bench: TrainBenchConfig, stage: int) -> JobConfig:
    return load_job_config([
        *bench.overrides, f"deepspeed=zero{stage}", f"run.name=zero{stage}", f"run.storage_path={absolute(bench.storage_path)}",
    ])


def check(cfg: DictConfig) -> None:
    """Checks for launch/bench.py before any work: stages, warm-up, and every stage's training config."""
    bench = to_bench_config(cfg)
    if not bench.stages or any(s not in (0, 1, 2, 3) for s in bench.stages):
        raise ConfigError(f"bench.stages={bench.stages}: expected a non-empty list of ZeRO stages 0-3")
    try:
        job = stage_job(bench, bench.stages[0])
    except ConfigError as exc:
        raise ConfigError(f"bench.overrides: {exc}") from None
    if not 0 <= bench.warmup_steps < job.run.max_steps:
        raise ConfigError(f"bench.warmup_steps={bench.warmup_steps}: expected 0 or more and fewer than run.max_steps={job.run.max_steps}")
    if job.run.log_interval > job.run.max_steps - bench.warmup_steps:
        raise ConfigError(f"bench.warmup_steps={bench.warmup_steps}: leaves no full log interval (run.log_interval={job.run.log_interval})")


def steady_figures(metrics_jsonl: str, warmup_steps: int) -> Dict[str, Optional[float]]:
    """Median tokens/s and MFU, and the peak memory, over the log intervals after `warmup_steps`."""
    with open(metrics_jsonl) as f:
        records = [r for r in map(json.loads, f) if "perf/tokens_per_s" in r and r["step"] > warmup_steps]
    mfu = [r["perf/mfu"] for r in records if "perf/mfu" in r]
    return {
        "tokens_per_s": statistics.median(r["perf/tokens_per_s"] for r in records),
        "mfu": statistics.median(mfu) if mfu else None,
        "peak_mem_gb": max(r["perf/peak_mem_gb"] for r in records),
        "intervals": len(records),
    }


def bare_pytorch_loop(job: JobConfig, model_config: Any, warmup_steps: int) -> Dict[str, Optional[float]]:
    """Tokens/s (and MFU) of a plain PyTorch training loop on one worker's share of the job's batch."""
    import torch

    from framework.model import build_model, flops_per_token, peak_tflops
    from framework.train.loop import build_optimizer
    from framework.train.metrics import peak_memory_gb

    run = job.run
    use_gpu = torch.cuda.is_available() and run.gpus_per_worker > 0
    device = torch.device("cuda" if use_gpu else "cpu")
    precision = run.precision if run.precision != "auto" else ("bf16" if use_gpu else "fp32")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    model = build_model(job.model, model_config, run.seed).to(device).train()
    optimizer = build_optimizer(model, job, fused=use_gpu)
    accumulation = run.global_batch_size // (run.micro_batch_size * run.num_workers)
    seq_len = job.data.seq_len
    tokens_per_step = accumulation * run.micro_batch_size * seq_len  # one worker's share
    generator = torch.Generator().manual_seed(run.seed)
    batches = [torch.randint(0, model_config.vocab_size, (run.micro_batch_size, seq_len), generator=generator).to(device) for _ in range(accumulation)]

    def step() -> None:
        for batch in batches:
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                loss = model(input_ids=batch, labels=batch).loss / accumulation
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), job.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup_steps):
        step()
    if use_gpu:
        torch.cuda.synchronize()
    measured = run.max_steps - warmup_steps
    start = time.perf_counter()
    for _ in range(measured):
        step()
    if use_gpu:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    tokens_per_s = measured * tokens_per_step / elapsed
    peak = peak_tflops(run.peak_tflops) if use_gpu else None
    return {
        "tokens_per_s": tokens_per_s,
        "mfu": flops_per_token(model, seq_len) * tokens_per_s / (peak * 1e12) if peak else None,
        "peak_mem_gb": peak_memory_gb(),
    }


def ensure_shards(job: JobConfig) -> None:
    from framework.data.prepare import run as prepare

    if not os.path.exists(os.path.join(absolute(job.data.output_dir), "manifest.json")):
        prepare(job)


def run(cfg: DictConfig) -> Dict[str, Any]:
    import ray

    from framework.data.shards import read_manifest
    from framework.train.trainer import log_dir, model_config_for, resolve_paths, worker_resources
    from framework.train.trainer import run as train

    bench = to_bench_config(cfg)
    root = absolute(bench.storage_path)
    shutil.rmtree(root, ignore_errors=True)  # a leftover run of the same name would resume, not train
    ray.init(address="local", num_cpus=bench.num_cpus, include_dashboard=False, logging_level="WARNING")
    try:
        first = resolve_paths(stage_job(bench, bench.stages[0]))
        ensure_shards(first)
        stages: Dict[str, Any] = {}
        for stage in bench.stages:
            job = resolve_paths(stage_job(bench, stage))
            train(job)
            stages[f"zero{stage}"] = steady_figures(os.path.join(log_dir(job), "metrics.jsonl"), bench.warmup_steps)
        baseline = None
        if bench.baseline:
            resources = worker_resources(first)
            model_config = model_config_for(first, read_manifest(first.data.output_dir))
            task = ray.remote(bare_pytorch_loop).options(num_cpus=resources["CPU"], num_gpus=resources.get("GPU", 0))
            baseline = ray.get(task.remote(first, model_config, bench.warmup_steps))
    finally:
        ray.shutdown()

    machine = gpu_name() or f"{os.cpu_count()}-core CPU"
    for figures in stages.values():
        per_worker = figures["tokens_per_s"] / first.run.num_workers
        figures["ratio"] = round(per_worker / baseline["tokens_per_s"], 3) if baseline else None
    result = {
        "machine": machine,
        "model": first.model.name,
        "seq_len": first.data.seq_len,
        "precision": first.run.precision,
        "num_workers": first.run.num_workers,
        "global_batch_size": first.run.global_batch_size,
        "micro_batch_size": first.run.micro_batch_size,
        "stages": stages,
        "baseline": baseline,
        "config": asdict(bench),
    }
    os.makedirs(os.path.dirname(absolute(bench.output)), exist_ok=True)
    with open(absolute(bench.output), "w") as f:
        json.dump(result, f, indent=2)
    print_table(result)
    return result


def gpu_name() -> Optional[str]:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def print_table(result: Dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    def pct(value: Optional[float]) -> str:
        return f"{100 * value:.1f}%" if value is not None else "—"

    table = Table(title=f"bench train: {result['model']}, seq {result['seq_len']}, {result['num_workers']} worker(s), {result['machine']}")
    for column in ("run", "tokens/s", "MFU", "peak mem GB", "÷ bare PyTorch per worker"):
        table.add_column(column, justify="right")
    for name, f in result["stages"].items():
        table.add_row(f"framework {name}", f"{f['tokens_per_s']:,.0f}", pct(f["mfu"]), f"{f['peak_mem_gb']:.2f}",
                      f"×{f['ratio']:.2f}" if f["ratio"] is not None else "—")
    if result["baseline"]:
        b = result["baseline"]
        table.add_row("bare PyTorch", f"{b['tokens_per_s']:,.0f}", pct(b["mfu"]), f"{b['peak_mem_gb']:.2f}", "×1.00")
    Console().print(table)
