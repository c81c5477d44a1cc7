"""Shared, expensive artefacts: one local Ray cluster, one small prepared corpus, tiny trained runs."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

import pytest

ROOT = Path(__file__).resolve().parent.parent
STDLIB = sysconfig.get_paths()["stdlib"]
# A small slice of real text: stdlib modules whose names start with a-c (~30 files, ~1.5 MB).
SMALL_CORPUS = f"{STDLIB}/[a-c]*.py"
# Of those 29 documents, 3 fall in validation at 0.1 (a split by content hash; 0.05 would leave it empty).
VAL_FRACTION = 0.1

# Every application a test serves sits behind one ingress policy: Serve's proxies read it from the
# environment of the process that started the local Ray cluster, and any module may start that first, so it
# is set here, at collection time. The key carries the trailing newline a Kubernetes Secret made from a file
# has (the replica must strip it); the proxy callback checks the key and the body size before routing.
SERVE_API_KEY = "sk-test-serve"
SERVE_KEY_ENV = "FRAMEWORK_TEST_SERVE_KEY"
SERVE_MAX_REQUEST_BYTES = 1 << 20
os.environ[SERVE_KEY_ENV] = SERVE_API_KEY + "\n"


def _serve_ingress() -> None:
    from framework.serve.ingress import ingress_environment

    os.environ.update(ingress_environment(SERVE_KEY_ENV, "/", SERVE_MAX_REQUEST_BYTES))


_serve_ingress()

# Ray Train's controller polls its workers every 2 s by default: that is when it takes a report (a worker that
# reports again waits for it), notices a run's end or a dead worker. Every run here is a few seconds of steps, so
# the poll's period was a visible share of each; polling more often changes nothing a test checks. Set here, at
# collection time, so that every driver (this process and the `launch/*.py` ones it starts) passes it to its
# controller, as Ray Train does with its RAY_TRAIN_* variables.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
# Ray Train's preemption watcher (an actor per worker group that polls the nodes' drain state, for spot instances
# an autoscaler drains) is a process start per run, and no test here drains a node. Passed on the same way.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
# Ray's log monitor globs the session's log folder for new worker logs every 0.1 s until it holds 1,000 files, then
# every 0.5 s: a long-lived test cluster holds hundreds, and each glob costs CPU both test processes need. At 0.5 s
# from the start, a new worker's lines reach the driver at most 0.4 s later; none is lost (a file is read from its
# start once found).
os.environ.setdefault("RAY_LOG_MONITOR_MANY_FILES_THRESHOLD", "0")


# The README's suite runs on two processes, a file at a time each (--dist loadfile). pytest-xdist hands the files out
# by their number of tests, most first, which put the two costliest files for their size (test_grpo.py, test_cluster.py)
# last: one process went on alone for 4.5 minutes at the end. The files go out longest first instead, and the rest in
# collection order behind them: both processes end together. Which files run side by side matters too, and this is the
# order measured best on the 2-core VM (30:55). Putting test_cluster.py beside test_checkpoints.py instead made both
# take twice as long: the elastic test took 726 s and the object-storage lifecycle 405 s, against 421 s and 216 s here.
LONGEST_FILES_FIRST = (
    "test_cluster.py", "test_tune.py", "test_serve.py", "test_promote.py", "test_checkpoints.py", "test_train.py",
    "test_grpo.py", "test_eval.py", "test_compress.py", "test_sft.py", "test_generate.py", "test_tracking.py", "test_dpo.py",
    "test_prep.py",
)


def pytest_configure(config: pytest.Config) -> None:
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist's own ordering of files, by test count
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config: pytest.Config, items: List[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file's tests keep their order


# Where each test's time went, process by process: with PYTEST_TIMELINE=<file> set, one JSON line per test (its xdist
# worker, and the start and end of its setup, call and teardown), to see when a process waited or ran alone.
_TIMELINE = os.environ.get("PYTEST_TIMELINE")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):  # noqa: ANN001, ANN201
    if not _TIMELINE:
        return (yield)
    import time

    start = time.time()
    try:
        return (yield)
    finally:
        with open(_TIMELINE, "a") as f:
            f.write(json.dumps({"worker": os.environ.get("PYTEST_XDIST_WORKER", "main"), "test": item.nodeid,
                                "start": start, "end": time.time()}) + "\n")


def run_overrides(data_dir: str, storage: str, name: str, **extra: object) -> List[str]:
    """Overrides for a ~20-step tiny-model run on the small corpus: seconds of compute per step."""
    overrides = {
        "model": "tiny",
        "data.output_dir": data_dir,
        "data.seq_len": 64,
        "run.name": name,
        "run.storage_path": storage,
        "run.num_workers": 2,
        "run.max_steps": 20,
        "run.global_batch_size": 8,
        "run.micro_batch_size": 2,
        "run.log_interval": 5,
        "run.eval_interval": 10,
        "run.checkpoint_interval": 10,
        "run.max_failures": 0,
        "optim.warmup_steps": 2,
        "data.val_fraction": VAL_FRACTION,
    }
    overrides.update(extra)
    return [f"{k}={v}" for k, v in overrides.items()]


def made_once(tmp_path_factory, name: str, make: Callable[[], Any]) -> Any:
    """`make()`'s JSON-able result, made once for the whole test run however many xdist processes ask for it.

    The README's suite runs on two processes and each session fixture would otherwise be made in each (two
    preparations of the corpus, six tiny trainings): the first process that asks makes it under a file lock
    in the run's shared temporary directory; the other waits for it, then reads what was made.
    """
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # .../pytest-N/, above every worker's popen-gwK/
    record = root / f"{name}.json"
    with FileLock(str(record) + ".lock"):
        if record.is_file():
            return json.loads(record.read_text())
        value = make()
        record.write_text(json.dumps(value))
        return value


def _by_stage(made: Dict[str, str]) -> Dict[int, str]:
    return {int(stage): path for stage, path in made.items()}  # JSON's keys are strings


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray cluster for the session's process (2 CPUs, as on CI)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def prepared_data(tmp_path_factory, request) -> str:
    """The small corpus prepared with a 1k BPE vocabulary and 64-token sequences."""

    def make() -> str:
        from framework.data.prepare import prepare_shards
        from framework.train.config import TRAIN

        request.getfixturevalue("ray_session")
        out = str(tmp_path_factory.mktemp("data") / "small")
        prepare_shards(TRAIN.from_overrides(prep_overrides(out)).data)
        return out

    return made_once(tmp_path_factory, "prepared_data", make)


def prep_overrides(out: str) -> List[str]:
    """The small corpus with a 1k BPE vocabulary and 64-token sequences, into `out`."""
    return [
        f"data.sources.0.path='{SMALL_CORPUS}'",
        "data.tokenizer.vocab_size=1024",
        "data.seq_len=64",
        "data.files_per_task=8",
        f"data.val_fraction={VAL_FRACTION}",
        f"data.output_dir={out}",
    ]


@pytest.fixture(scope="session")
def run_storage(tmp_path_factory) -> str:
    """Where the session's runs go: one folder for every process, each test naming its own run."""
    return made_once(tmp_path_factory, "run_storage", lambda: str(tmp_path_factory.mktemp("runs")))


