"""A sweep's search space: Hydra's override grammar, read by Hydra's own parser, as Ray Tune domains.

Every entry of `tune.space` is an override name and a value that Hydra's parser reads as it reads
`python launch/train.py <key>=<value> -m`; the sweep maps it the way hydra-optuna-sweeper does:

    optim.lr: tag(log, interval(3e-4, 1e-2))     log-uniform float in [a, b]     tune.loguniform(a, b)
    optim.weight_decay: interval(0.0, 0.2)       uniform float in [a, b]         tune.uniform(a, b)
    optim.warmup_steps: int(interval(2, 20))     integer in [a, b], b included   tune.randint(a, b + 1)
    run.micro_batch_size: tag(log, int(interval(1, 8)))   log-uniform integer    tune.lograndint(a, b + 1)
    run.micro_batch_size: choice(2, 4)           one of the values               tune.choice (grid search: tune.grid_search)
    optim.warmup_steps: range(0, 20, 5)          0, 5, 10, 15 (b excluded)       tune.choice (grid search: tune.grid_search)
    deepspeed: choice(zero1, zero2)              a config group, by option name
    optim.beta1: 0.9                             a plain value pins the key for every trial

`interval(a, b)` gives floats even when a and b are integers; `int(...)` makes an integer range.
Nothing here imports Ray at module level, so checking a sweep on the command line stays quick.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Tuple

from omegaconf import DictConfig, OmegaConf

from framework.config import ConfigError, one_line

GRAMMAR = (
    "expected Hydra's sweep grammar: choice(a, b), range(start, stop, step), interval(a, b), int(interval(a, b)), "
    "tag(log, interval(a, b)) or a plain value"
)


@dataclass(frozen=True)
class Param:
    """One entry of the space: a sweep of a training override, or a value it pins."""

    key: str  # the override's key as written; a leading `+` adds a key the schema leaves open (model.hf_config.*)
    text: str  # the value as written, for messages and the sweep's fingerprint
    kind: str  # pinned | choice | range | interval
    values: Tuple[Any, ...]  # pinned: (value,); choice and range: every value; interval: (start, end)
    log: bool = False
    integer: bool = False

    @property
    def name(self) -> str:
        """The config key the entry sets."""
        return self.key.lstrip("+")

    @property
    def sampled(self) -> bool:
        return self.kind != "pinned"

    @property
    def listed(self) -> bool:
        """Whether the entry is a list of values (what a grid search enumerates)."""
        return self.kind in ("choice", "range")

    def corners(self) -> List[Any]:
        """The values a check must try: every listed value, both ends of an interval, the pinned value."""
        return list(self.values)

    def domain(self, grid: bool = False) -> Any:
        """The Ray Tune domain of the entry (a pinned value as it is); under grid search a list is a grid axis."""
        from ray import tune

        if self.kind == "pinned":
            return self.values[0]
        if self.listed:
            return tune.grid_search(list(self.values)) if grid else tune.choice(list(self.values))
        start, end = self.values
        if self.integer:  # Tune's integer ranges leave out their upper bound; Hydra's interval includes it
            return tune.lograndint(start, end + 1) if self.log else tune.randint(start, end + 1)
        return tune.loguniform(start, end) if self.log else tune.uniform(start, end)

    def override(self, value: Any) -> str:
        """The command-line override that gives this key `value`."""
        return f"{self.key}={format_value(value)}"


def format_value(value: Any) -> str:
    """A value as Hydra's override grammar reads it back (Tune's numpy numbers as plain ones)."""
    from hydra.core.override_parser.types import Transformer

    return Transformer.str(plain(value))


def plain(value: Any) -> Any:
    """Tune's numpy scalars (randint draws numpy integers) as Python numbers, which OmegaConf and Hydra take."""
    return value.item() if hasattr(value, "item") and type(value).__module__ == "numpy" else value


