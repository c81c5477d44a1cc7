"""What a sweep is: its typed config (`conf/tune/*`), its search space, and the checks that run before any trial.

A search space maps override names of the training config to distributions, written as strings:

    optim.lr: loguniform(1e-4, 3e-3)       uniform(a, b)  loguniform(a, b)  quniform(a, b, q)
    run.micro_batch_size: choice(4, 8)     randint(a, b) (b excluded)  lograndint(a, b)
    deepspeed: grid(zero1, zero2)          choice(...) samples one value, grid(...) tries every value
    optim.warmup_steps: 5                  a plain value pins the key for every trial

Under search=grid, choice(...) tries every value as grid(...) does: a grid search enumerates.

Keys are the names a command-line override uses, config groups included (`deepspeed`, `model`); a
trial's training config is `load_job_config(base overrides + the trial's overrides)`. Nothing here
imports Ray, so checking a sweep on the command line is quick.
"""

from __future__ import annotations

import ast
import math
import re
from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Optional, Tuple

from omegaconf import MISSING, DictConfig, OmegaConf

from framework.config import (
    CONF_DIR, ConfigError, JobConfig, compose, load_job_config, one_line, register, register_schema, require, to_job_config, validate,
)

# What the training loop reports at every evaluation point (framework/train/loop.py).
METRICS = ("val_loss", "val_perplexity", "train_loss")
SEARCHES = ("random", "grid", "optuna")
SCHEDULERS = ("fifo", "asha", "pbt")
# Trials share one set of prepared shards and the sweep names and places their runs.
FIXED_KEYS = ("data", "run.name", "run.storage_path", "run.ray_address")
# What PBT may explore: values a clone really trains with after resuming the better trial's
# checkpoint. The LR schedule's function is rebuilt from the clone's config (warm-up, minimum ratio)
# and trial.retarget_checkpoint rewrites the peak and current LR and the clipping norm the checkpoint
# carries. Everything else is either restored from the checkpoint over the clone's config (the
# optimizer's weight_decay, betas and eps) or must match it (model, ZeRO stage, batch sizes, steps).
PBT_EXPLORABLE = ("optim.lr", "optim.grad_clip", "optim.warmup_steps", "optim.min_lr_ratio")


@dataclass
class AshaConfig:
    # Steps every trial trains before it can be stopped; rungs follow at grace_period × reduction_factor^k.
    grace_period: int = 10
    # At each rung a trial continues only if it is in the best 1/reduction_factor of those that reached it.
    reduction_factor: int = 2


@dataclass
class PbtConfig:
    # Steps between exploit/explore decisions; a multiple of run.checkpoint_interval, so that a
    # decision always has a fresh checkpoint of the better trial to clone.
    perturbation_interval: int = 10
    # The bottom fraction of trials clones the top fraction.
    quantile_fraction: float = 0.25
    # Chance that an explored value is drawn anew from its distribution instead of scaled by 0.8 or 1.2.
    resample_probability: float = 0.25


@dataclass
class SweepConfig:
    # Names the sweep's folder; running a sweep of the same name again resumes it.
    name: str = MISSING
    # Override name → distribution (see the module docstring); nested mappings are read as dotted names.
    space: Dict[str, Any] = field(default_factory=dict)
    search: str = "random"  # random | grid | optuna
    scheduler: str = "asha"  # fifo | asha | pbt
    metric: str = "val_loss"  # val_loss | val_perplexity | train_loss
    mode: str = "min"  # min | max
    # Trials drawn from the space (grid: repetitions of the whole grid).
    num_samples: int = 4
    # Trials training at once; each runs run.num_workers Train workers.
    max_concurrent_trials: int = 1
    seed: int = 0
    # Ray Tune's experiment and every trial's Train run live under <storage_path>/<name> (local or a URI).
    storage_path: str = "outputs/sweeps"
    # Results table, plots, best.json and the promoted Hugging Face folder (a local directory).
    output_dir: str = "outputs/sweeps/${.name}"
    # Export the best trial's checkpoint to <output_dir>/best when the sweep ends.
    promote: bool = True
    # Ray Tune's console output: 0 silent, 1 status updates, 2 every result.
    verbose: int = 1
    asha: AshaConfig = field(default_factory=AshaConfig)
    pbt: PbtConfig = field(default_factory=PbtConfig)