@pytest.fixture(scope="session")
def trained_runs(prepared_data, run_storage, tmp_path_factory, request) -> Dict[int, str]:
    """Run directories of the same 20-step, 2-worker run under ZeRO stages 1, 2 and 3."""

    def make() -> Dict[int, str]:
        from framework.train.config import TRAIN
        from framework.train.trainer import train

        request.getfixturevalue("ray_session")
        runs = {}
        for stage in (1, 2, 3):
            name = f"zero{stage}"
            train(TRAIN.from_overrides(run_overrides(prepared_data, run_storage, name, deepspeed=f"zero{stage}")))
            runs[stage] = os.path.join(run_storage, name)
        return runs

    return _by_stage(made_once(tmp_path_factory, "trained_runs", make))


@pytest.fixture(scope="session")
def trained_checkpoints(trained_runs) -> Dict[int, str]:
    """The final (step 20) checkpoint directory of each ZeRO stage's run."""
    from framework.train.checkpoint import latest_checkpoint

    return {stage: latest_checkpoint(path) for stage, path in trained_runs.items()}


@pytest.fixture(scope="session")
def bare_runs(prepared_data, run_storage, tmp_path_factory, request) -> Dict[int, str]:
    """The same 20-step run on one worker without Ray Train (the loop on a bare session, in a Ray task
    so that its process group stays apart from this process), under ZeRO-1 and ZeRO-3."""

    def make() -> Dict[int, str]:
        from framework.train.config import TRAIN

        ray = request.getfixturevalue("ray_session")
        return {
            stage: train_bare(ray, TRAIN.from_overrides(run_overrides(
                prepared_data, run_storage, f"bare-zero{stage}", deepspeed=f"zero{stage}", **{"run.num_workers": 1})))[0]
            for stage in (1, 3)
        }

    return _by_stage(made_once(tmp_path_factory, "bare_runs", make))


