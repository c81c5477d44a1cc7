"""Run a job kind (prep, train, tune, export, serve) on a Ray cluster through Ray's Jobs API.

The job is `python launch/<kind>.py <overrides>` with this checkout as its working directory, so a
cluster runs exactly the code and configs of the submitting machine. Before the job is submitted,
the overrides are composed here (a misspelt key fails at once), and a small preflight job on the
cluster runs the launch script's own check where the cluster's files are, then has every node write
and read back the configured storage: a path that is not one place every node shares fails there,
in one line, instead of half-way through training.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import re
import shlex
import sys
import time
import uuid
from pathlib import Path
from typing import Callable, Dict, List, Optional, TextIO, Tuple

from omegaconf import DictConfig, OmegaConf

PROJECT_ROOT = Path(__file__).resolve().parent.parent
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

PREFLIGHT_TIMEOUT_S = 240.0  # the whole preflight job: runtime-env setup, config check, storage probe
NODE_PROBE_TIMEOUT_S = 60.0  # one node's answer; an object store that does not answer ends here


class SubmitError(RuntimeError):
    """A problem the user can fix (address, token, config, storage); the message is one line."""


class StorageError(SubmitError):
    """Configured storage that the cluster's nodes cannot all write and see."""


class JobTimeout(SubmitError):
    """The job ran past the --timeout given to `follow`; it has been stopped."""


# ---------------------------------------------------------------------------------------------
# Connecting

def dashboard_url(address: Optional[str]) -> str:
    """The Jobs API URL from --address, else RAY_API_SERVER_ADDRESS, else an HTTP RAY_ADDRESS."""
    if address and (address.startswith("ray://") or address == "auto"):
        raise SubmitError(f"--address {address}: expected the dashboard's HTTP address, e.g. http://head:8265")
    # RAY_ADDRESS often holds a GCS address (head:6379) or ray:// for other tools; only http(s) counts.
    from_env = os.environ.get("RAY_API_SERVER_ADDRESS") or (
        os.environ.get("RAY_ADDRESS") if os.environ.get("RAY_ADDRESS", "").startswith("http") else None
    )
    value = address or from_env
    if not value:
        raise SubmitError("no cluster address: pass --address http://HEAD:8265 or set RAY_API_SERVER_ADDRESS")
    return (value if "://" in value else f"http://{value}").rstrip("/")


def read_token(token_file: Optional[str] = None) -> Tuple[Optional[str], str]:
    """The cluster's auth token and where it came from: --token-file, else Ray's own order.

    Ray looks in RAY_AUTH_TOKEN, then the file RAY_AUTH_TOKEN_PATH names, then ~/.ray/auth_token.
    """
    if token_file:
        return _read_token_file(token_file, "--token-file"), f"--token-file {token_file}"
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip(), "RAY_AUTH_TOKEN"
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        path = os.environ["RAY_AUTH_TOKEN_PATH"]
        return _read_token_file(path, "RAY_AUTH_TOKEN_PATH"), f"RAY_AUTH_TOKEN_PATH={path}"
    default = Path.home() / ".ray" / "auth_token"
    token = default.read_text().strip() if default.is_file() else ""
    return token or None, str(default)


def _read_token_file(path: str, source: str) -> str:
    # Like Ray, an explicitly named token file that cannot be read is an error, not a fallback.
    try:
        token = Path(path).expanduser().read_text().strip()
    except OSError as exc:
        raise SubmitError(f"{source}={path}: cannot read the token file ({exc.strerror})") from None
    if not token:
        raise SubmitError(f"{source}={path}: the token file is empty")
    return token


def connect(address: Optional[str] = None, token_file: Optional[str] = None):
    """A JobSubmissionClient for the cluster, sending the token as `Authorization: Bearer` when there is one.

    Ray's client only attaches a token when this process runs with RAY_AUTH_MODE=token; the header is
    set here instead so that submitting needs nothing but the token itself. A cluster without token
    authentication ignores the header.
    """
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    url = dashboard_url(address)
    token, source = read_token(token_file)
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        return JobSubmissionClient(url, headers=headers)
    except AuthenticationError:
        if token:
            raise SubmitError(
                f"{url}: the cluster rejected the token from {source}; use the head node's (`ray get-auth-token` there)"
            ) from None
        raise SubmitError(
            f"{url}: the cluster requires a token; set RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or --token-file "
            "(`ray get-auth-token` on the head prints it)"
        ) from None
    except ConnectionError:
        raise SubmitError(f"{url}: no Ray dashboard answers there; is the head up and its dashboard port reachable?") from None


# ---------------------------------------------------------------------------------------------
# The job: its config checked here, its entrypoint and runtime environment

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