@dataclass
class SweepJobConfig(JobConfig):
    """`conf/tune.yaml`: the training config plus the sweep."""

    tune: SweepConfig = field(default_factory=SweepConfig)


def register_sweep_schema() -> None:
    """Register the schema with Hydra's ConfigStore; `conf/tune.yaml` names it first in its defaults."""
    register_schema()
    register("sweep_schema", SweepJobConfig)


# ---------------------------------------------------------------------------------------------
# The search space

# name → (number of arguments or None for any, kind)
DISTRIBUTIONS = {
    "uniform": (2, "range"),
    "loguniform": (2, "range"),
    "quniform": (3, "range"),
    "qloguniform": (3, "range"),
    "randint": (2, "range"),
    "lograndint": (2, "range"),
    "choice": (None, "values"),
    "grid": (None, "values"),
}


@dataclass
class Param:
    """One swept key: a distribution and its arguments, or a pinned value (`dist` None)."""

    key: str
    dist: Optional[str]
    args: Tuple[Any, ...]
    text: str

    @property
    def is_grid(self) -> bool:
        return self.dist == "grid"

    @property
    def is_log(self) -> bool:
        return self.dist in ("loguniform", "qloguniform", "lograndint")

    def corners(self) -> List[Any]:
        """The values a check must try: both ends of a range, every listed value."""
        if self.dist is None:
            return [self.args[0]]
        if self.dist in ("randint", "lograndint"):
            return [self.args[0], self.args[1] - 1]
        if DISTRIBUTIONS[self.dist][1] == "range":
            return [self.args[0], self.args[1]]
        return list(self.args)

    def enumerated(self) -> "Param":
        """This key as a grid axis when it lists values: a grid search tries every choice(...) value too."""
        return replace(self, dist="grid") if self.dist == "choice" else self

    def to_tune(self) -> Any:
        """The Ray Tune domain for this key."""
        from ray import tune

        if self.dist is None:
            return self.args[0]
        if self.dist == "grid":
            return tune.grid_search(list(self.args))
        if self.dist == "choice":
            return tune.choice(list(self.args))
        return getattr(tune, self.dist)(*self.args)


def _flatten(space: Any, prefix: str = "") -> Dict[str, Any]:
    """`{optim: {lr: x}}` and `{optim.lr: x}` both become `{optim.lr: x}`."""
    flat: Dict[str, Any] = {}
    for key, value in space.items():
        name = f"{prefix}{key}"
        if isinstance(value, (dict, DictConfig)):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _literal(text: str) -> Any:
    """A distribution argument: a number, a quoted string, null/true/false, or a bare word such as zero3-offload."""
    text = text.strip()
    words = {"null": None, "none": None, "true": True, "false": False}
    if text.lower() in words:
        return words[text.lower()]
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _split_call(text: str) -> Tuple[str, Tuple[Any, ...]]:
    """`name(a, b, ...)` → (name, (a, b, ...)); commas inside quotes do not split."""
    match = re.fullmatch(r"\s*([A-Za-z_]\w*)\s*\((.*)\)\s*", text, flags=re.S)
    if not match:
        raise ValueError(text)
    name, inner = match.groups()
    args, current, quote = [], "", None
    for char in inner:
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == ",":
            args.append(current)
            current = ""
            continue
        current += char
    if current.strip() or args:
        args.append(current)
    if any(not a.strip() for a in args):
        raise ValueError(text)
    return name, tuple(_literal(a) for a in args)


