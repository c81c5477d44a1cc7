"""The data path alone: what one worker's reads deliver, against a bare pyarrow read of the same shards, in one run:
`python launch/bench.py bench=data`.

All sides run in one Ray task holding `bench.cpus` CPUs, with pyarrow's and torch's thread pools set
to that many threads, so "one worker holding one CPU" is what is measured:

    pyarrow     `pq.read_table` of every train shard and the tokens as int64 arrays: the ceiling (the
                second of two passes, so that both sides read from a warm page cache)
    framework   TrainBatches (framework/data/stream.py): one epoch of `global_batch_size`-row steps in
                the sample order (framework/data/sampler.py), the tensors the model would get; every
                row group is decoded once, as in the pyarrow pass
    ray_data    Ray Data's `read_parquet(...).iter_torch_batches` over the same shards (the path the
                framework used before), one pass

`headroom` = framework tokens/s ÷ what one GPU worker eats (`bench.consumer`: llama-125m at 45% MFU on
an H100 ≈ 0.5-0.6M tokens/s). `resume_s` is the time to the first batch after resuming at the start
and near the end of an epoch (their ratio ≈ 1: a resume reads nothing before its position).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List

from omegaconf import MISSING, DictConfig

from framework.bench.common import BENCHMARKS, Benchmark, write_figures
from framework.cluster import machine
from framework.config import ConfigError, absolute, typed


@dataclass
class ConsumerConfig:
    model: str = MISSING
    seq_len: int = MISSING
    mfu: float = MISSING
    peak_tflops: float = MISSING


@dataclass
class DataBenchConfig:
    name: str = MISSING
    data_overrides: List[str] = MISSING
    global_batch_size: int = MISSING
    cpus: int = MISSING
    shuffle_window: int = MISSING
    prefetch_steps: int = MISSING
    ray_data: bool = MISSING
    consumer: ConsumerConfig = field(default_factory=ConsumerConfig)
    output: str = MISSING


def to_bench_config(cfg: DictConfig) -> DataBenchConfig:
    return typed(DataBenchConfig, cfg.bench, "bench")


def check(cfg: DictConfig) -> None:
    from framework.train.config import TRAIN

    bench = to_bench_config(cfg)
    for key in ("global_batch_size", "cpus", "shuffle_window", "prefetch_steps"):
        if getattr(bench, key) < 1:
            raise ConfigError(f"bench.{key}={getattr(bench, key)}: expected at least 1")
    try:
        TRAIN.from_overrides(bench.data_overrides)
    except ConfigError as exc:
        raise ConfigError(f"bench.data_overrides: {exc}") from None


def consumer_tokens_per_s(consumer: ConsumerConfig, vocab_size: int) -> float:
    """Tokens/s one GPU worker trains `consumer.model` (with the shards' vocabulary) at `consumer.mfu` of `consumer.peak_tflops`."""
    import torch
    from transformers import AutoModelForCausalLM

    from framework.model import flops_per_token, hf_config
    from framework.train.config import TRAIN

    model = TRAIN.from_overrides([f"model={consumer.model}"]).model
    config = hf_config(model, vocab_size, {})
    with torch.device("meta"):
        net = AutoModelForCausalLM.from_config(config)
    return consumer.mfu * consumer.peak_tflops * 1e12 / flops_per_token(net, consumer.seq_len)


def measure(data_dir: str, manifest: Dict[str, Any], bench: DataBenchConfig) -> Dict[str, Any]:
    """Every figure, in this process (a Ray task of `bench.cpus` CPUs)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from framework.data.sampler import SampleOrder
    from framework.data.shards import COLUMN, shard_uris
    from framework.data.stream import ShardReader, TrainBatches, split_blocks

    pa.set_cpu_count(bench.cpus)
    pa.set_io_thread_count(bench.cpus)
    torch.set_num_threads(bench.cpus)
    seq_len, uris = manifest["seq_len"], shard_uris(data_dir, manifest, "train")
    figures: Dict[str, Any] = {}

    for _ in range(2):
        start = time.perf_counter()
        tokens = 0
        for uri in uris:
            column = pq.read_table(uri, columns=[COLUMN]).column(COLUMN).combine_chunks()
            tokens += column.flatten().to_numpy(zero_copy_only=False).astype(np.int64).size
        figures["pyarrow_tokens_per_s"] = tokens / (time.perf_counter() - start)
    steps = manifest["splits"]["train"]["rows"] // bench.global_batch_size

    def batches(start_step: int) -> TrainBatches:
        order = SampleOrder(split_blocks(manifest, "train"), seed=0, window=bench.shuffle_window)
        reader = ShardReader(data_dir, manifest, "train", cache_groups=2 * bench.shuffle_window + 2)
        return TrainBatches(reader, order, global_batch=bench.global_batch_size, micro_batch=bench.global_batch_size, rank=0,
                            world=1, start_step=start_step, prefetch_steps=bench.prefetch_steps)

    stream = batches(0)
    start = time.perf_counter()
    for _ in range(steps):
        stream.next()
    elapsed = time.perf_counter() - start
    stream.close()
    figures["framework_tokens_per_s"] = steps * bench.global_batch_size * seq_len / elapsed
    figures["steps"] = steps

    resume = {}
    for where, step in (("epoch_start", 1), ("epoch_end", max(1, steps - 2))):
        started = time.perf_counter()
        stream = batches(step)
        stream.next()
        resume[where] = time.perf_counter() - started
        stream.close()
    figures["resume_s"] = resume
    figures["resume_ratio"] = resume["epoch_end"] / resume["epoch_start"]

    if bench.ray_data:
        import ray.data


        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        context.print_on_execution_start = False
        dataset = ray.data.read_parquet(uris).select_columns([COLUMN])
        started, served = time.perf_counter(), 0
        for batch in dataset.iter_torch_batches(batch_size=bench.global_batch_size, drop_last=True):
            served += len(batch[COLUMN])
        figures["ray_data_tokens_per_s"] = served * seq_len / (time.perf_counter() - started)
    return figures


def run(cfg: DictConfig) -> Dict[str, Any]:
    import ray

    from framework.data.shards import read_manifest
    from framework.train.config import TRAIN
    from framework.bench.train import ensure_shards

    bench = to_bench_config(cfg)
    data_cfg = TRAIN.from_overrides(bench.data_overrides)
    data_dir = absolute(data_cfg.data.output_dir)
    ray.init(address="local", include_dashboard=False, logging_level="WARNING")
    try:
        ensure_shards(data_cfg)
        manifest = read_manifest(data_dir)
        task = ray.remote(measure).options(num_cpus=bench.cpus)
        figures = ray.get(task.remote(data_dir, manifest, bench))
    finally:
        ray.shutdown()
    consumer = consumer_tokens_per_s(bench.consumer, manifest["vocab_size"])
    figures.update({
        "machine": f"{machine()}; one Ray task of {bench.cpus} CPU(s)",
        "data": data_dir,
        "seq_len": manifest["seq_len"],
        "train_rows": manifest["splits"]["train"]["rows"],
        "consumer_tokens_per_s": consumer,
        "headroom": figures["framework_tokens_per_s"] / consumer,
        "framework_vs_pyarrow": figures["framework_tokens_per_s"] / figures["pyarrow_tokens_per_s"],
        "config": asdict(bench),
    })
    write_figures(figures, bench.output)
    ray_data = f", Ray Data {figures['ray_data_tokens_per_s'] / 1e6:.2f}M" if "ray_data_tokens_per_s" in figures else ""
    print(
        f"bench data: framework {figures['framework_tokens_per_s'] / 1e6:.2f}M tokens/s per worker "
        f"(×{figures['framework_vs_pyarrow']:.2f} of a bare pyarrow read, {figures['pyarrow_tokens_per_s'] / 1e6:.1f}M{ray_data}); "
        f"headroom ×{figures['headroom']:.1f} over {bench.consumer.model} at {bench.consumer.mfu:.0%} MFU "
        f"({consumer / 1e6:.2f}M tokens/s); first batch after a resume: {figures['resume_s']['epoch_start']:.3f}s at the "
        f"start of an epoch, {figures['resume_s']['epoch_end']:.3f}s near its end (×{figures['resume_ratio']:.2f})",
        flush=True,
    )
    return figures


BENCHMARKS.register("data")(Benchmark(check, run))