def train_bare(ray, cfg, env: Optional[Dict[str, str]] = None) -> tuple:
    """(run directory, reports) of `cfg` trained by the loop on a bare session, in a Ray task of one CPU
    (its own process: the process group and environment a bare session sets up stay out of this one), with
    `env` added to that process's environment."""
    from framework.train.trainer import run_bare

    def task(c):
        plan, reports = run_bare(c)
        return plan.run_dir, reports

    options = {"num_cpus": 1, **({"runtime_env": {"env_vars": env}} if env else {})}
    return ray.get(ray.remote(task).options(**options).remote(cfg))


@pytest.fixture(scope="session")
def exports(trained_checkpoints, tmp_path_factory) -> Dict[int, str]:
    """Each ZeRO stage's final checkpoint exported once, as a verified Hugging Face folder."""

    def make() -> Dict[int, str]:
        from framework.export import export_checkpoint

        root = tmp_path_factory.mktemp("export")
        return {stage: export_checkpoint(path, str(root / f"tiny-zero{stage}")) for stage, path in trained_checkpoints.items()}

    return _by_stage(made_once(tmp_path_factory, "exports", make))


# Compression: the methods this machine's torch and torchao run (int4 needs CUDA), each compressed once for the session,
# with a small greedy-agreement probe; the int8 folder is compressed through a sweep's best.json named COMPRESS_SWEEP.
COMPRESS_PRESETS = ("int8", "int8-dynamic")
COMPRESS_PROMPTS, COMPRESS_MAX_TOKENS = 4, 16
COMPRESS_SWEEP = "tiny-sweep"


def compress_config(model_path: object, preset: str = "int8", **overrides: object):
    """A checked CompressConfig of `preset` on `model_path`, with the session's small probe."""
    from framework.compress.config import to_compress_config
    from framework.config import compose

    values = {"model_path": model_path, "prompts": COMPRESS_PROMPTS, "max_tokens": COMPRESS_MAX_TOKENS, **overrides}
    return to_compress_config(compose([f"compress={preset}", *(f"compress.{k}={v}" for k, v in values.items())], "compress"))


def sweep_best_json(folder: Path, sweeps: Path) -> Path:
    """A sweep's best.json pointing at `folder`, as promotion writes it (outputs/sweeps/<COMPRESS_SWEEP>/best.json)."""
    sweep = sweeps / COMPRESS_SWEEP
    sweep.mkdir(parents=True, exist_ok=True)
    best = sweep / "best.json"
    best.write_text(json.dumps({"trial": "t0", "metric": "val_loss", "value": 1.0, "overrides": [],
                                "path": os.path.relpath(folder, sweep)}))
    return best


@pytest.fixture(scope="session")
def compressed(exports, tmp_path_factory) -> Dict[str, tuple]:
    """preset → (folder, report) of the ZeRO-3 export compressed by every method this machine runs, the source measured
    once for all of them; made once for both processes (test_compress checks them, test_promote serves the int8 one).
    compress.data_dir is left null: the shards are found through the source's export.json."""

    def make() -> Dict[str, list]:
        from framework.compress.job import compress
        from framework.compress.measure import measure_source
        from framework.compress.plan import plan_compression

        source = Path(exports[3])
        root = tmp_path_factory.mktemp("compressed")
        best = sweep_best_json(source, tmp_path_factory.mktemp("sweeps"))
        plans = {p: plan_compression(compress_config(best if p == "int8" else source, p, output_dir=root / f"tiny-{p}"))
                 for p in COMPRESS_PRESETS}
        figures = measure_source(plans[COMPRESS_PRESETS[0]])
        return {p: [plan.output_dir, compress(plan, figures)] for p, plan in plans.items()}

    return {preset: (Path(folder), report) for preset, (folder, report) in made_once(tmp_path_factory, "compressed", make).items()}


def copy_run_until(run_dir: str, step: int, target: str) -> None:
    """A run directory as a run stopped after its checkpoint at `step` left it: that checkpoint, and the metrics up to it."""
    import json
    import shutil

    os.makedirs(os.path.join(target, "logs"))
    name = f"checkpoint_{step:08d}"
    shutil.copytree(os.path.join(run_dir, name), os.path.join(target, name))
    with open(os.path.join(run_dir, "logs", "metrics.jsonl")) as f, open(os.path.join(target, "logs", "metrics.jsonl"), "w") as out:
        out.writelines(line for line in f if json.loads(line)["step"] <= step)