def parse_param(key: str, value: Any) -> Param:
    """Parse one space entry; raises ConfigError naming `tune.space.<key>`."""
    where = f"tune.space.{key}"
    if not isinstance(value, str) or "(" not in value:
        if isinstance(value, (list, tuple)) or OmegaConf.is_list(value):
            raise ConfigError(f"{where}={list(value)}: write a list of values as choice(...) or grid(...)")
        return Param(key, None, (value,), str(value))
    text = value.strip()
    try:
        name, args = _split_call(text)
    except ValueError:
        raise ConfigError(f"{where}={text}: expected a distribution such as loguniform(1e-4, 3e-3) or choice(4, 8)") from None
    if name not in DISTRIBUTIONS:
        raise ConfigError(f"{where}={text}: unknown distribution '{name}'; expected one of {', '.join(DISTRIBUTIONS)}")
    arity, kind = DISTRIBUTIONS[name]
    if arity is not None and len(args) != arity:
        raise ConfigError(f"{where}={text}: {name} takes {arity} arguments, got {len(args)}")
    if kind == "values" and not args:
        raise ConfigError(f"{where}={text}: {name} needs at least one value")
    if kind == "range":
        if not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
            raise ConfigError(f"{where}={text}: {name} takes numbers")
        low, high = args[0], args[1]
        if not low < high:
            raise ConfigError(f"{where}={text}: expected low < high")
        if name.startswith("log") or name == "qloguniform":
            if low <= 0:
                raise ConfigError(f"{where}={text}: a log-scale range needs low > 0")
        if name in ("randint", "lograndint") and not all(isinstance(a, int) for a in args):
            raise ConfigError(f"{where}={text}: {name} takes integers")
        if len(args) == 3 and not args[2] > 0:
            raise ConfigError(f"{where}={text}: the step q must be positive")
    return Param(key, name, args, text)


def parse_space(space: Any) -> Dict[str, Param]:
    """The typed search space; keys a sweep owns (data, run.name, ...) are refused."""
    params = {}
    for key, value in _flatten(space or {}).items():
        bare = key.lstrip("+")
        for fixed in FIXED_KEYS:
            if bare == fixed or bare.startswith(fixed + "."):
                raise ConfigError(
                    f"tune.space.{key}: set by the sweep itself (trials share the prepared shards in "
                    f"data.output_dir and get their own run names); sweep training keys instead"
                )
        params[key] = parse_param(key, value)
    return params


def format_value(value: Any) -> str:
    """A value as Hydra's override grammar reads it back."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) or type(value).__name__.startswith("float"):
        return repr(float(value))
    if isinstance(value, int) or type(value).__name__.startswith("int"):
        return str(int(value))
    text = str(value)
    return text if text.replace("-", "").replace("_", "").replace(".", "").isalnum() else repr(text)


def trial_overrides(params: Dict[str, Param], config: Dict[str, Any]) -> List[str]:
    """A trial's overrides from the values Tune chose for it."""
    return [f"{key}={format_value(config[key])}" for key in params]


# ---------------------------------------------------------------------------------------------
# Checks before any trial starts

def _group_keys() -> set:
    return {p.name for p in CONF_DIR.iterdir() if p.is_dir()}


def _check_option(group: str, value: Any) -> None:
    if not (CONF_DIR / group / f"{value}.yaml").is_file():
        options = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
        raise ConfigError(f"'{value}' is not an option of the config group {group} ({', '.join(options)})")


def _apply(training: DictConfig, key: str, value: Any) -> None:
    """Apply one trial override to a composed training config the way Hydra would (struct mode: no new keys)."""
    if key.startswith("+"):
        OmegaConf.set_struct(training, False)
    OmegaConf.update(training, key.lstrip("+"), value, merge=True)
    OmegaConf.set_struct(training, True)


def check_trial(training: DictConfig, values: Dict[str, Any], base_overrides: Optional[List[str]]) -> JobConfig:
    """The training config of a trial with these values, typed and validated.

    A trial that swaps a config group (`model=...`) is composed for real from the base overrides, as
    the trial itself will be, so that the option's own values meet the schema and `validate`. Other
    values are applied to the composed base config, which is quicker and names a wrong key plainly.
    Without base overrides (launch/tune.py's first look, before Hydra hands over the command line;
    `sweep_from_hydra` checks again with them) a group's option is only checked to exist.
    """
    groups = _group_keys()
    swapped = [key for key in values if key.lstrip("+") in groups]
    for key in swapped:
        _check_option(key.lstrip("+"), values[key])
    if swapped and base_overrides is not None:
        return load_job_config(base_overrides + [f"{k}={format_value(v)}" for k, v in values.items()])
    cfg = training.copy()
    OmegaConf.set_struct(cfg, True)
    for key, value in values.items():
        if key not in swapped:
            _apply(cfg, key, value)
    # The composed nodes are typed by the schema already, so to_object gives its dataclasses (and
    # takes an eighth of to_job_config's fresh merge: this runs for every corner of the space).
    return validate(JobConfig(**OmegaConf.to_object(cfg)))


