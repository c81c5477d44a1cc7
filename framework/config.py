"""The shared config helpers: compose `conf/`, type a node against its schema, one-line errors, the Hydra entry.

One rule for defaults: **the YAML under `conf/` holds every value; a schema holds types and checks.**
Every leaf of every schema dataclass is `MISSING`, so a value a preset forgets fails at composition
instead of falling back to a second, silent copy (`tests/test_config.py` proves both halves). Each
schema lives beside the module that reads it (`framework/model.py`, `framework/data/config.py`,
`framework/train/config.py`, `framework/tune/config.py`, ...); `framework/schema.py` assembles the
training tree of `conf/config.yaml` from them.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
import sysconfig
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, Tuple

from omegaconf import MISSING, DictConfig, OmegaConf

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


def optional_group(schema: type) -> Any:
    """The field of an optional config group (absent from the defaults list until selected): None until then."""
    return dataclasses.field(default=None, metadata={"optional_group": schema})


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
    """Compose `conf/<config_name>.yaml` with overrides, as the launch scripts do, without starting a job."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_schema(config_name)
    # Inside a running @hydra.main (a benchmark composing its trials' configs) Hydra is already
    # initialised; set it aside for this composition and put it back afterwards.
    outer = GlobalHydra.instance().hydra
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return hydra_compose(config_name=config_name, overrides=list(overrides or []))
    finally:
        if outer is not None:
            GlobalHydra.instance().clear()
            GlobalHydra.instance().initialize(outer)


# Primary config → the module that registers its schema on import (the benchmarks type their own node).
SCHEMA_MODULES = {
    "config": "framework.schema", "export": "framework.export", "serve": "framework.serve.config", "compress": "framework.compress",
}


def register_schema(config_name: str) -> None:
    """Register the schema `conf/<config_name>.yaml` names first in its defaults (by importing its module)."""
    import importlib

    if config_name in SCHEMA_MODULES:
        importlib.import_module(SCHEMA_MODULES[config_name])


def with_default_groups(overrides: Sequence[str], default_groups: Sequence[str]) -> list:
    """`default_groups` (`tune=asha`) ahead of the overrides, each unless the overrides select that group themselves."""
    def selects(group: str) -> bool:
        return any(o.lstrip("+~").split("=", 1)[0] == group for o in overrides)

    return [d for d in default_groups if not selects(d.split("=", 1)[0])] + list(overrides)


def hydra_entry(
    config_name: str = "config", check: Callable[[DictConfig], Any] | None = None, default_groups: Sequence[str] = (),
) -> Callable:
    """Decorate a launch script's `main(cfg: DictConfig)`: fail in one line on a bad config, then run Hydra.

    The overrides are composed and checked first (`check`, by default the training tree's
    `framework.schema.check`), so that a misspelt key, a wrong type or an impossible combination
    exits with `ConfigError: ...` before any cluster work. `default_groups` (`tune=asha` for
    launch/tune.py) are selected unless the command line selects that group itself. Hydra's own flags
    (`--cfg job`, `--help`, `-m`, ...) pass straight through to `hydra.main`.
    """

    def decorate(task: Callable[[DictConfig], Any]) -> Callable[[], Any]:
        import hydra

        @functools.wraps(task)
        def main() -> Any:
            check_config = check or _check_training_tree
            sys.argv[1:] = with_default_groups(sys.argv[1:], default_groups)
            argv = sys.argv[1:]
            if not any(a.startswith("-") for a in argv):
                overrides = [a for a in argv if not a.startswith(("hydra.", "+hydra.", "~hydra."))]
                try:
                    check_config(compose(overrides, config_name))
                except Exception as exc:  # noqa: BLE001 - every composition error ends here, as one line
                    print(f"ConfigError: {one_line(exc)}", file=sys.stderr)
                    raise SystemExit(2) from None
            register_schema(config_name)
            return hydra.main(config_path=str(CONF_DIR), config_name=config_name, version_base="1.3")(guarded)()

        @functools.wraps(task)
        def guarded(cfg: DictConfig) -> Any:
            # What only the job can find out (shards that do not match, a cluster too small, a run
            # resumed with other settings) ends the same way as a bad override: one line, exit 2;
            # a run that failed for a reason its user can act on, in one line too, exit 1.
            try:
                return task(cfg)
            except (ConfigError, RunError) as exc:
                print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
                raise SystemExit(2 if isinstance(exc, ConfigError) else 1) from None

        # Tests and manifests check an entry point's overrides the same way it does.
        main.config_name, main.check, main.default_groups = config_name, check or _check_training_tree, list(default_groups)
        return main

    return decorate


def _check_training_tree(cfg: DictConfig) -> None:
    from framework.schema import check

    check(cfg)


def absolute(path: str) -> str:
    """Make a local path absolute (Ray workers run in other directories); URIs pass through."""
    return path if "://" in path else os.path.abspath(os.path.expanduser(path))
