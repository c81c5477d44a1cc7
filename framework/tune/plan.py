"""The checked sweep, planned once in the driver before any trial: its settings, its space, and every corner planned as a run.

A sweep is the training config (the command line's overrides of `conf/config.yaml`) plus the `tune`
group. Two steps, as for training (`framework.train.config.to_train_root`, then `framework.train.plan.make_plan`):

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

import itertools
from dataclasses import replace
from typing import Dict, List, Mapping, Optional, Sequence

from omegaconf import DictConfig, OmegaConf

from framework.config import ConfigError, Job, absolute, one_line, require, typed
from framework.train.config import TRAIN, TrainRoot, to_train_root, training_overrides
from framework.train.objectives import PREFERENCE_METRICS, report_key
from framework.train.plan import make_plan, resolve_paths
from framework.tune.algorithms import SCHEDULERS, SEARCHES
from framework.tune.config import TuneConfig
from framework.tune.space import Param, format_value, parse_space, space_corners
from framework.tune.sweep import GroupChoice, Sweep, SweepPlan, apply_values, config_groups, option_error, rejection

# What the training loops report at every evaluation (framework/train/loop.py): the token loss's, a preference
# loss's (framework/train/objectives.py: PREFERENCE_METRICS, one definition for training, validation and sweeps;
# val_rewards_accuracy with tune.mode=max), and GRPO's (framework/train/rl_loop.py: val_reward with tune.mode=max).
METRICS = ("val_loss", "val_perplexity", "train_loss") + tuple(
    report_key(f"val/{name}") for name in PREFERENCE_METRICS if name != "loss"
) + ("val_reward", "val_correct", "train_reward")
# Trials share one set of prepared shards, and the sweep names, stores and places their runs.
OWNED_KEYS = ("data", "run.name", "run.storage_path", "run.ray_address", "tune", "hydra")
# The run name a corner is planned under: no run of that name exists, so it resumes nothing.
CORNER_RUN = "corner-check"

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
                error = option_error(param.name, option)
                if error:
                    raise ConfigError(f"tune.space.{key}: {param.text} gives {format_value(option)}: {error}")


def is_eval_score(metric: str) -> bool:
    """A score named as eval.json names it (val/perplexity, eval/<task>/<metric>), not as the training loop reports it."""
    return "/" in metric


def check_tune(sweep: Sweep) -> None:
    """The rules of a sweep's settings, search and scheduler; raises ConfigError naming the first bad `tune.*` key."""
    tune = sweep.tune
    require(bool(tune.name) and "/" not in tune.name, "tune.name", tune.name, "expected a name without '/'")
    search, scheduler = SEARCHES.get(tune.search), SCHEDULERS.get(tune.scheduler)
    require(tune.metric in METRICS, "tune.metric", tune.metric,
            f"expected a metric the training loop reports: {METRICS}, or an eval.json score such as eval/<task>/acc")
    require(tune.mode in ("min", "max"), "tune.mode", tune.mode, "expected min or max")
    require(tune.num_samples >= 1, "tune.num_samples", tune.num_samples, "expected at least 1")
    require(tune.max_concurrent_trials >= 1, "tune.max_concurrent_trials", tune.max_concurrent_trials, "expected at least 1")
    require(tune.verbose in (0, 1, 2), "tune.verbose", tune.verbose, "expected 0, 1 or 2")
    require("://" not in tune.output_dir, "tune.output_dir", tune.output_dir, "expected a local directory")
    search.check(sweep)
    scheduler.check(sweep)


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


def _compose_bases(sweep_params: Mapping[str, Param], groups: Sequence[str], base_overrides: List[str]) -> Dict[GroupChoice, TrainRoot]:
    """The training config of every combination of the config-group options the space names, composed as its trials are."""
    bases: Dict[GroupChoice, TrainRoot] = {}
    for combination in itertools.product(*[[(key, v) for v in sweep_params[key].values] for key in groups]):
        overrides = [sweep_params[key].override(v) for key, v in combination]
        try:
            config = TRAIN.from_overrides(base_overrides + overrides)
        except Exception as exc:  # noqa: BLE001 - every rejection ends as one line naming the option
            key, value = combination[0]
            words = f"tune.space.{key}: {sweep_params[key].text} gives {format_value(value)}" if len(combination) == 1 else (
                "tune.space: the trial " + " ".join(overrides)
            )
            raise ConfigError(f"{words}: {rejection(exc)}") from None
        bases[tuple((key, format_value(v)) for key, v in combination)] = replace(resolve_paths(config), tune=None)
    return bases


def check_sweep(cfg: DictConfig, base_overrides: Optional[List[str]] = None) -> Sweep:
    """A composed sweep config checked without the shards: settings, space, rules, and every corner of the space validated.

    Raises ConfigError as `tune.space.<key>: ...` for the first corner the training config cannot take
    (an unknown key, a wrong type, a config group's option that is missing or does not compose, a
    value `validate` rejects). `base_overrides` are the command line's training overrides.
    """
    tune = to_tune_config(cfg)
    base = replace(resolve_paths(to_train_root(cfg)), tune=None)
    params = parse_space(tune.space)
    check_space(params)
    ranking = None
    if is_eval_score(tune.metric):
        require(tune.mode in ("min", "max"), "tune.mode", tune.mode, "expected min or max")
        require(tune.promote, "tune.promote", tune.promote,
                f"tune.metric={tune.metric} ranks trials by evaluating their exports: expected tune.promote=true")
        ranking, tune = (tune.metric, tune.mode), replace(tune, metric="val_loss", mode="min")
    else:
        require(not tune.eval, "tune.eval", tune.eval, f"scores trials on an eval score; tune.metric={tune.metric} is not one")
    sweep = Sweep(tune, params, None if base_overrides is None else list(base_overrides), base, {}, [], ranking)
    check_tune(sweep)
    if base_overrides is not None and sweep.group_keys:
        sweep.bases = _compose_bases(params, sweep.group_keys, sweep.base_overrides)
    for words, values in space_corners(params):
        try:
            sweep.corners.append((words, apply_values(sweep, values)))
        except Exception as exc:  # noqa: BLE001 - every rejection ends as one line naming the key
            raise ConfigError(f"{words}: {rejection(exc)}") from None
    return sweep


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


def _compose(overrides: Sequence[str]) -> tuple[DictConfig, List[str]]:
    try:
        return SWEEP.compose(overrides), training_overrides(overrides)
    except Exception as exc:  # noqa: BLE001 - composition errors become the one line the entry point prints
        raise ConfigError(one_line(exc)) from None


def plan_from_hydra(cfg: DictConfig) -> SweepPlan:
    """The sweep planned inside `@hydra.main`, with the command line's training overrides as its base."""
    from hydra.core.hydra_config import HydraConfig

    return make_sweep_plan(cfg, training_overrides(list(HydraConfig.get().overrides.task)))


# launch/tune.py: conf/config.yaml with a `tune` preset (tune=asha unless the command line picks one) →
# the planned sweep. Before Hydra starts the job (and in `launch/submit.py tune`'s preflight) the
# composition is checked without the command line's overrides at hand (`check_sweep`).
SWEEP = Job("config", load=plan_from_hydra, check=check_sweep, default_groups=("tune=asha",))
