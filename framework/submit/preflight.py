"""The preflight: a small job on the cluster that runs the launch script's own check where the cluster's files
are, then has every node write and read back the configured storage."""

from __future__ import annotations

import shlex
import sys
import uuid
from pathlib import Path
from typing import Dict, List, Optional, TextIO

from framework.submit.client import wait_until_done
from framework.submit.jobs import (
    PROJECT_ROOT,
    StorageError,
    SubmitError,
    compose_job,
    runtime_env,
    shared_storage,
    submission_id,
)

PREFLIGHT_TIMEOUT_S = 240.0  # the whole preflight job: runtime-env setup, config check, storage probe
NODE_PROBE_TIMEOUT_S = 60.0  # one node's answer; an object store that does not answer ends here


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
