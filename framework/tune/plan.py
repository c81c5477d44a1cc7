"""The checked sweep, planned once in the driver before any trial: its settings, its space, and every corner planned as a run.

A sweep is the training config (the command line's overrides of `conf/config.yaml`) plus the `tune`
group. Two steps, as for training (`framework.schema.check`, then `framework.train.plan.make_plan`):

  `check_sweep`     the config alone: the tune node typed, the space parsed (framework/tune/space.py),
                    the rules of its search and scheduler, and every corner of the space applied to the
                    training config and validated. launch/tune.py runs it before Hydra starts the job
                    (and `launch/submit.py tune` in its preflight) without the command line's overrides
                    at hand, so a corner that swaps a config group is then only checked to name an option.
  `make_sweep_plan` the same with the command line's training overrides: every combination of the
                    config-group options the space names is composed, here in the driver where relative
                    paths mean what the command line meant; then the base config and every corner are
                    planned as training runs (`make_plan`: the shards' manifest, batch and evaluation
                    sizes, the model's config), so a trial the space can draw fails now, in one line,
                    not after Ray has started it.

A trial's config is its combination's composed config with its other values applied (`trial_config`):
no trial composes anything itself.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass, replace
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from omegaconf import DictConfig, OmegaConf

from framework import storage
from framework.config import CONF_DIR, ConfigError, absolute, compose, one_line, require, typed, with_default_groups
from framework.schema import Config, load_config, to_config, training_overrides, validate
from framework.train.plan import TrainPlan, make_plan, resolve_paths
from framework.tune import pbt
from framework.tune.config import TuneConfig
from framework.tune.space import Param, format_value, parse_space, plain
from framework.tune.space import corners as space_corners

# launch/tune.py selects this preset unless the command line picks one (hydra_entry's default_groups).
DEFAULT_GROUPS = ["tune=asha"]
# What the training loop reports at every evaluation (framework/train/loop.py).
METRICS = ("val_loss", "val_perplexity", "train_loss")
SEARCHES = ("random", "grid", "optuna")
SCHEDULERS = ("fifo", "asha", "pbt")
# Trials share one set of prepared shards, and the sweep names, stores and places their runs.
OWNED_KEYS = ("data", "run.name", "run.storage_path", "run.ray_address", "tune", "hydra")
# The run name a corner is planned under: no run of that name exists, so it resumes nothing.
CORNER_RUN = "corner-check"

# Which option of each config group the space names a trial takes: ((key, option), ...), () for none.
GroupChoice = Tuple[Tuple[str, str], ...]


@dataclass
class Sweep:
    """A sweep checked against the config alone (`check_sweep`)."""

    tune: TuneConfig  # typed; storage_path and output_dir absolute
    params: Dict[str, Param]
    # The command line's training overrides; None in launch/tune.py's first check (see the module docstring).
    base_overrides: Optional[List[str]]
    base: Config  # the command line's training config: validated, local paths absolute, no tune node
    # The composed training config of every combination of the space's config-group options.
    bases: Dict[GroupChoice, Config]
    corners: List[Tuple[str, Config]]  # every corner of the space: the words its errors start with, its config

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

    def named(self, config: Config, name: str) -> Config:
        """`config` as the Train run `<tune.name>/<name>` under the sweep's storage."""
        return replace(config, run=replace(config.run, name=f"{self.tune.name}/{name}", storage_path=self.tune.storage_path))

    def trial_config(self, values: Mapping[str, Any], name: str) -> Config:
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


def _option_error(group: str, option: Any) -> Optional[str]:
    if (CONF_DIR / group / f"{option}.yaml").is_file():
        return None
    options = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
    return f"'{option}' is not an option of the config group {group} ({', '.join(options)})"


def apply_values(sweep: Sweep, values: Mapping[str, Any]) -> Config:
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


def _reason(exc: Exception) -> str:
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    if isinstance(exc, (ConfigKeyError, ConfigAttributeError)):
        return f"not a key of the training config ({one_line(exc)})"
    return one_line(exc)


# ---------------------------------------------------------------------------------------------
# Checks

