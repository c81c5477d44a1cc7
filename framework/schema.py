"""The training tree of `conf/config.yaml`: its root schema, assembled from each group's schema, and its checks.

Each group's dataclass lives beside the module that reads it; `check` runs every group's rules and
the cross-group ones, all before any Ray work (framework/config.py says where defaults live).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence

from omegaconf import DictConfig

from framework.config import compose, optional_group, register, typed
from framework.data.config import DataConfig, check_data
from framework.model import ModelConfig, check_model
from framework.train.config import DeepSpeedConfig, OptimConfig, RunConfig, check_deepspeed, check_optim, check_run
from framework.tune.config import TuneConfig


@dataclass
class Config:
    """The composed `conf/config.yaml`: what prep, training, export of a run, and a sweep (with `tune`) read."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    # `tune=<preset>` selects a sweep (launch/tune.py); absent from training runs.
    tune: Optional[TuneConfig] = optional_group(TuneConfig)


# `conf/config.yaml` names it first in its defaults: misspelt keys and wrong types fail at composition.
register("config_schema", Config)

TRAINING_GROUPS = ("model", "data", "deepspeed", "optim", "run")


def validate(cfg: Config) -> Config:
    """Check every training group's rules and the rules across groups; raises ConfigError naming the first bad key."""
    check_run(cfg.run)
    check_deepspeed(cfg.deepspeed)
    check_optim(cfg.optim, cfg.run.max_steps)
    check_data(cfg.data)
    check_model(cfg.model, cfg.data.seq_len)
    return cfg


def to_config(cfg: DictConfig) -> Config:
    """A composed DictConfig as the typed, validated Config (the `tune` node checked by the sweep, not here)."""
    return validate(typed(Config, cfg, ""))


def load_config(overrides: Sequence[str] | None = None) -> Config:
    """Compose `conf/config.yaml` with command-line style overrides, typed and validated."""
    return to_config(compose(list(overrides or [])))


def check(cfg: DictConfig) -> None:
    """The check of the launch scripts on the training tree (prep, train): the whole config typed and validated."""
    to_config(cfg)


def training_overrides(overrides: Sequence[str]) -> List[str]:
    """The overrides among a command line that configure training (not `tune*`, not `hydra.*`)."""
    def group(o: str) -> str:
        return o.lstrip("+~").split("=", 1)[0].split(".", 1)[0].split("/", 1)[0]

    return [o for o in overrides if group(o) not in ("tune", "hydra")]
