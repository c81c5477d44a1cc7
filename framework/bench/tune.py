"""Sweep overhead: N short trials run as a sweep against their training time alone: `python launch/bench.py bench=tune`.

One sweep of `trials` trials of the same length (a grid of `choice(...)` learning rates, FIFO: none is stopped
early), `max_concurrent_trials` at a time, on a local Ray cluster of `num_cpus` CPUs. Reported:

    wall_s          the sweep's wall time (`Tuner.fit`, from the first trial's start to the last one's end)
    train_s         per trial, the time its workers spent in training steps (Σ perf/step_s × steps from
                    the run's metrics.jsonl; evaluation and checkpoints excluded)
    overhead        wall_s / (Σ train_s / max_concurrent_trials): 1.0 would be a sweep that only trains

and, with `plain_run`, one run of the same training job by `framework.train.trainer.run` outside Tune, so
that what every Train run pays (worker group, DeepSpeed, data reading, evaluation, checkpoints) is told
apart from what the sweep adds: `over_plain` = wall_s / (trials × plain_wall_s / max_concurrent_trials).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from typing import Any, Dict, List

from omegaconf import MISSING, DictConfig

from framework.bench.common import BENCHMARKS, Benchmark, fresh_storage, write_figures
from framework.cluster import machine
from framework.config import ConfigError, absolute, typed


@dataclass
class TuneBenchConfig:
    name: str = MISSING
    trials: int = MISSING
    max_concurrent_trials: int = MISSING
    # CPUs of the local Ray cluster the benchmark starts.
    num_cpus: int = MISSING
    # Also time one run of the same job outside Tune.
    plain_run: bool = MISSING
    # The training job of every trial (conf/config.yaml overrides); the data must be prepared.
    overrides: List[str] = MISSING
    # Sweeps and the plain run go here (cleared first); the figures go to `output`.
    storage_path: str = MISSING
    output: str = MISSING


def to_bench_config(cfg: DictConfig) -> TuneBenchConfig:
    return typed(TuneBenchConfig, cfg.bench, "bench")


def sweep_overrides(bench: TuneBenchConfig, name: str) -> List[str]:
    """The sweep: `trials` learning rates between 1e-3 and 3e-3, FIFO, nothing promoted."""
    rates = ", ".join(f"{1e-3 * 3 ** (i / max(1, bench.trials - 1)):.3g}" for i in range(bench.trials))
    root = absolute(bench.storage_path)
    return [
        *bench.overrides,
        "tune=grid", "tune.scheduler=fifo", "~tune/space", f'+tune.space.optim.lr="choice({rates})"',
        f"tune.name={name}", f"tune.storage_path={root}", f"tune.output_dir={root}/{name}",
        f"tune.max_concurrent_trials={bench.max_concurrent_trials}", "tune.promote=false", "tune.verbose=0",
    ]


def check(cfg: DictConfig) -> None:
    """Checks for launch/bench.py before any work: counts, and the sweep the benchmark will run."""
    from framework.tune.plan import load_sweep

    bench = to_bench_config(cfg)
    for key in ("trials", "max_concurrent_trials", "num_cpus"):
        if getattr(bench, key) < 1:
            raise ConfigError(f"bench.{key}={getattr(bench, key)}: expected at least 1")
    try:
        load_sweep(sweep_overrides(bench, "check"))
    except ConfigError as exc:
        raise ConfigError(f"bench.overrides: {exc}") from None


def training_seconds(metrics_jsonl: str) -> float:
    """Σ perf/step_s × steps over a run's log intervals: the workers' time in training steps."""
    total, previous = 0.0, 0
    with open(metrics_jsonl) as f:
        for line in f:
            record = json.loads(line)
            if "perf/step_s" in record:
                total += record["perf/step_s"] * (record["step"] - previous)
                previous = record["step"]
    return total


def run(cfg: DictConfig) -> Dict[str, Any]:
    import ray

    from framework.train.config import TRAIN
    from framework.train.trainer import train
    from framework.tune.plan import plan_sweep
    from framework.tune.runner import run_sweep

    bench = to_bench_config(cfg)
    root = fresh_storage(bench.storage_path)
    ray.init(address="local", num_cpus=bench.num_cpus, include_dashboard=False, logging_level="WARNING")
    try:
        plan = plan_sweep(sweep_overrides(bench, "sweep"))
        result = run_sweep(plan)
        train_s = {
            row.trial: training_seconds(os.path.join(root, "sweep", row.trial, "logs", "metrics.jsonl"))
            for row in result.table.itertuples()
        }
        plain_s = None
        if bench.plain_run:
            config = TRAIN.from_overrides([*bench.overrides, "run.name=plain", f"run.storage_path={root}"])
            start = time.perf_counter()
            train(config)
            plain_s = time.perf_counter() - start
    finally:
        ray.shutdown()
    n = bench.max_concurrent_trials
    ideal = sum(train_s.values()) / n
    figures = {
        "machine": f"{machine()}; local Ray cluster of {bench.num_cpus} CPUs",
        "trials": bench.trials,
        "max_concurrent_trials": n,
        "steps": plan.base.run.max_steps,
        "wall_s": round(result.wall_s, 1),
        "train_s": {k: round(v, 2) for k, v in train_s.items()},
        "trial_wall_s": {row.trial: round(row.wall_s, 1) for row in result.table.itertuples()},
        "ideal_s": round(ideal, 1),
        "overhead": round(result.wall_s / ideal, 2) if ideal else None,
        "plain_run_s": round(plain_s, 1) if plain_s else None,
        "over_plain": round(result.wall_s / (bench.trials * plain_s / n), 2) if plain_s else None,
        "config": asdict(bench),
    }
    write_figures(figures, bench.output)
    print(
        f"bench tune: {bench.trials} trials × {figures['steps']} steps, {n} at a time: sweep {figures['wall_s']}s; "
        f"Σ training {sum(train_s.values()):.1f}s / {n} = {figures['ideal_s']}s → overhead ×{figures['overhead']}"
        + (f"; one plain run {figures['plain_run_s']}s → sweep vs plain runs ×{figures['over_plain']}" if plain_s else ""),
        flush=True,
    )
    return figures


BENCHMARKS.register("tune")(Benchmark(check, run))