def _reason(exc: Exception) -> str:
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    if isinstance(exc, (ConfigKeyError, ConfigAttributeError)):
        return f"not a key of the training config ({one_line(exc)})"
    return str(exc) if isinstance(exc, ConfigError) else one_line(exc)


def space_corners(params: Dict[str, Param]) -> List[Tuple[str, Dict[str, Any]]]:
    """The trials a check tries, each with the words its error starts with: every key's ends and listed
    values alone, then all lows and all highs together."""
    corners = []
    for key, param in params.items():
        for value in param.corners():
            corners.append((f"tune.space.{key}: {param.text} gives {format_value(value)}", {key: value}))
    if params:
        for end in (0, -1):
            values = {key: param.corners()[end] for key, param in params.items()}
            corners.append(("tune.space: the trial " + " ".join(f"{k}={format_value(v)}" for k, v in values.items()), values))
    return corners


def check_space(training: DictConfig, params: Dict[str, Param], base_overrides: Optional[List[str]] = None) -> List[Tuple[str, JobConfig]]:
    """Every corner of the space (`space_corners`) applied to the training config; gives each one's words and config.

    Raises ConfigError as `tune.space.<key>: ...` for the first value the training config cannot
    take: an unknown key, a wrong type, a config group's option that is missing or does not
    compose, or a value `validate` rejects.
    """
    checked = []
    for words, values in space_corners(params):
        try:
            checked.append((words, check_trial(training, values, base_overrides)))
        except Exception as exc:  # noqa: BLE001 - every rejection ends as one line naming the key
            raise ConfigError(f"{words}: {_reason(exc)}") from None
    return checked


def to_sweep_config(cfg: DictConfig) -> SweepConfig:
    """The typed `tune` node of a composed sweep config."""
    values = OmegaConf.to_container(cfg.tune, resolve=True)  # interpolations resolve against the whole config
    space = values.pop("space", {})
    typed = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(SweepConfig), values))
    typed.space = space
    return typed


def validate_sweep(sweep: SweepConfig, job: JobConfig, params: Dict[str, Param]) -> None:
    """Cross-field rules of a sweep; raises ConfigError naming the first bad `tune.*` key."""
    require(bool(sweep.name) and "/" not in sweep.name, "tune.name", sweep.name, "expected a name without '/'")
    require(sweep.search in SEARCHES, "tune.search", sweep.search, f"expected one of {SEARCHES}")
    require(sweep.scheduler in SCHEDULERS, "tune.scheduler", sweep.scheduler, f"expected one of {SCHEDULERS}")
    require(sweep.metric in METRICS, "tune.metric", sweep.metric, f"expected a metric the training loop reports: {METRICS}")
    require(sweep.mode in ("min", "max"), "tune.mode", sweep.mode, "expected min or max")
    require(sweep.num_samples >= 1, "tune.num_samples", sweep.num_samples, "expected at least 1")
    require(sweep.max_concurrent_trials >= 1, "tune.max_concurrent_trials", sweep.max_concurrent_trials, "expected at least 1")
    require("://" not in sweep.output_dir, "tune.output_dir", sweep.output_dir, "expected a local directory")
    sampled = [p for p in params.values() if p.dist is not None]
    if sweep.search == "grid":
        for p in sampled:
            require(p.dist in ("grid", "choice"), f"tune.space.{p.key}", p.text, "grid search takes lists of values: grid(a, b, ...)")
    if sweep.search == "optuna":
        for p in sampled:
            require(not p.is_grid, f"tune.space.{p.key}", p.text, "Optuna samples values; write choice(...) instead of grid(...)")
    if sweep.scheduler == "asha":
        asha = sweep.asha
        require(asha.grace_period >= 1, "tune.asha.grace_period", asha.grace_period, "expected at least 1 step")
        require(
            asha.grace_period < job.run.max_steps, "tune.asha.grace_period", asha.grace_period,
            f"expected fewer steps than run.max_steps={job.run.max_steps}, or no trial can be stopped early",
        )
        require(asha.reduction_factor >= 2, "tune.asha.reduction_factor", asha.reduction_factor, "expected at least 2")
    if sweep.scheduler == "pbt":
        pbt = sweep.pbt
        require(sweep.search == "random", "tune.search", sweep.search, "PBT draws its own population; use tune.search=random")
        require(
            pbt.perturbation_interval >= job.run.checkpoint_interval and pbt.perturbation_interval % job.run.checkpoint_interval == 0,
            "tune.pbt.perturbation_interval", pbt.perturbation_interval,
            f"expected a multiple of run.checkpoint_interval={job.run.checkpoint_interval}, so that exploiting has a checkpoint to clone",
        )
        require(0 < pbt.quantile_fraction <= 0.5, "tune.pbt.quantile_fraction", pbt.quantile_fraction, "expected a fraction in (0, 0.5]")
        require(0 <= pbt.resample_probability <= 1, "tune.pbt.resample_probability", pbt.resample_probability, "expected a probability")
        require(bool(sampled), "tune.space", "{}", "PBT needs at least one distribution to explore")
        for p in sampled:
            require(not p.is_grid, f"tune.space.{p.key}", p.text, "PBT explores by sampling; write choice(...) instead of grid(...)")
            require(
                p.key.lstrip("+") in PBT_EXPLORABLE, f"tune.space.{p.key}", p.text,
                "PBT cannot explore it: a clone resumes the better trial's checkpoint, which brings that trial's optimizer "
                f"settings, model, ZeRO stage and batch layout; PBT explores {', '.join(PBT_EXPLORABLE)} (pin other keys with a plain value)",
            )
        require(sweep.num_samples >= 2, "tune.num_samples", sweep.num_samples, "PBT needs a population of at least 2")


