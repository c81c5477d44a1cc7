"""What every benchmark shares: the registry `bench.name` picks from, the entry point's job, and writing the figures."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict

from omegaconf import DictConfig

from framework.config import Job, Registry, absolute, require

# What a benchmark writes into the folder its runs go to (bench.storage_path): a folder holding it may be
# cleared by the next run of a benchmark; any other non-empty folder is not the benchmark's to delete.
SCRATCH_MARKER = ".framework-bench"


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


def fresh_storage(path: str, key: str = "bench.storage_path") -> str:
    """`path` emptied for a benchmark's runs (a leftover run of the same name would resume, not train); gives it absolute.

    Only a folder an earlier benchmark made (its marker) is cleared; any other non-empty one is refused in one line.
    """
    import shutil

    root = absolute(path)
    require("://" not in root, key, path, "expected a local directory")
    if os.path.isdir(root) and os.listdir(root):
        require(os.path.isfile(os.path.join(root, SCRATCH_MARKER)), key, path,
                f"exists and holds something a benchmark did not write (no {SCRATCH_MARKER}); choose a new or empty directory")
        shutil.rmtree(root)
    os.makedirs(root, exist_ok=True)
    Path(root, SCRATCH_MARKER).touch()
    return root


def random_model(preset: str) -> Path:
    """The random-weight Llama folder of conf/bench/<preset>.yaml (its random_model, at its model_dir), written first
    if it is not there: a model of a real model's shape for benchmarks that need only the shapes."""
    from framework.config import compose, typed
    from framework.testing import RandomModelConfig, random_model_folder

    node = compose([f"bench={preset}"], "bench").bench
    folder = Path(absolute(node.model_dir))
    if not (folder / "config.json").is_file():
        random_model_folder(folder, typed(RandomModelConfig, node.random_model, "bench.random_model"))
    return folder
