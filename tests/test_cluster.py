"""A real two-node Ray cluster on one machine, with token authentication, driven through launch/submit.py.

The head and the worker node are separate `ray start` processes with their own ports, CPUs and a
custom resource each (`head_node`, `worker_node`) so that the nodes a job used can be told apart.
Shared storage is a directory both "nodes" see. Only processes started here are ever stopped,
by PID; other Ray clusters on the machine are left alone.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest
import requests
from conftest import SMALL_CORPUS, VAL_FRACTION, run_overrides

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
SUBMIT = [PYTHON, str(ROOT / "launch" / "submit.py")]

# Logical CPUs per node and per Train worker: two workers of 3 CPUs fit neither node together, so
# they spread one per node (the head's other 2 CPUs run prep's tasks and the preflight).
HEAD_CPUS, WORKER_CPUS, CPUS_PER_TRAIN_WORKER = 5, 3, 3


_RANGES_GIVEN: List[Tuple[int, int]] = []
NODE_SETTLE_S = 5


def _free_port_range(size: int) -> int:
    """The first of `size` consecutive free ports, drawn below the kernel's ephemeral range and apart from the
    ranges given to earlier nodes (which may not be bound yet).

    Below the ephemeral range because a port that a bind to port 0 found free there can be taken, before the
    node binds it, by any outgoing connection on a busy machine: a node's dashboard agent that loses its port
    takes the raylet down with it (a CI run lost its restarted worker node that way, or so it looked).
    """
    ephemeral = Path("/proc/sys/net/ipv4/ip_local_port_range")
    low = int(ephemeral.read_text().split()[0]) if ephemeral.exists() else 32768
    rng = secrets.SystemRandom()
    for _ in range(200):
        base = rng.randrange(10000, low - size)
        if any(base < start + length and start < base + size for start, length in _RANGES_GIVEN):
            continue
        socks = []
        try:
            for port in range(base, base + size):
                s = socket.socket()
                socks.append(s)
                s.bind(("", port))
            _RANGES_GIVEN.append((base, size))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port range")


def _free_ports(count: int) -> List[int]:
    base = _free_port_range(count)
    return list(range(base, base + count))


def _descendants(pid: int) -> List[int]:
    """Every live process below `pid` (Ray workers put themselves in their own process groups)."""
    children: Dict[int, List[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


class LocalCluster:
    """A head and a worker node as `ray start --block` processes, each stopped by PID."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        # One per node, as on separate machines (each node's log monitor reads only its own logs).
        # Short: Ray's unix sockets live under them and socket paths are capped at 107 bytes.
        self.temp_dirs: Dict[str, str] = {}
        self.token_file = workdir / "auth_token"
        self.token_file.write_text(secrets.token_hex(32))
        self.token_file.chmod(0o600)
        self.gcs_port, self.dashboard_port = _free_ports(2)
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        self.nodes: Dict[str, subprocess.Popen] = {}

    def node_env(self) -> Dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN_PATH=str(self.token_file),
            RAY_USAGE_STATS_ENABLED="0",
            # `python` in job entrypoints is this interpreter.
            PATH=f"{Path(PYTHON).parent}{os.pathsep}{env.get('PATH', '')}",
            # Two cores in all: one torch thread per worker instead of one per logical CPU.
            OMP_NUM_THREADS="1",
            # Rank 0's and rank 1's lines differ only in numbers: the tests read both.
            RAY_DEDUP_LOGS="0",
            # A node killed here is a dead process: its health checks fail at once, so the GCS may declare it
            # dead after 5 failed checks 1 s apart (Ray's defaults: 5 checks 3 s apart, 15 s a loss).
            RAY_health_check_period_ms="1000",
            # Ray Train's controller (in a job's driver, started by the node) polls its workers every 0.5 s, as in
            # the other tests (conftest.py).
            RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5"),
        )
        return env

    def client_env(self, **extra: str) -> Dict[str, str]:
        """A submitting user's environment: the token file and nothing else of the cluster's."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(RAY_AUTH_TOKEN_PATH=str(self.token_file), HOME=str(self.workdir))
        env.update(extra)
        return env

    def start_node(self, name: str, num_cpus: int, timeout_s: float = 120.0) -> None:
        """Start a node and wait until the cluster sees it alive under a new node ID (a node killed a moment ago may
        still be listed alive). A node whose process exits before that is started again on other ports, at most
        twice: the ports are free when drawn, not reserved, so on a busy machine one can be taken before the node
        binds it. Each attempt's output is kept in <workdir>/<name>.log."""
        before = set(self.alive_nodes())
        for attempt in range(3):
            if attempt and name == "head_node":
                self.gcs_port, self.dashboard_port = _free_ports(2)
                self.address = f"http://127.0.0.1:{self.dashboard_port}"
            self._spawn_node(name, num_cpus)
            deadline = time.monotonic() + timeout_s
            joined = None
            while time.monotonic() < deadline and self.nodes[name].poll() is None:
                if joined is None and any(node_id not in before and kind == name for node_id, kind in self.alive_nodes().items()):
                    joined = time.monotonic()
                # Alive for a while after joining: the node's agents start after its raylet registers, and a raylet
                # whose agent fails (its port taken) exits with it.
                if joined is not None and time.monotonic() - joined >= NODE_SETTLE_S:
                    return
                time.sleep(1)
            log = (self.workdir / f"{name}.log").read_text()[-3000:]
            if self.nodes[name].poll() is None:
                raise AssertionError(f"{name} did not join the cluster in {timeout_s:.0f} s: {log}")
            print(f"{name} exited while starting (attempt {attempt + 1}), its log: {log}", file=sys.stderr)
            self.nodes.pop(name)
        raise AssertionError(f"{name} exited while starting, three times; the last log: {log}")

    def _spawn_node(self, name: str, num_cpus: int) -> None:
        ports = _free_ports(7)
        workers = _free_port_range(60)
        if name in self.temp_dirs:  # the node that used it is gone (killed, or exited while starting)
            shutil.rmtree(self.temp_dirs[name], ignore_errors=True)
        self.temp_dirs[name] = tempfile.mkdtemp(prefix="rc-", dir="/tmp")
        args = [
            str(Path(PYTHON).parent / "ray"), "start", "--block", "--disable-usage-stats",
            f"--temp-dir={self.temp_dirs[name]}", f"--num-cpus={num_cpus}", "--num-gpus=0",
            f"--resources={json.dumps({name: 1})}", "--object-store-memory=150000000",
            f"--node-manager-port={ports[0]}", f"--object-manager-port={ports[1]}",
            f"--dashboard-agent-listen-port={ports[2]}", f"--dashboard-agent-grpc-port={ports[3]}",
            f"--runtime-env-agent-port={ports[4]}", f"--metrics-export-port={ports[5]}",
            f"--min-worker-port={workers}", f"--max-worker-port={workers + 59}",
        ]
        if name == "head_node":
            args += [
                "--head", f"--port={self.gcs_port}", f"--ray-client-server-port={ports[6]}",
                "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
            ]
        else:
            args += [f"--address=127.0.0.1:{self.gcs_port}"]
        log = open(self.workdir / f"{name}.log", "a")
        self.nodes[name] = subprocess.Popen(
            args, env=self.node_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def kill_node(self, name: str) -> None:
        """Kill a node abruptly, as a lost machine would be: its `ray start`, raylet and workers."""
        proc = self.nodes.pop(name)
        for pid in [proc.pid, *_descendants(proc.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(timeout=30)

    def stop(self) -> None:
        for name in ["worker_node", "head_node"]:
            if name in self.nodes:
                self.kill_node(name)
        # Anything of this cluster's that outlived its parent (found by this cluster's own token path).
        marker = f"RAY_AUTH_TOKEN_PATH={self.token_file}".encode()
        for environ in Path("/proc").glob("[0-9]*/environ"):
            try:
                if marker in environ.read_bytes().split(b"\0"):
                    os.kill(int(environ.parent.name), signal.SIGKILL)
            except (OSError, ValueError):
                continue
        for temp_dir in self.temp_dirs.values():
            shutil.rmtree(temp_dir, ignore_errors=True)

    def api(self, path: str) -> Dict:
        headers = {"Authorization": f"Bearer {self.token_file.read_text().strip()}"}
        response = requests.get(self.address + path, headers=headers, timeout=30)
        response.raise_for_status()
        return response.json()

    def alive_nodes(self) -> Dict[str, str]:
        """node_id → which node (by its custom resource) for every node the cluster sees alive."""
        try:
            result = self.api("/api/v0/nodes?detail=1&limit=100")["data"]["result"]["result"]
        except requests.RequestException:
            return {}
        return {
            n["node_id"]: ("head_node" if "head_node" in n["resources_total"] else "worker_node")
            for n in result
            if n["state"] == "ALIVE"
        }

    def train_workers(self) -> List[Dict]:
        """Ray Train's worker actors (alive or dead) with the node each ran on."""
        query = "/api/v0/actors?detail=1&limit=1000&filter_keys=class_name&filter_predicates=%3D&filter_values=RayTrainWorker"
        return self.api(query)["data"]["result"]["result"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    local = LocalCluster(tmp_path_factory.mktemp("cluster"))
    try:
        local.start_node("head_node", HEAD_CPUS)
        local.start_node("worker_node", WORKER_CPUS)
        yield local
    finally:
        local.stop()


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Path:
    """The storage every node sees: shards under data/, runs and checkpoints under runs/."""
    return tmp_path_factory.mktemp("shared")


def submit(cluster: LocalCluster, *args: str, timeout: float = 600, env: Optional[Dict] = None):
    return subprocess.run(
        [*SUBMIT, "--address", cluster.address, *args],
        env=env or cluster.client_env(), cwd=ROOT, capture_output=True, text=True, timeout=timeout,
    )


def prep_overrides(shared: Path) -> List[str]:
    """The small corpus of the other tests (conftest.py), as shards in the shared storage."""
    return [
        # Quoted for Hydra (the glob has brackets): the quotes reach launch/prep.py unchanged.
        f"data.sources.0.path='{SMALL_CORPUS}'",
        "data.tokenizer.vocab_size=1024",
        "data.seq_len=64",
        f"data.val_fraction={VAL_FRACTION}",
        f"data.output_dir={shared}/data/small",
    ]


def train_overrides(shared: Path, name: str, max_steps: int, **extra: object) -> List[str]:
    """Two workers, one per node; one evaluation and one checkpoint, at the last step."""
    return run_overrides(
        f"{shared}/data/small", f"{shared}/runs", name,
        **{
            "run.cpus_per_worker": CPUS_PER_TRAIN_WORKER,
            "run.max_steps": max_steps,
            "run.log_interval": 2,
            "run.eval_interval": 100000,
            "run.checkpoint_interval": 100000,
            "run.eval_rows": 64,
            **extra,
        },
    )


# ---------------------------------------------------------------------------------------------


def test_submitting_needs_the_clusters_token(cluster):
    # No token anywhere Ray looks (HOME is a fresh directory, so no ~/.ray/auth_token either).
    no_token = cluster.client_env()
    del no_token["RAY_AUTH_TOKEN_PATH"]
    result = submit(cluster, "list", env=no_token)
    assert result.returncode == 2
    assert "the cluster requires a token" in result.stderr

    wrong = cluster.workdir / "wrong_token"
    wrong.write_text("0" * 64)
    result = submit(cluster, "--token-file", str(wrong), "list")
    assert result.returncode == 2
    assert f"rejected the token from --token-file {wrong}" in result.stderr

    result = submit(cluster, "list")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("SUBMISSION ID")


def test_list_logs_and_stop_a_running_job(cluster):
    from ray.job_submission import JobSubmissionClient

    # A job that only stops when told to, submitted by someone else on the same cluster.
    other = JobSubmissionClient(cluster.address, headers={"Authorization": f"Bearer {cluster.token_file.read_text()}"})
    job_id = other.submit_job(entrypoint="echo started; sleep 600", submission_id=f"sleeper-{secrets.token_hex(3)}")
    deadline = time.monotonic() + 60
    while "started" not in other.get_job_logs(job_id):
        assert time.monotonic() < deadline, "the sleeper job never started"
        time.sleep(0.5)

    listed = submit(cluster, "list")
    assert any(line.split()[0] == job_id and "RUNNING" in line for line in listed.stdout.splitlines()), listed.stdout
    assert "started" in submit(cluster, "logs", job_id).stdout.splitlines()

    stopped = submit(cluster, "stop", job_id, timeout=90)
    assert stopped.returncode == 0, stopped.stderr
    assert f"job {job_id} STOPPED" in stopped.stderr
    status = submit(cluster, "status", job_id)
    assert status.returncode != 0 and "STOPPED" in status.stderr

    missing = submit(cluster, "status", "no-such-job")
    assert missing.returncode == 2 and "no-such-job does not exist" in missing.stderr


def test_storage_that_nodes_cannot_share_fails_before_submission(cluster, shared):
    before = {line.split()[0] for line in submit(cluster, "list").stdout.splitlines()[1:]}

    relative = submit(cluster, "train", "--", "data.output_dir=data/small", f"run.storage_path={shared}/runs")
    assert relative.returncode == 2
    assert "StorageError: data.output_dir=data/small: not storage the cluster's nodes share" in relative.stderr

    # /proc cannot hold a directory: no node can write there.
    unwritable = submit(cluster, "train", "--", f"data.output_dir={shared}/data/small", "run.storage_path=/proc/runs")
    assert unwritable.returncode == 2
    error = [line for line in unwritable.stderr.splitlines() if line.startswith("StorageError:")]
    assert error and "run.storage_path=/proc/runs: cannot write there" in error[0], unwritable.stderr
    assert all(f"/{node_id[:8]}" in error[0] for node_id in cluster.alive_nodes())  # seen from both nodes

    typo = submit(cluster, "train", "--", "run.num_wrkers=2")
    assert typo.returncode == 2 and typo.stderr.startswith("ConfigError: ") and "num_wrkers" in typo.stderr

    after = {line.split()[0] for line in submit(cluster, "list").stdout.splitlines()[1:]}
    assert {job for job in after - before if not job.startswith("preflight-")} == set()


def _follow(cluster: LocalCluster, args: List[str]):
    """A `submit.py` process following its job, and the list its output lines (stdout and stderr) are gathered into."""
    follower = subprocess.Popen(
        [*SUBMIT, "--address", cluster.address, *args],
        env=cluster.client_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    lines: List[str] = []
    threading.Thread(target=lambda: [lines.append(line) for line in follower.stdout], daemon=True).start()
    return follower, lines


def _wait_for(follower, lines: List[str], pattern: str, after: int = 0, timeout_s: float = 420) -> int:
    """The index of the first line from `after` on that matches `pattern`; fails if the job ends first."""
    deadline = time.monotonic() + timeout_s
    while True:
        for i, line in enumerate(list(lines)[after:], after):
            if re.search(pattern, line):
                return i
        assert follower.poll() is None, "".join(lines)[-4000:]
        assert time.monotonic() < deadline, f"no line matched {pattern!r}:\n" + "".join(lines)[-4000:]
        time.sleep(1)


def _complete_checkpoints(run_dir: Path) -> List[Dict]:
    """The train_state.json of every complete checkpoint of a run, oldest first."""
    return [json.loads((c / "train_state.json").read_text()) for c in sorted(run_dir.glob("checkpoint_0*")) if (c / "COMPLETE").is_file()]


def test_an_elastic_job_runs_on_both_nodes_goes_on_without_a_lost_node_and_grows_back(cluster, shared):
    """Prep, then an elastic training job (run.min_workers=1) submitted to the two-node cluster: its two Train
    workers run one on each node and checkpoint into the shared storage; losing the worker node restarts the
    run on the head's one worker from its last checkpoint (more gradient accumulation, the same global batch);
    the node, started again, is taken back in and the run checkpoints with two workers. The run is then
    stopped: how long a run goes on after it grows back depends on the machine's speed, which a test must not."""
    # The preflight (config check and storage probe on every node) has its own test; train has one here.
    prep = submit(cluster, "prep", "--no-preflight", "--timeout", "400", "--", *prep_overrides(shared))
    assert prep.returncode == 0, prep.stdout[-3000:] + prep.stderr[-3000:]
    assert (shared / "data" / "small" / "manifest.json").is_file()

    run_dir = shared / "runs" / "elastic"
    overrides = train_overrides(shared, "elastic", 100000, **{
        "run.min_workers": 1, "run.max_failures": 4, "run.checkpoint_interval": 5, "run.log_interval": 1,
        "run.resize_check_s": 5, "run.resource_wait_s": 120,
        # Every checkpoint kept: the first (step 5) is still there however far the run got before the test looks.
        "run.keep_checkpoints": 1000,
    })
    follower, lines = _follow(cluster, ["train", "--timeout", "900", "--", *overrides])
    job_id = None
    try:
        job_id = re.search(r"submit: submitted (\S+)", "".join(lines[_wait_for(follower, lines, r"submit: submitted")])).group(1)
        _wait_for(follower, lines, r"step 7/")
        # The job's two Train workers run one on each node, and their first checkpoint is in the shared storage.
        nodes = cluster.alive_nodes()
        ray_job_id = cluster.api(f"/api/jobs/{job_id}")["job_id"]
        workers = [a for a in cluster.train_workers() if a["job_id"] == ray_job_id and a["state"] == "ALIVE"]
        assert sorted(nodes.get(a["node_id"], "?") for a in workers) == ["head_node", "worker_node"], workers
        deadline = time.monotonic() + 120
        while not _complete_checkpoints(run_dir):
            assert follower.poll() is None and time.monotonic() < deadline, "".join(lines)[-4000:]
            time.sleep(0.5)
        assert (_complete_checkpoints(run_dir)[0]["step"], _complete_checkpoints(run_dir)[0]["world_size"]) == (5, 2)

        cluster.kill_node("worker_node")
        alone = _wait_for(follower, lines, r"rank 0 of 1:")
        _wait_for(follower, lines, r"resumed from .* at step \d+", alone)
        _wait_for(follower, lines, r"step \d+/", alone)
        cluster.start_node("worker_node", WORKER_CPUS)
        try:
            grown = _wait_for(follower, lines, r"rank 1 of 2:", alone)
        except AssertionError as e:  # which nodes the cluster sees, and the restarted node's own log
            raise AssertionError(f"{e}\nalive nodes: {cluster.alive_nodes()}\nworker_node.log: "
                                 f"{(cluster.workdir / 'worker_node.log').read_text()[-3000:]}") from None
        resumed = int(re.search(r"at step (\d+)", lines[_wait_for(follower, lines, r"resumed from .* at step \d+", grown)]).group(1))
        deadline = time.monotonic() + 300
        while not any(s["step"] > resumed and s["world_size"] == 2 for s in _complete_checkpoints(run_dir)):
            assert follower.poll() is None and time.monotonic() < deadline, "".join(lines)[-4000:]
            time.sleep(1)
        stopped = submit(cluster, "stop", job_id, timeout=120)
        assert stopped.returncode == 0 and f"job {job_id} STOPPED" in stopped.stderr, stopped.stderr[-3000:]
        follower.wait(timeout=120)
    finally:
        if follower.poll() is None:
            follower.kill()
            if job_id:  # a failed check: the job must not hold the nodes' CPUs through the next test
                submit(cluster, "stop", job_id, timeout=120)

    # One record per step, none missing across the two restarts; the last checkpoint holds two workers' state.
    steps = sorted({json.loads(line)["step"] for line in (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()})
    assert steps == list(range(1, steps[-1] + 1)) and steps[-1] > resumed
    states = _complete_checkpoints(run_dir)
    assert states[-1]["world_size"] == 2 and states[-1]["step"] > resumed
    # Every worker count stepped through the same global batches: rows consumed = steps × global batch.
    assert all(s["rows"] == s["step"] * 8 for s in states), states


def test_losing_the_worker_node_fails_the_job_with_a_clear_error_not_a_hang(cluster, shared):
    if not (shared / "data" / "small" / "manifest.json").is_file():
        pytest.skip("needs the shards the previous test prepared on the cluster")
    # Train restarts the run once (run.max_failures=1), but the head alone has too few CPUs for two
    # workers: the restart waits run.resource_wait_s for a node that will not come back, then fails.
    overrides = train_overrides(shared, "lose-a-node", 2000, **{"run.max_failures": 1, "run.resource_wait_s": 10})
    args = ["train", "--no-preflight", "--timeout", "480", "--", *overrides]  # the preflight is tested above
    follower = subprocess.Popen(
        [*SUBMIT, "--address", cluster.address, *args],
        env=cluster.client_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    stdout: List[str] = []

    def read() -> None:
        for line in follower.stdout:
            stdout.append(line)

    threading.Thread(target=read, daemon=True).start()
    try:
        # Lose the node once both workers are in the step loop (the followed logs show a step).
        deadline = time.monotonic() + 420
        while not any(re.search(r"step \d+/2000", line) for line in list(stdout)):
            assert follower.poll() is None, "".join(stdout)[-3000:] + follower.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "training never reached its first step"
            time.sleep(1)
        cluster.kill_node("worker_node")
        killed = time.monotonic()
        follower.wait(timeout=300)
        elapsed = time.monotonic() - killed
        stderr = follower.stderr.read()
    finally:
        if follower.poll() is None:
            follower.kill()
    print(f"job ended {elapsed:.0f} s after the node was lost")
    assert follower.returncode not in (0, 124), stderr[-3000:]
    # The last line names the error the job died of, not just "FAILED".
    end = [line for line in stderr.splitlines() if line.startswith("job train-")]
    assert end and " FAILED: RunError: run.resource_wait_s=10: " in end[-1] and "Train workers" in end[-1], stderr[-3000:]
