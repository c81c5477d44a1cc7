"""Submitting a job: its config composed here, the preflight run on the cluster, then `launch/<kind>.py` itself."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import List, TextIO

from framework.submit.jobs import (
    PROJECT_ROOT,
    compose_job,
    entrypoint,
    runtime_env,
    shared_storage,
    submission_id,
)
from framework.submit.preflight import run_preflight


def submit(
    client,
    kind: str,
    overrides: List[str],
    *,
    python: str = "python",
    preflight: bool = True,
    project_root: Path = PROJECT_ROOT,
    log: TextIO = sys.stderr,
) -> str:
    """Compose the overrides, run the preflight on the cluster, then submit `launch/<kind>.py`; gives the submission id."""
    overrides = list(overrides)
    # Hydra flags (--cfg, -m, ...) change what the script does; they are forwarded, not checked here.
    if any(o.startswith("-") for o in overrides):
        print("submit: Hydra flags given; forwarding them without the config and storage checks", file=log)
    else:
        # Schema only here: the launch script's own check may look for files that exist only on the
        # cluster (a model folder, a checkpoint), so it runs there, in the preflight.
        shared_storage(kind, compose_job(kind, overrides, check=False, project_root=project_root))
        if preflight:
            run_preflight(client, kind, overrides, python=python, project_root=project_root, log=log)
    return client.submit_job(
        entrypoint=entrypoint(kind, overrides, python),
        runtime_env=runtime_env(project_root),
        submission_id=submission_id(kind),
        metadata={"kind": kind, "overrides": shlex.join(overrides)},
    )