def as_zero0(checkpoint: str, target) -> "Path":
    """A ZeRO-0 checkpoint made from a ZeRO-1 one: rank 0's model states alone (the whole model), as one worker wrote it."""
    import json
    import shutil

    from framework.train.checkpoint import write_file_hashes

    target = Path(target)
    shutil.copytree(checkpoint, target, ignore=shutil.ignore_patterns("*_optim_states.pt", "zero_to_*.py", "rank-*.json"))
    state = json.loads((target / "train_state.json").read_text())
    (target / "train_state.json").write_text(json.dumps({**state, "world_size": 1}))
    write_file_hashes(str(target), 0)
    return target


def launch(script: str, *args: str, env: Dict[str, str] | None = None, timeout: float = 600):
    """Run `python launch/<script> args...` as a user would, from the project root."""
    import subprocess

    return subprocess.run(
        [sys.executable, str(ROOT / "launch" / script), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
    )


# ChatML's template, for the tests that give a random model's tokenizer one (serving's prompt layout, batch generation).
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def free_port() -> int:
    """A TCP port on localhost that nothing listens on now (for a Serve HTTP proxy)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tiny_chat_model(folder: str, texts: List[str]) -> str:
    """A local HF model folder for fine-tuning tests: a random tiny Llama (seed 0) and the framework's 1k byte-level BPE
    (ChatML template) trained on `texts`."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from framework.data.config import TokenizerConfig
    from framework.data.tokenizer import train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer(texts, TokenizerConfig(path=None, vocab_size=1024, min_frequency=2))
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def greedy_reference(folder, prompt: str, max_new_tokens: int) -> str:
    """What plain `transformers` greedy generation gives for `folder` and `prompt`: what a served folder must answer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = tokenizer(prompt, return_tensors="pt")
    out = model.generate(**ids, do_sample=False, max_new_tokens=max_new_tokens)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


class Interruptible:
    """`python launch/<script> args...` in the background, its output collected line by line, stopped as a
    user's Ctrl-C would: SIGINT (the child must not inherit an ignored SIGINT from a background shell). Ray
    folds log lines that differ only in numbers (rank 0's and rank 1's) unless told not to. Killed on exit
    if it is still running, whatever failed."""

    def __init__(self, script: str, *args: str, env: Dict[str, str] | None = None):
        import signal
        import subprocess
        import threading

        self.process = subprocess.Popen(
            [sys.executable, str(ROOT / "launch" / script), *args], cwd=ROOT, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {}), "RAY_DEDUP_LOGS": "0"},
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        self.output: List[str] = []
        threading.Thread(target=lambda: [self.output.append(line) for line in self.process.stdout], daemon=True).start()

    def text(self) -> str:
        return "".join(self.output)

    def wait_until(self, done, timeout_s: float) -> None:
        """Until `done()` holds; fails if the job ends first or `timeout_s` passes."""
        import time

        deadline = time.monotonic() + timeout_s
        while not done():
            assert self.process.poll() is None and time.monotonic() < deadline, self.text()[-3000:]
            time.sleep(0.2)

    def interrupt(self, timeout_s: float = 90) -> int:
        import signal

        self.process.send_signal(signal.SIGINT)
        return self.process.wait(timeout=timeout_s)

    def __enter__(self) -> "Interruptible":
        return self

    def __exit__(self, *exc) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@contextlib.contextmanager
def another_ray_instance() -> Iterator[None]:
    """A second Ray instance on this host while the block runs (a serve, another user's sweep), started by `ray start`."""
    with ray_head(num_cpus=0):
        yield


@contextlib.contextmanager
def ray_head(num_cpus: int) -> Iterator[str]:
    """A Ray head of `num_cpus` logical CPUs started by `ray start` for the block, stopped after it; gives its address.
    Its processes inherit this process's environment (the suite's Serve ingress policy among it)."""
    import tempfile

    import psutil
    import ray

    temp_dir = tempfile.mkdtemp(prefix="other-ray-", dir="/tmp")  # short: Ray's socket paths live under it
    port = free_port()
    subprocess.run([os.path.join(os.path.dirname(sys.executable), "ray"), "start", "--head", f"--port={port}",
                    f"--temp-dir={temp_dir}", f"--num-cpus={num_cpus}", "--include-dashboard=false", "--disable-usage-stats"],
                   check=True, capture_output=True, timeout=120)
    try:
        yield f"{ray.util.get_node_ip_address()}:{port}"
    finally:
        # That instance alone (`ray stop` stops every instance): its processes are the ones started with its temp
        # dir; SIGTERM, then SIGKILL for those still there (its GCS and raylet outlive a SIGTERM).
        others = [p for p in psutil.process_iter(["cmdline"]) if temp_dir in " ".join(p.info["cmdline"] or [])]
        for process in others:
            process.terminate()
        for process in psutil.wait_procs(others, timeout=5)[1]:
            process.kill()
        shutil.rmtree(temp_dir, ignore_errors=True)
