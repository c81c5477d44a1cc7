"""The Hydra entry point every launch script uses, in one shape: composed tree → typed root → run.

    from framework.cli import entry
    from framework.train.config import TRAIN

    @entry(TRAIN)
    def main(root: TrainRoot) -> None:
        run(root)

Before Hydra starts the job, the command line is composed and checked (`Job.check_composed`), so a
misspelt key, a wrong type or an impossible combination exits with `ConfigError: ...` (status 2)
before any cluster work. Inside the job, what only the job can find out (shards that do not match, a
cluster too small, a run resumed with other settings) ends the same way; a run that failed for a
reason its user can act on ends as `RunError: ...`, status 1. Hydra's own flags (`--cfg job`,
`--help`, `-m`, ...) pass straight through to `hydra.main`.
"""

from __future__ import annotations

import functools
import sys
from typing import Any, Callable

from omegaconf import DictConfig

from framework.config import (
    CONF_DIR,
    ConfigError,
    Job,
    RunError,
    one_line,
    with_default_groups,
)


def entry(job: Job) -> Callable[[Callable[[Any], Any]], Callable[[], Any]]:
    """Decorate a launch script's `main(root)`: fail in one line on a bad config, then run it under Hydra with `job.load(cfg)`."""

    def decorate(task: Callable[[Any], Any]) -> Callable[[], Any]:
        import hydra

        @functools.wraps(task)
        def main() -> Any:
            sys.argv[1:] = with_default_groups(sys.argv[1:], job.default_groups)
            argv = sys.argv[1:]
            if not any(a.startswith("-") for a in argv):
                overrides = [a for a in argv if not a.startswith(("hydra.", "+hydra.", "~hydra."))]
                try:
                    job.check_composed(job.compose(overrides))
                except Exception as exc:  # noqa: BLE001 - every composition error ends here, as one line
                    print(f"ConfigError: {one_line(exc)}", file=sys.stderr)
                    raise SystemExit(2) from None
            return hydra.main(config_path=str(CONF_DIR), config_name=job.config_name, version_base="1.3")(loaded)()

        def loaded(cfg: DictConfig) -> Any:
            try:
                return task(job.load(cfg))
            except (ConfigError, RunError) as exc:
                print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
                raise SystemExit(2 if isinstance(exc, ConfigError) else 1) from None

        # `launch/submit.py` and tests check an entry point's overrides the same way it does.
        main.job = job  # type: ignore[attr-defined]
        return main

    return decorate
