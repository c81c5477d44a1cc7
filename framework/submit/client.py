"""The Jobs API client side: connecting (address and token), submitting, following, listing and stopping jobs."""

from __future__ import annotations

import asyncio
import os
import re
import sys
import time
from pathlib import Path
from typing import List, Optional, TextIO, Tuple

from framework.submit.jobs import JobTimeout, SubmitError


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