def check_space(params: Mapping[str, Param]) -> None:
    """Keys the sweep owns are refused; a config group takes option names that exist."""
    groups = config_groups()
    for key, param in params.items():
        if any(param.name == owned or param.name.startswith(owned + ".") for owned in OWNED_KEYS):
            raise ConfigError(
                f"tune.space.{key}: set by the sweep itself (trials share the prepared shards in data.output_dir, "
                f"get their run names and storage from tune.name and tune.storage_path); sweep training keys instead"
            )
        if param.name in groups:
            require(param.kind != "interval", f"tune.space.{key}", param.text, "a config group takes option names: choice(a, b)")
            for option in param.values:
                error = _option_error(param.name, option)
                if error:
                    raise ConfigError(f"tune.space.{key}: {param.text} gives {format_value(option)}: {error}")


def check_tune(tune: TuneConfig, base: Config, params: Mapping[str, Param]) -> None:
    """The rules of a sweep's settings, search and scheduler; raises ConfigError naming the first bad `tune.*` key."""
    require(bool(tune.name) and "/" not in tune.name, "tune.name", tune.name, "expected a name without '/'")
    require(tune.search in SEARCHES, "tune.search", tune.search, f"expected one of {SEARCHES}")
    require(tune.scheduler in SCHEDULERS, "tune.scheduler", tune.scheduler, f"expected one of {SCHEDULERS}")
    require(tune.metric in METRICS, "tune.metric", tune.metric, f"expected a metric the training loop reports: {METRICS}")
    require(tune.mode in ("min", "max"), "tune.mode", tune.mode, "expected min or max")
    require(tune.num_samples >= 1, "tune.num_samples", tune.num_samples, "expected at least 1")
    require(tune.max_concurrent_trials >= 1, "tune.max_concurrent_trials", tune.max_concurrent_trials, "expected at least 1")
    require(tune.verbose in (0, 1, 2), "tune.verbose", tune.verbose, "expected 0, 1 or 2")
    require("://" not in tune.output_dir, "tune.output_dir", tune.output_dir, "expected a local directory")
    sampled = [p for p in params.values() if p.sampled]
    if tune.search == "grid":
        for p in sampled:
            require(p.listed, f"tune.space.{p.key}", p.text, "grid search takes lists of values: choice(a, b, ...) or range(start, stop, step)")
    if tune.search == "optuna":
        for p in sampled:
            require(
                all(isinstance(v, (str, int, float, bool)) for v in p.values), f"tune.space.{p.key}", p.text,
                "Optuna chooses among numbers, strings and booleans",
            )
    if tune.scheduler == "asha":
        asha = tune.asha
        require(asha.grace_period >= 1, "tune.asha.grace_period", asha.grace_period, "expected at least 1 step")
        require(
            asha.grace_period < base.run.max_steps, "tune.asha.grace_period", asha.grace_period,
            f"expected fewer steps than run.max_steps={base.run.max_steps}, or no trial can be stopped early",
        )
        require(asha.reduction_factor >= 2, "tune.asha.reduction_factor", asha.reduction_factor, "expected at least 2")
    if tune.scheduler == "pbt":
        pbt.check_pbt(tune, base, params)


def to_tune_config(cfg: DictConfig) -> TuneConfig:
    """The typed `tune` node of a composed config; interpolations resolve against the whole config."""
    if OmegaConf.select(cfg, "tune") is None:
        raise ConfigError("tune: no sweep selected; expected tune=asha, tune=grid, tune=optuna or tune=pbt")
    try:
        values = OmegaConf.to_container(cfg.tune, resolve=True)
    except Exception as exc:  # noqa: BLE001 - an interpolation that does not resolve, as one line
        raise ConfigError(one_line(exc)) from None
    tune = typed(TuneConfig, values, "tune")
    return replace(tune, storage_path=absolute(tune.storage_path), output_dir=absolute(tune.output_dir))