# ---------------------------------------------------------------------------------------------
# Preflight: the launch script's check and a storage probe, run as a small job on the cluster

def run_preflight(
    client, kind: str, overrides: List[str], *, python: str = "python", project_root: Path = PROJECT_ROOT,
    log: TextIO = sys.stderr,
) -> None:
    """Run `launch/submit.py preflight KIND -- OVERRIDES` on the cluster; raises its ConfigError or StorageError."""
    from framework.config import ConfigError

    job_id = client.submit_job(
        entrypoint=shlex.join([python, "launch/submit.py", "preflight", kind, "--", *overrides]),
        runtime_env=runtime_env(project_root),
        submission_id=submission_id("preflight"),
        metadata={"kind": "preflight"},
    )
    print(f"submit: checking the config and storage on the cluster (job {job_id})", file=log)
    info = wait_until_done(client, job_id, PREFLIGHT_TIMEOUT_S)
    if info is None:
        client.stop_job(job_id)
        raise SubmitError(f"the preflight (job {job_id}) did not finish within {PREFLIGHT_TIMEOUT_S:.0f} s")
    if info.status == "SUCCEEDED":
        client.delete_job(job_id)
        return
    lines = [line.strip() for line in client.get_job_logs(job_id).splitlines() if line.strip()]
    for prefix, error in (("ConfigError:", ConfigError), ("StorageError:", StorageError)):
        problems = [line[len(prefix):].strip() for line in lines if line.startswith(prefix)]
        if problems:
            raise error("; ".join(problems))
    last = lines[-1] if lines else (info.message or str(info.status))
    raise SubmitError(f"the preflight (job {job_id}) failed on the cluster: {last}")


def preflight(kind: str, overrides: List[str]) -> List[str]:
    """On the cluster: the launch script's full check, then the storage probe; one line per problem."""
    from framework.config import ConfigError

    try:
        cfg = compose_job(kind, overrides)
        paths = shared_storage(kind, cfg)
    except (ConfigError, StorageError) as exc:
        return [f"{type(exc).__name__}: {exc}"]
    return [f"StorageError: {problem}" for problem in check_storage(paths)] if paths else []


def check_storage(paths: Dict[str, str], timeout_s: float = NODE_PROBE_TIMEOUT_S) -> List[str]:
    """Problems with `paths` as seen from every alive node of the cluster this job runs on; empty when shared.

    Runs inside the preflight job. Every node writes a marker under each path, then every node lists
    the markers: a node that cannot write, cannot see another node's marker, or does not answer in
    time is a problem, reported once per path and cause with the nodes it happened on.
    """
    import ray

    ray.init(logging_level="WARNING", log_to_driver=False)
    nodes = {n["NodeID"]: f"{n['NodeManagerAddress']}/{n['NodeID'][:8]}" for n in ray.nodes() if n["Alive"]}
    marker = f".storage-check-{uuid.uuid4().hex[:12]}"
    problems: Dict[str, List[str]] = {}
    for step in ("write", "read"):
        answers = _on_every_node(nodes, timeout_s, paths, marker, step, sorted(nodes))
        for node_id, answer in answers.items():
            if answer is None:
                answer = [f"{k}={v}: no answer within {timeout_s:.0f} s" for k, v in paths.items()]
            for problem in answer:
                problems.setdefault(problem, []).append(nodes[node_id])
        if problems:
            break
    _on_every_node(dict(list(nodes.items())[:1]), timeout_s, paths, marker, "clean", [])
    return [
        f"{problem} (on node{'s' if len(where) > 1 else ''} {', '.join(sorted(where))})"
        for problem, where in problems.items()
    ]


