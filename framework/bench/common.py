"""What every benchmark shares: the registry `bench.name` picks from, the entry point's job, and writing the figures."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict

from omegaconf import DictConfig

from framework.config import Job, Registry, absolute


@dataclass(frozen=True)
class Benchmark:
    # Checks the composed conf/bench.yaml before any work (misspelt keys, impossible values); raises ConfigError.
    check: Callable[[DictConfig], None]
    # Runs it: prints the comparison and writes `bench.output`; gives the figures.
    run: Callable[[DictConfig], Dict[str, Any]]


BENCHMARKS: Registry[Benchmark] = Registry("bench.name")


@dataclass(frozen=True)
class BenchRun:
    """A benchmark chosen and checked, with its config: what launch/bench.py runs."""

    benchmark: Benchmark
    cfg: DictConfig

    def __call__(self) -> Dict[str, Any]:
        return self.benchmark.run(self.cfg)


def load_bench(cfg: DictConfig) -> BenchRun:
    benchmark = BENCHMARKS.get(cfg.bench.name)
    benchmark.check(cfg)
    return BenchRun(benchmark, cfg)


# launch/bench.py: conf/bench.yaml (bench=<name>) → the chosen benchmark, checked.
BENCH = Job("bench", load=load_bench)


def write_figures(figures: Dict[str, Any], output: str) -> str:
    """Write a benchmark's figures as JSON to `output` (its parent made if needed); gives the absolute path."""
    path = absolute(output)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(figures, f, indent=2)
        f.write("\n")
    return path


def folder_params(folder: Path) -> int:
    """Parameters of a Hugging Face folder's weights, from its safetensors headers (no tensor is read)."""
    from safetensors import safe_open

    total = 0
    for file in Path(folder).glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as handle:
            total += sum(math.prod(handle.get_slice(key).get_shape()) for key in handle.keys())
    return total