def _compose_bases(sweep_params: Mapping[str, Param], groups: Sequence[str], base_overrides: List[str]) -> Dict[GroupChoice, Config]:
    """The training config of every combination of the config-group options the space names, composed as its trials are."""
    bases: Dict[GroupChoice, Config] = {}
    for combination in itertools.product(*[[(key, v) for v in sweep_params[key].values] for key in groups]):
        overrides = [sweep_params[key].override(v) for key, v in combination]
        try:
            config = load_config(base_overrides + overrides)
        except Exception as exc:  # noqa: BLE001 - every rejection ends as one line naming the option
            key, value = combination[0]
            words = f"tune.space.{key}: {sweep_params[key].text} gives {format_value(value)}" if len(combination) == 1 else (
                "tune.space: the trial " + " ".join(overrides)
            )
            raise ConfigError(f"{words}: {_reason(exc)}") from None
        bases[tuple((key, format_value(v)) for key, v in combination)] = replace(resolve_paths(config), tune=None)
    return bases


def check_sweep(cfg: DictConfig, base_overrides: Optional[List[str]] = None) -> Sweep:
    """A composed sweep config checked without the shards: settings, space, rules, and every corner of the space validated.

    Raises ConfigError as `tune.space.<key>: ...` for the first corner the training config cannot take
    (an unknown key, a wrong type, a config group's option that is missing or does not compose, a
    value `validate` rejects). `base_overrides` are the command line's training overrides.
    """
    tune = to_tune_config(cfg)
    base = replace(resolve_paths(to_config(cfg)), tune=None)
    params = parse_space(tune.space)
    check_space(params)
    check_tune(tune, base, params)
    sweep = Sweep(tune, params, None if base_overrides is None else list(base_overrides), base, {}, [])
    if base_overrides is not None and sweep.group_keys:
        sweep.bases = _compose_bases(params, sweep.group_keys, sweep.base_overrides)
    for words, values in space_corners(params):
        try:
            sweep.corners.append((words, apply_values(sweep, values)))
        except Exception as exc:  # noqa: BLE001 - every rejection ends as one line naming the key
            raise ConfigError(f"{words}: {_reason(exc)}") from None
    return sweep


def check(cfg: DictConfig) -> None:
    """launch/tune.py's check before Hydra runs the job, and `launch/submit.py tune`'s: `check_sweep` without the overrides."""
    check_sweep(cfg)


def make_sweep_plan(cfg: DictConfig, base_overrides: List[str]) -> SweepPlan:
    """The sweep checked (`check_sweep`) and planned against the prepared shards: the base config and every corner as a run."""
    sweep = check_sweep(cfg, base_overrides)
    base_plan = make_plan(sweep.named(sweep.base, CORNER_RUN))
    corner_plans = []
    for words, config in sweep.corners:
        try:
            corner_plans.append((words, make_plan(sweep.named(config, CORNER_RUN))))
        except ConfigError as exc:
            raise ConfigError(f"{words}: {exc}") from None
    return SweepPlan(**vars(sweep), base_plan=base_plan, corner_plans=corner_plans)


def load_sweep(overrides: Sequence[str] = ()) -> Sweep:
    """A sweep composed and checked as `python launch/tune.py <overrides>` composes it (tune=asha unless the
    overrides pick a preset), with the overrides at hand: everything but the shards."""
    cfg, base_overrides = _compose(overrides)
    return check_sweep(cfg, base_overrides)


def plan_sweep(overrides: Sequence[str] = ()) -> SweepPlan:
    """A sweep composed and planned as `python launch/tune.py <overrides>` plans it: `load_sweep` and the shards."""
    return make_sweep_plan(*_compose(overrides))


def _compose(overrides: Sequence[str]) -> Tuple[DictConfig, List[str]]:
    overrides = with_default_groups(list(overrides), DEFAULT_GROUPS)
    try:
        return compose(overrides), training_overrides(overrides)
    except Exception as exc:  # noqa: BLE001 - composition errors become the one line hydra_entry prints
        raise ConfigError(one_line(exc)) from None


def plan_from_hydra(cfg: DictConfig) -> SweepPlan:
    """The sweep planned inside `@hydra.main`, with the command line's training overrides as its base."""
    from hydra.core.hydra_config import HydraConfig

    return make_sweep_plan(cfg, training_overrides(list(HydraConfig.get().overrides.task)))
