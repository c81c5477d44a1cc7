"""A sweep as data: its typed settings, its space, the training config of every trial, its folders.

Built and checked by framework/tune/plan.py; read by the runner, every trial and the results.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace
from typing import Any, Dict, List, Mapping, Optional, Tuple

from omegaconf import OmegaConf

from framework import storage
from framework.config import CONF_DIR, one_line
from framework.train.config import TrainRoot, validate
from framework.train.plan import TrainPlan
from framework.tune.config import TuneConfig
from framework.tune.space import Param, format_value, plain

# Which option of each config group the space names a trial takes: ((key, option), ...), () for none.
GroupChoice = Tuple[Tuple[str, str], ...]


@dataclass
class Sweep:
    """A sweep checked against the config alone (`check_sweep`)."""

    tune: TuneConfig  # typed; storage_path and output_dir absolute
    params: Dict[str, Param]
    # The command line's training overrides; None in launch/tune.py's first check (see the module docstring).
    base_overrides: Optional[List[str]]
    base: TrainRoot  # the command line's training config: validated, local paths absolute, no tune node
    # The composed training config of every combination of the space's config-group options.
    bases: Dict[GroupChoice, TrainRoot]
    corners: List[Tuple[str, TrainRoot]]  # every corner of the space: the words its errors start with, its config
    # tune.metric an eval score: (score, mode) the finished trials are ranked on; `tune` then carries val_loss (min),
    # which Tune's scheduler and search follow. None: the trials are ranked on tune.metric itself.
    ranking: Optional[Tuple[str, str]]

    @property
    def sweep_dir(self) -> str:
        """Every trial's Train run, Tune's experiment (tune/) and sweep.json: <tune.storage_path>/<tune.name>."""
        return storage.join(self.tune.storage_path, self.tune.name)

    @property
    def experiment_dir(self) -> str:
        return storage.join(self.sweep_dir, "tune")

    @property
    def group_keys(self) -> List[str]:
        return [key for key, param in self.params.items() if param.name in config_groups()]

    @property
    def trial_count(self) -> int:
        """Trials the sweep runs: num_samples, times the grid's size under grid search."""
        grid = math.prod(len(p.values) for p in self.params.values() if p.listed) if self.tune.search == "grid" else 1
        return grid * self.tune.num_samples

    @property
    def last_step(self) -> int:
        """The most steps any trial trains (run.max_steps may itself be swept)."""
        return max(config.run.max_steps for config in [self.base, *(c for _, c in self.corners)])

    def fingerprint(self) -> Dict[str, Any]:
        """What decides a sweep's trials; a sweep resumed under the same name must not differ in any of it."""
        t = self.tune
        return {
            "base_overrides": self.base_overrides,
            "space": {key: param.text for key, param in self.params.items()},
            "search": t.search, "scheduler": t.scheduler, "metric": t.metric, "mode": t.mode,
            "num_samples": t.num_samples, "seed": t.seed,
        }

    def named(self, config: TrainRoot, name: str) -> TrainRoot:
        """`config` as the Train run `<tune.name>/<name>` under the sweep's storage."""
        return replace(config, run=replace(config.run, name=f"{self.tune.name}/{name}", storage_path=self.tune.storage_path))

    def trial_config(self, values: Mapping[str, Any], name: str) -> TrainRoot:
        """The training config of the trial `name` with the values Tune chose for it."""
        return self.named(apply_values(self, {key: plain(value) for key, value in values.items()}), name)

    def uri(self, path: str) -> str:
        """A checkpoint's path as Ray reports it (inside its filesystem) as a URI of the sweep's storage."""
        root = self.tune.storage_path
        return f"{root.split('://', 1)[0]}://{path}" if "://" in root and "://" not in path else path


@dataclass
class SweepPlan(Sweep):
    """A sweep planned against the prepared shards (`make_sweep_plan`): what the runner and every trial read."""

    base_plan: TrainPlan  # the command line's own config, planned as a run
    corner_plans: List[Tuple[str, TrainPlan]]


# ---------------------------------------------------------------------------------------------
# Config groups and applying a trial's values

@functools.lru_cache(maxsize=None)
def config_groups() -> frozenset:
    """The config groups of conf/ (a space key naming one swaps its option)."""
    return frozenset(p.name for p in CONF_DIR.iterdir() if p.is_dir())


def option_error(group: str, option: Any) -> Optional[str]:
    if (CONF_DIR / group / f"{option}.yaml").is_file():
        return None
    options = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
    return f"'{option}' is not an option of the config group {group} ({', '.join(options)})"


def apply_values(sweep: Sweep, values: Mapping[str, Any]) -> TrainRoot:
    """The training config of a trial with these values, validated: its config-group options' composed
    config (the base without base overrides: only their existence was checked), the other values applied
    as Hydra applies an override (struct mode: a key the schema lacks needs `+`)."""
    groups = sweep.group_keys
    choice = tuple((key, format_value(values[key])) for key in groups if key in values)
    config = sweep.bases.get(choice, sweep.base)
    tree = OmegaConf.structured(config)
    for key, value in values.items():
        if key in groups:
            continue
        adds = key.startswith("+")
        OmegaConf.set_struct(tree, not adds)
        OmegaConf.update(tree, key.lstrip("+"), value, merge=True)
    OmegaConf.set_struct(tree, True)
    return validate(OmegaConf.to_object(tree))


def rejection(exc: Exception) -> str:
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    if isinstance(exc, (ConfigKeyError, ConfigAttributeError)):
        return f"not a key of the training config ({one_line(exc)})"
    return one_line(exc)