def _on_every_node(nodes: Dict[str, str], timeout_s: float, *args) -> Dict[str, Optional[List[str]]]:
    """`_probe_storage(node_id, *args)` once on each node (pinned, no CPU held); None where no answer came."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = ray.remote(num_cpus=0, max_retries=0)(_probe_storage)
    refs = {
        node_id: probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)).remote(node_id, *args)
        for node_id in nodes
    }
    ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
    answers: Dict[str, Optional[List[str]]] = {}
    for node_id, ref in refs.items():
        try:
            answers[node_id] = ray.get(ref, timeout=0)
        except ray.exceptions.GetTimeoutError:
            ray.cancel(ref, force=True)
            answers[node_id] = None
    return answers


def _probe_storage(node_id: str, paths: Dict[str, str], marker: str, step: str, node_ids: List[str]) -> List[str]:
    """One node's part of the storage check: write its marker, list everyone's, or clean up."""
    import pyarrow.fs as pafs

    from framework.storage import resolve

    problems = []
    for key, uri in paths.items():
        try:
            fs, path = resolve(uri)
            folder = f"{path.rstrip('/')}/{marker}"
            if step == "write":
                fs.create_dir(folder, recursive=True)
                with fs.open_output_stream(f"{folder}/{node_id[:8]}") as f:
                    f.write(node_id.encode())
            elif step == "read":
                seen = {info.base_name for info in fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))}
                missing = sorted({n[:8] for n in node_ids} - seen)
                if missing:
                    problems.append(
                        f"{key}={uri}: files written there by node {', '.join(missing)} are not visible; "
                        "it is not storage every node shares (use a shared mount or an object-store URI)"
                    )
            else:
                fs.delete_dir(folder)
        except Exception as exc:  # noqa: BLE001 - any filesystem error is this path's problem on this node
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            problems.append(f"{key}={uri}: cannot {step} there: {reason}")
    return problems


# ---------------------------------------------------------------------------------------------
# Following, listing, stopping

def wait_until_done(client, job_id: str, timeout_s: Optional[float], poll_s: float = 1.0):
    """The job's details once it is terminal, or None if `timeout_s` passes first."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        info = client.get_job_info(job_id)
        if info.status.is_terminal():
            return info
        if deadline is not None and time.monotonic() > deadline:
            return None
        time.sleep(poll_s)


def follow(client, job_id: str, timeout_s: Optional[float] = None, out: TextIO = sys.stdout):
    """Stream the job's logs until it ends; gives its details. Past `timeout_s` the job is stopped (JobTimeout)."""
    started = time.monotonic()

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    try:
        asyncio.run(asyncio.wait_for(tail(), timeout_s))
    except asyncio.TimeoutError:
        pass
    except RuntimeError:
        # The log stream broke (dashboard restart, proxy timeout); the job's status still decides.
        print(f"submit: lost the log stream of {job_id}; waiting for its status", file=sys.stderr)
    left = None if timeout_s is None else max(0.0, timeout_s - (time.monotonic() - started))
    info = wait_until_done(client, job_id, left)
    if info is None:
        client.stop_job(job_id)
        wait_until_done(client, job_id, 60.0)
        raise JobTimeout(f"job {job_id} was still running after --timeout {timeout_s:.0f} s; it has been stopped")
    return info


def exit_code(info) -> int:
    """0 for a job that succeeded; the entrypoint's own exit code (or 1) for one that did not."""
    if info.status == "SUCCEEDED":
        return 0
    code = getattr(info, "driver_exit_code", None)
    return code if isinstance(code, int) and 0 < code < 256 else 1


# A line where Python (or hydra_entry) reports the exception a process died of.
_ERROR_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception): \S")


def describe_end(info, logs: str = "") -> str:
    """One line on how a job ended; for a failure, the first error its entrypoint printed (or Ray's message)."""
    line = f"job {info.submission_id} {info.status}"
    if info.status in ("SUCCEEDED", "STOPPED"):
        return line
    lines = [text.strip() for text in logs.splitlines()]
    at = next((i for i, text in enumerate(lines) if _ERROR_LINE.match(text)), None)
    reason = lines[at] if at is not None else None
    # A wrapping error (Ray Train's ControllerError, say) ends in ':' and names its cause on the next line.
    if reason and reason.endswith(":") and at + 1 < len(lines) and lines[at + 1]:
        reason = f"{reason} {lines[at + 1]}"
    reason = reason or next(iter((info.message or "").strip().splitlines()), "")
    return f"{line}: {reason}" if reason else line


def format_jobs(jobs: List) -> str:
    """A table of submitted jobs, oldest first."""
    rows = [("SUBMISSION ID", "KIND", "STATUS", "STARTED", "DURATION", "ENTRYPOINT")]
    for job in sorted(jobs, key=lambda j: j.start_time or 0):
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job.start_time / 1000)) if job.start_time else "-"
        end = job.end_time or (time.time() * 1000 if job.start_time else None)
        duration = f"{(end - job.start_time) / 1000:.0f}s" if job.start_time and end else "-"
        kind = (job.metadata or {}).get("kind", "-")
        entry = job.entrypoint if len(job.entrypoint) <= 80 else job.entrypoint[:77] + "..."
        rows.append((job.submission_id or job.job_id or "-", kind, str(job.status), started, duration, entry))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1] for row in rows)


def stop(client, job_id: str, timeout_s: float = 60.0):
    """Ask the cluster to stop the job and wait (bounded) until it has; gives its details."""
    client.stop_job(job_id)
    info = wait_until_done(client, job_id, timeout_s)
    if info is None:
        raise SubmitError(f"job {job_id} did not stop within {timeout_s:.0f} s")
    return info
