"""Run a benchmark: `python launch/bench.py bench=serve [bench.requests=64 ...]`"""

import importlib

from omegaconf import DictConfig

from framework.config import ConfigError, hydra_entry

# bench.name → the module whose `run(cfg)` (and optional `check(cfg)`) implements it.
BENCHMARKS = {
    "compress": "framework.compress_bench", "data": "framework.data.bench", "serve": "framework.serve.bench",
    "train": "framework.train.bench", "tune": "framework.tune.bench",
}


def _module(cfg: DictConfig):  # noqa: ANN202 - a module
    name = cfg.bench.name
    if name not in BENCHMARKS:
        raise ConfigError(f"bench.name={name}: expected one of {sorted(BENCHMARKS)}")
    return importlib.import_module(BENCHMARKS[name])


def check_bench(cfg: DictConfig) -> None:
    module = _module(cfg)
    if hasattr(module, "check"):
        module.check(cfg)


@hydra_entry(config_name="bench", check=check_bench)
def main(cfg: DictConfig) -> None:
    _module(cfg).run(cfg)


if __name__ == "__main__":
    main()
