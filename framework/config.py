"""The ground floor of the config: compose `conf/`, type a node against its schema, one-line errors, jobs and registries.

It imports nothing of the project: every package builds on it (`framework/cli.py` is the Hydra entry
point on top of it).

One rule for defaults: **the YAML under `conf/` holds every value; a schema holds types and checks.**
Every leaf of every schema dataclass is `MISSING`, so a value a preset forgets fails at composition
instead of falling back to a second, silent copy (`tests/test_config.py` proves both halves). Each
schema lives beside the module that reads it (`framework/model.py`, `framework/data/config.py`,
`framework/train/config.py`, `framework/tune/config.py`, ...); each job's root schema (`TrainRoot`,
`ExportRoot`, `ServeRoot`, `CompressRoot`) sits beside the package that runs the job.
"""

from __future__ import annotations

import dataclasses
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Generic, Iterator, Optional, Sequence, Tuple, TypeVar

from omegaconf import MISSING, DictConfig, OmegaConf

T = TypeVar("T")

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

# `${stdlib:}` points at the running Python's standard library: real text every machine has.
OmegaConf.register_new_resolver("stdlib", lambda: sysconfig.get_paths()["stdlib"], replace=True)


class ConfigError(ValueError):
    """A config value a job cannot run with; the message names the key and what was expected."""


class RunError(RuntimeError):
    """A run that started and then failed for a reason its user can act on; the message says what to do."""


def register(name: str, schema: type) -> None:
    """Register a structured-config schema with Hydra's ConfigStore; a primary config names it first in its defaults."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=name, node=schema)


def typed(schema: type, node: Any, group: str, example: str = "VALUE") -> Any:
    """`node` (a DictConfig or dict) typed as a `schema` instance; OmegaConf's errors become one ConfigError line naming `<group>.<key>`.

    `group` is the node's place in its config ("" for a root): it prefixes the keys errors name.
    """
    from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

    prefix = f"{group}." if group else ""
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), node))
    except MissingMandatoryValue as exc:
        raise ConfigError(f"{prefix}{exc.full_key}: missing; expected e.g. {prefix}{exc.full_key}={example}") from None
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{prefix}{one_line(exc)}") from None


def require(ok: bool, key: str, value: Any, expected: str) -> None:
    """Raise the one-line ConfigError `key=value: expected` unless `ok`."""
    if not ok:
        raise ConfigError(f"{key}={value}: {expected}")


def schema_defaults(schema: type, prefix: str = "") -> Iterator[Tuple[str, Any]]:
    """(dotted field, default) for every leaf of `schema` that carries a default other than MISSING.

    Nested dataclasses (built by `default_factory`) are structure, not values, and are walked into;
    an optional config group that is None until selected (`tune`) is structure too.
    """
    for f in dataclasses.fields(schema):
        name = f"{prefix}{f.name}"
        if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            value = f.default_factory()  # type: ignore[misc]
            if dataclasses.is_dataclass(value):
                yield from schema_defaults(type(value), f"{name}.")
            else:
                yield name, value
        elif f.default is None and f.metadata.get("optional_group"):
            continue
        elif f.default is not MISSING and f.default is not dataclasses.MISSING:
            yield name, f.default


def optional_group() -> Any:
    """The field of an optional config group (absent from the defaults list until selected): None until then."""
    return dataclasses.field(default=None, metadata={"optional_group": True})


def last_line(exc: BaseException) -> str:
    """The line of a multi-line library error that says what is wrong (transformers puts it last)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def one_line(exc: BaseException) -> str:
    """Any error as one line: Hydra/OmegaConf errors (which span several lines) reduced to the line that names the problem."""
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(exc, (ConfigError, RunError)):
        return str(exc)
    cause = exc
    while cause.__cause__ is not None and not isinstance(cause, OmegaConfBaseException):
        cause = cause.__cause__
    if isinstance(cause, OmegaConfBaseException):
        key = getattr(cause, "full_key", None)
        msg = str(getattr(cause, "msg", None) or cause).strip().splitlines()[0]
        return f"{key}: {msg}" if key else msg
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return " ".join(lines[:3]) if lines else type(exc).__name__


def compose(overrides: Sequence[str] | None = None, config_name: str = "config") -> DictConfig:
    """Compose `conf/<config_name>.yaml` with overrides, as the launch scripts do, without starting a job.

    The root schema the primary config names first in its defaults registers itself when its module is
    imported (`register`); a caller holds that module already, for its `Job`. Inside a running
    @hydra.main (a benchmark composing its trials' configs) Hydra is already initialised: it is set
    aside for this composition and put back afterwards.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    outer = GlobalHydra.instance().hydra
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return hydra_compose(config_name=config_name, overrides=list(overrides or []))
    finally:
        if outer is not None:
            GlobalHydra.instance().clear()
            GlobalHydra.instance().initialize(outer)


def with_default_groups(overrides: Sequence[str], default_groups: Sequence[str]) -> list:
    """`default_groups` (`tune=asha`) ahead of the overrides, each unless the overrides select that group themselves."""
    def selects(group: str) -> bool:
        return any(o.lstrip("+~").split("=", 1)[0] == group for o in overrides)

    return [d for d in default_groups if not selects(d.split("=", 1)[0])] + list(overrides)


@dataclass(frozen=True)
class Job:
    """A job kind's primary config and how its composed tree becomes what the job runs on.

    Every entry point has one shape (framework/cli.py): compose `conf/<config_name>.yaml`, `load` it
    into the typed, validated root (or the plan) the job's `run` takes, then run. `check` is what runs
    before Hydra starts the job, on the composition alone (default: `load`); `default_groups` are
    selected unless the command line selects that group itself.
    """

    config_name: str
    load: Callable[[DictConfig], Any]
    check: Optional[Callable[[DictConfig], Any]] = None
    default_groups: Tuple[str, ...] = ()

    def check_composed(self, cfg: DictConfig) -> None:
        """The job's check of a composition (before any cluster work): raises ConfigError naming the key."""
        (self.check or self.load)(cfg)

    def compose(self, overrides: Sequence[str] = ()) -> DictConfig:
        """The overrides composed as this job's entry point composes them (its default groups included)."""
        return compose(with_default_groups(list(overrides), self.default_groups), self.config_name)

    def from_overrides(self, overrides: Sequence[str] = ()) -> Any:
        """What the job runs on for these command-line overrides: composed and loaded as its entry point does, without Hydra's job."""
        return self.load(self.compose(overrides))


class Registry(Generic[T]):
    """Names → implementations (methods, schedulers, benchmarks), filled by `@registry.register(name)`.

    A name the registry lacks is refused in one line naming `key`, the config key that chose it, and
    the names it has: a new method is a config entry plus one registered function, never an if/elif.
    """

    def __init__(self, key: str) -> None:
        self.key = key
        self._entries: Dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(entry: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.key}: {name} is registered twice")
            self._entries[name] = entry
            return entry

        return add

    def get(self, name: str) -> T:
        require(name in self._entries, self.key, name, f"expected one of {self.names()}")
        return self._entries[name]

    def names(self) -> Tuple[str, ...]:
        return tuple(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries


def absolute(path: str) -> str:
    """Make a local path absolute (Ray workers run in other directories); URIs pass through."""
    return path if "://" in path else os.path.abspath(os.path.expanduser(path))