def parse_param(key: str, value: Any) -> Param:
    """One space entry read by Hydra's override parser; raises ConfigError naming `tune.space.<key>`."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, OverrideType, RangeSweep
    from hydra.errors import HydraException

    written = value if isinstance(value, str) else format_value(OmegaConf.to_container(value) if OmegaConf.is_config(value) else value)
    where = f"tune.space.{key}={written}"
    try:
        override = OverridesParser.create().parse_override(f"{key}={written}")
    except HydraException as exc:
        raise ConfigError(f"{where}: {one_line(exc)}; {GRAMMAR}") from None
    if override.type not in (OverrideType.CHANGE, OverrideType.ADD) or override.package is not None:
        raise ConfigError(f"tune.space.{key}: expected a config key, or +key for one the schema leaves open")
    swept = override.value()
    if not override.is_sweep_override():
        return Param(key, written, "pinned", (swept,))
    tags = set(getattr(swept, "tags", ()))
    if isinstance(swept, IntervalSweep):
        if not tags <= {"log"}:
            raise ConfigError(f"{where}: unknown tag {', '.join(sorted(tags - {'log'}))}; an interval takes tag(log, ...) only")
        start, end = swept.start, swept.end
        if not start < end:
            raise ConfigError(f"{where}: expected start < end")
        if "log" in tags and start <= 0:
            raise ConfigError(f"{where}: a log-scale interval needs start > 0")
        integer = isinstance(start, int) and isinstance(end, int)
        return Param(key, written, "interval", (start, end), log="log" in tags, integer=integer)
    if isinstance(swept, (ChoiceSweep, RangeSweep)):
        if tags:
            raise ConfigError(f"{where}: a list of values takes no tag; tag(log, ...) takes an interval")
        values = tuple(override.sweep_iterator())
        if not values:
            raise ConfigError(f"{where}: the range holds no values")
        return Param(key, written, "choice" if isinstance(swept, ChoiceSweep) else "range", values)
    raise ConfigError(f"{where}: cannot be sampled; {GRAMMAR}")


def flatten(space: Any, prefix: str = "") -> Dict[str, Any]:
    """`{optim: {lr: x}}` (what `+tune.space.optim.lr=x` makes) and `{optim.lr: x}` (a preset's keys) both as `{optim.lr: x}`."""
    flat: Dict[str, Any] = {}
    for key, value in space.items():
        name = f"{prefix}{key}"
        if isinstance(value, (dict, DictConfig)):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def parse_space(space: Mapping[str, Any]) -> Dict[str, Param]:
    """Every entry of `tune.space`, parsed; the last entry of a key wins (a command line's over its preset's)."""
    return {key: parse_param(key, value) for key, value in flatten(space or {}).items()}


def trial_overrides(params: Mapping[str, Param], values: Mapping[str, Any]) -> List[str]:
    """A trial's overrides from the values Tune chose for it (a pinned key's value included)."""
    return [param.override(values[key]) for key, param in params.items()]


def space_corners(params: Mapping[str, Param]) -> List[Tuple[str, Dict[str, Any]]]:
    """The trials a check tries, each with the words its error starts with: every sampled key's values
    (an interval's ends) alone, then all first and all last values together; pinned keys in all of them."""
    pinned = {key: p.values[0] for key, p in params.items() if not p.sampled}
    sampled = {key: p for key, p in params.items() if p.sampled}

    def trial(values: Dict[str, Any]) -> str:
        return "tune.space: the trial " + " ".join(f"{k}={format_value(v)}" for k, v in values.items())

    tried: List[Tuple[str, Dict[str, Any]]] = []
    for key, param in sampled.items():
        for value in param.corners():
            tried.append((f"tune.space.{key}: {param.text} gives {format_value(value)}", {**pinned, key: value}))
    if len(sampled) > 1:
        for end in (0, -1):
            values = {**pinned, **{key: p.corners()[end] for key, p in sampled.items()}}
            tried.append((trial(values), values))
    if pinned and not sampled:
        tried.append((trial(pinned), pinned))
    return [(words, values) for i, (words, values) in enumerate(tried) if values not in [v for _, v in tried[:i]]]