def training_node(cfg: DictConfig) -> DictConfig:
    """The training part of a composed sweep config (what `conf/config.yaml` composes)."""
    return OmegaConf.masked_copy(cfg, list(JobConfig.__dataclass_fields__))


@dataclass
class Sweep:
    """A checked sweep: its config, the base training config and the overrides that compose it."""

    config: SweepConfig
    job: JobConfig
    params: Dict[str, Param]
    # The command-line overrides of the training config; every trial adds its own to these.
    base_overrides: List[str]
    # Every corner of the space (`space_corners`) with its training config: the runner checks them
    # against the prepared shards before any trial starts.
    corners: List[Tuple[str, JobConfig]] = field(default_factory=list)

    @property
    def trial_count(self) -> int:
        grid = math.prod(len(p.args) for p in self.params.values() if p.is_grid)
        return grid * self.config.num_samples


def check_sweep(cfg: DictConfig, base_overrides: Optional[List[str]] = None) -> Sweep:
    """The check of `launch/tune.py`: training config, sweep keys, space syntax and every corner of the space.

    `base_overrides` are the command line's training overrides (see `check_trial` for what their
    absence leaves unchecked).
    """
    job = validate(to_job_config(cfg))
    sweep = to_sweep_config(cfg)
    params = parse_space(sweep.space)
    validate_sweep(sweep, job, params)
    if sweep.search == "grid":
        params = {key: param.enumerated() for key, param in params.items()}
    corners = check_space(training_node(cfg), params, base_overrides)
    return Sweep(sweep, job, params, list(base_overrides or []), corners)


def is_sweep_override(override: str) -> bool:
    """Whether a command-line override belongs to the sweep (`tune.*`, `tune=...`, `tune/space=...`) rather than training."""
    return re.split(r"[./=]", override.lstrip("+~"), maxsplit=1)[0] == "tune"


def load_sweep(overrides: List[str] | None = None) -> Sweep:
    """Compose `conf/tune.yaml` with overrides and check it, as `launch/tune.py` does."""
    register_sweep_schema()
    overrides = list(overrides or [])
    try:
        cfg = compose(overrides, config_name="tune")
    except Exception as exc:  # noqa: BLE001 - composition errors become the one line hydra_entry prints
        raise ConfigError(one_line(exc)) from None
    return check_sweep(cfg, base_overrides(overrides))


def base_overrides(overrides: List[str]) -> List[str]:
    """The training overrides among a sweep's command line (not `tune.*`, not `hydra.*`)."""
    return [o for o in overrides if not is_sweep_override(o) and not o.lstrip("+~").startswith("hydra.")]


def sweep_from_hydra(cfg: DictConfig) -> Sweep:
    """The checked sweep inside `@hydra.main`, with the command line's training overrides as its base."""
    from hydra.core.hydra_config import HydraConfig

    return check_sweep(cfg, base_overrides(list(HydraConfig.get().overrides.task)))
