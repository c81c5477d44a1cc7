"""What a submitted job is: its kind's launch script (and its Job), its config composed and checked here, the
storage its nodes must share, its entrypoint and the runtime environment that ships this checkout."""

from __future__ import annotations

import importlib.util
import logging
import os
import shlex
import time
import uuid
from pathlib import Path
from typing import Callable, Dict, List

from omegaconf import DictConfig, OmegaConf

PROJECT_ROOT = Path(__file__).resolve().parent.parent.parent
JOB_KINDS = ("prep", "train", "tune", "export", "serve")

# Never uploaded with the job. Patterns are gitignore-style relative to the project root: the
# leading "/" keeps `framework/data/` (a package) while leaving out the prepared `data/` folder.
WORKING_DIR_EXCLUDES = [
    "/.git/", "/.venv/", "/venv/", "/outputs/", "/data/", "/.whl/", "/multirun/",
    "__pycache__/", "*.egg-info/", ".pytest_cache/", "*.pyc",
]

# Per job kind, the config keys naming storage that every node must share: shards written by prep
# tasks and read by every Train worker; checkpoints written by every worker and read by the driver;
# a sweep's trials and its promoted model; an export that serving reads. Serving only reads its
# model, which launch/serve.py's own check finds (or not) in the preflight.
SHARED_STORAGE_KEYS = {
    "prep": ("data.output_dir",),
    "train": ("data.output_dir", "run.storage_path"),
    "tune": ("data.output_dir", "tune.storage_path", "tune.output_dir"),
    "export": ("export.output_dir",),
    "serve": (),
}

class SubmitError(RuntimeError):
    """A problem the user can fix (address, token, config, storage); the message is one line."""


class StorageError(SubmitError):
    """Configured storage that the cluster's nodes cannot all write and see."""


class JobTimeout(SubmitError):
    """The job ran past the --timeout given to `follow`; it has been stopped."""


def load_entry(kind: str, project_root: Path = PROJECT_ROOT) -> Callable:
    """The `main` of `launch/<kind>.py`, carrying its `Job` (framework/cli.py: `entry`)."""
    if kind not in JOB_KINDS:
        raise SubmitError(f"{kind}: not a job kind; expected one of {', '.join(JOB_KINDS)}")
    script = project_root / "launch" / f"{kind}.py"
    if not script.is_file():
        raise SubmitError(f"launch/{kind}.py: no such job script in {project_root}")
    spec = importlib.util.spec_from_file_location(f"launch_{kind}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def compose_job(kind: str, overrides: List[str], check: bool = True, project_root: Path = PROJECT_ROOT) -> DictConfig:
    """Compose the overrides as `launch/<kind>.py` does, and (with `check`) run its own check; ConfigError in one line."""
    from framework.config import ConfigError, one_line

    job = load_entry(kind, project_root).job
    hydra_free = [o for o in overrides if not o.startswith(("hydra.", "+hydra.", "~hydra."))]
    try:
        cfg = job.compose(hydra_free)
        if check:
            job.check_composed(cfg)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - Hydra and OmegaConf errors become the same one line
        raise ConfigError(one_line(exc)) from None
    return cfg


def shared_storage(kind: str, cfg: DictConfig) -> Dict[str, str]:
    """The storage this job's nodes must share, by config key; unset or relative local paths are refused."""
    paths, local = {}, []
    for key in SHARED_STORAGE_KEYS[kind]:
        value = OmegaConf.select(cfg, key, default=None)
        paths[key] = "" if value is None else str(value)
        if "://" not in paths[key] and not os.path.isabs(paths[key]):
            local.append(f"{key}={paths[key]}" if paths[key] else f"{key} (unset)")
    if local:
        # A relative path (or a default under outputs/) resolves inside the job's temporary working
        # directory on one node: other nodes never see it, and it is gone after the job.
        example = local[0].split("=")[0].split(" ")[0]
        raise StorageError(
            f"{', '.join(local)}: not storage the cluster's nodes share; give absolute paths every node mounts "
            f"({example}=/mnt/shared/...) or object-store URIs ({example}=s3://bucket/...)"
        )
    return paths


def entrypoint(kind: str, overrides: List[str], python: str = "python") -> str:
    """The shell command the cluster runs; each override is quoted so Hydra receives it unchanged."""
    return shlex.join([python, f"launch/{kind}.py", *overrides])


def runtime_env(project_root: Path = PROJECT_ROOT) -> Dict:
    """This checkout as the working directory of the job and of every task and actor it starts."""
    # Ray narrates the packaging of the working directory (and warns about .git and .venv, which
    # are excluded here anyway); a failed upload still raises.
    logging.getLogger("ray._private.runtime_env").setLevel(logging.ERROR)
    logging.getLogger("ray.dashboard.modules.dashboard_sdk").setLevel(logging.WARNING)
    logging.getLogger("ray.dashboard.modules.job.sdk").setLevel(logging.WARNING)
    return {
        "working_dir": str(project_root),
        "excludes": list(WORKING_DIR_EXCLUDES),
        # Unbuffered output so that followed logs show each step as it happens.
        "env_vars": {"PYTHONUNBUFFERED": "1"},
    }


def submission_id(kind: str) -> str:
    return f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
