"""One trial: a full Ray Train + DeepSpeed run, built from the trial's composed config, as a Tune function trainable.

A trial composes `base overrides + its own overrides` (`load_job_config`), names its Train run
`<sweep>/<trial_id>` under the sweep's storage, builds the TorchTrainer with `build_trainer` and calls
`fit()`. Tune's `TuneReportCallback`, a Train callback on the Train controller, passes every
`ray.train.report` of the loop (step, tokens, train_loss, val_loss, val_perplexity, and the path of the
checkpoint when there is one) on to Tune, so a scheduler can stop the trial at any evaluation point;
stopping the trial's actor ends its Train run with it. A trial that starts again after the sweep's
driver was interrupted keeps its run name, and Train resumes that run from its latest checkpoint.

PBT needs Tune to hold checkpoints, because exploiting hands the better trial's checkpoint to the
worse one. Under PBT the trial therefore fits in a thread and reports each Train result to Tune
itself, with the Train checkpoint attached (`_ReportToTrial`). A trial that Tune restarts with a
checkpoint (`ray.tune.get_checkpoint()`) opens a new Train run, `<sweep>/<trial_id>.<n>`, whose
first checkpoint is the one handed over, with this trial's own peak LR and clipping norm written into
it (`adopt_checkpoint`, `retarget_checkpoint`); the training loop then resumes from it as from any
checkpoint of its own run: weights, optimizer moments, schedule position and data position.
"""

from __future__ import annotations

import glob
import json
import os
import tempfile
import threading
import time
from dataclasses import replace
from typing import Any, Dict, List, Optional

import pyarrow.fs as pafs
import ray
import ray.train
import ray.tune
from ray.train.v2._internal.execution.callback import WorkerGroupCallback
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY, TuneReportCallback
from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group
from ray.util.queue import Queue

from framework import storage
from framework.config import JobConfig, load_job_config
from framework.data.stream import quiet_data_logs
from framework.train import checkpoint as train_checkpoint
from framework.train.trainer import build_trainer, resolve_paths
from framework.tune.sweep import Sweep, trial_overrides

# What the Tune actor that only drives a trial's Train run holds: no CPU (every CPU goes to Train
# workers and Ray Data's reads), but its process's memory, since Tune refuses an empty request.
DRIVER_RESOURCES = {"CPU": 0, "memory": 512 * 1024**2}


@ray.remote(num_cpus=0)
class PlacementGroupJanitor:
    """Removes a trial's Train worker placement group once the trial's Train controller is gone.

    Tune ends a trial by ending its actor (ASHA stopping it, PBT pausing it), which takes the Train
    controller with it before the controller can release its workers' placement group. Train's own
    PlacementGroupCleaner would remove it, but it asks the state API, which needs the dashboard and
    a single Ray instance per host; without it the reservation outlives the trial and the next
    trial's workers and Ray Data reads wait for CPUs forever. The sweep's driver owns this actor.
    """

    def __init__(self, interval_s: float = 1.0):
        self.groups: List[Any] = []  # (controller handle, placement group)
        self.lock = threading.Lock()
        threading.Thread(target=self._watch, args=(interval_s,), name="janitor", daemon=True).start()

    def register(self, controller: Any, group: PlacementGroup) -> None:
        with self.lock:
            self.groups.append((controller, group))

    def wait_released(self, timeout_s: float) -> int:
        """Wait until every registered group is gone with its controller, at most `timeout_s`; gives how many remain.

        The sweep's driver asks this before it ends the janitor: trials that Tune stopped last (an
        interrupted sweep's running trials, a trial stopped at the last rung) may still hold theirs.
        """
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self.lock:
                if not self.groups:
                    return 0
            time.sleep(0.2)
        with self.lock:
            return len(self.groups)

    def _watch(self, interval_s: float) -> None:
        while True:
            time.sleep(interval_s)
            with self.lock:
                groups = list(self.groups)
            for controller, group in groups:
                try:
                    ray.get(controller.__ray_ready__.remote(), timeout=10)
                    continue  # the controller is alive and owns its group
                except ray.exceptions.GetTimeoutError:
                    continue  # busy, hence alive
                except ray.exceptions.RayActorError:
                    pass
                if placement_group_table(group).get("state") != "REMOVED":
                    remove_placement_group(group)
                with self.lock:
                    self.groups.remove((controller, group))


class _RegisterPlacementGroup(WorkerGroupCallback):
    """Tell the sweep's janitor which placement group this Train controller's workers hold."""

    def __init__(self, janitor: Any):
        self.janitor = janitor

    def after_worker_group_start(self, worker_group: Any) -> None:
        group = worker_group.get_worker_group_state().placement_group_handle.placement_group
        self.janitor.register.remote(ray.get_runtime_context().current_actor, group)


def trial_job(sweep: Sweep, config: Dict[str, Any], run_name: str, storage_root: str) -> JobConfig:
    """The training config of one trial: base overrides + the values Tune chose, its run name and storage."""
    job = resolve_paths(load_job_config(sweep.base_overrides + trial_overrides(sweep.params, config)))
    return replace(job, run=replace(job.run, name=run_name, storage_path=storage_root))


def run_name(storage_root: str, sweep_name: str, trial_id: str, restarted: bool) -> str:
    """`<sweep>/<trial_id>`, or for a trial restarted from a handed-over checkpoint the next unused `<sweep>/<trial_id>.<n>`."""
    if not restarted:
        return f"{sweep_name}/{trial_id}"
    fs, path = storage.resolve(storage.join(storage_root, sweep_name))
    taken = {info.base_name for info in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))}
    n = 1
    while f"{trial_id}.{n}" in taken:
        n += 1
    return f"{sweep_name}/{trial_id}.{n}"


def scheduled_lr(job: JobConfig, step: int) -> float:
    """The LR the training loop's schedule (framework/train/loop.py) gives at `step` for this job's optim settings."""
    import torch

    from framework.train.loop import build_lr_schedule

    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=job.optim.lr)
    return job.optim.lr * build_lr_schedule(optimizer, job).lr_lambdas[0](step)


def _retarget_states(states: Any, lr: float, grad_clip: float) -> None:
    """Set the optimizer's current LR in every `param_groups` and the ZeRO clipping norm, wherever the state nests them."""
    if isinstance(states, dict):
        if isinstance(states.get("param_groups"), list):
            for group in states["param_groups"]:
                group["lr"] = lr
        if "clip_grad" in states:
            states["clip_grad"] = grad_clip
        for value in states.values():
            _retarget_states(value, lr, grad_clip)


def retarget_checkpoint(checkpoint_dir: str, job: JobConfig) -> None:
    """Make a handed-over checkpoint train on with this trial's explorable values (sweep.PBT_EXPLORABLE).

    A PBT clone takes the better trial's weights, optimizer moments, schedule position and data
    position, but its own explored hyperparameters. A DeepSpeed engine that loads the checkpoint
    keeps three of the donor's values over its own config: the schedule's base (peak) LR, the
    optimizer's current LR (used for the first step after resuming) and, under ZeRO-1/2, the
    gradient-clipping norm; these are rewritten here. Warm-up and the minimum LR ratio need nothing:
    the schedule's function is built from the clone's config and only its position is restored.
    """
    import torch

    current = scheduled_lr(job, train_checkpoint.read_state(checkpoint_dir).step)
    for path in glob.glob(os.path.join(checkpoint_dir, train_checkpoint.DEEPSPEED_TAG, "*.pt")):
        states = torch.load(path, map_location="cpu", weights_only=False)
        scheduler = states.get("lr_scheduler") or {}
        if "base_lrs" in scheduler:
            scheduler["base_lrs"] = [job.optim.lr] * len(scheduler["base_lrs"])
            scheduler["_last_lr"] = [current] * len(scheduler["base_lrs"])
        _retarget_states(states, current, job.optim.grad_clip)
        torch.save(states, path)


def _adopt(config: Dict[str, Any]) -> None:
    """The one worker of an adopting run: copy the checkpoint, give it this trial's explorable values, report it."""
    with tempfile.TemporaryDirectory() as directory:
        config["checkpoint"].to_directory(directory)
        retarget_checkpoint(directory, config["job"])
        ray.train.report(
            config["metrics"],
            checkpoint=ray.train.Checkpoint.from_directory(directory),
            checkpoint_dir_name=config["dir_name"],
        )


def adopt_checkpoint(job: JobConfig, checkpoint: ray.train.Checkpoint, janitor: Any) -> None:
    """Make `checkpoint`, with this trial's explorable values, the first checkpoint of the (new) Train run `job.run.name`.

    A one-worker Train run of that name reports it, which copies it into the run and records it as
    the run's latest checkpoint; the trial's real run, started next under the same name, resumes from it.
    """
    from ray.train.torch import TorchTrainer

    with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/{train_checkpoint.TRAIN_STATE}") as f:
        state = json.loads(f.read().decode())
    TorchTrainer(
        _adopt,
        train_loop_config={
            "checkpoint": checkpoint,
            "job": job,
            "metrics": {"step": state["step"], "tokens": state["tokens"]},
            "dir_name": train_checkpoint.checkpoint_dir_name(state["step"]),
        },
        scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker=DRIVER_RESOURCES),
        run_config=ray.train.RunConfig(
            name=job.run.name,
            storage_path=job.run.storage_path,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=job.run.keep_checkpoints),
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            callbacks=[_RegisterPlacementGroup(janitor)],
        ),
    ).fit()


class _ReportToTrial(ray.train.UserCallback):
    """Pass each Train result and its checkpoint's path to the trial function (which reports to Tune)."""

    def __init__(self, queue: Queue):
        self.queue = queue

    def after_report(self, run_context: Any, metrics: List[Dict[str, Any]], checkpoint: Optional[ray.train.Checkpoint]) -> None:
        result = dict(metrics[0])  # every rank reports the same all-reduced values; rank 0's suffice
        if checkpoint is not None:
            result[CHECKPOINT_PATH_KEY] = checkpoint.path
        self.queue.put(result)


def fit_reporting_checkpoints(job: JobConfig, janitor: Any) -> None:
    """Fit `job` and report every result to Tune with the Train checkpoint attached (a copy goes into Tune's trial folder)."""
    fs, _ = storage.resolve(job.run.storage_path)
    queue = Queue(maxsize=1, actor_options={"num_cpus": 0})
    trainer = build_trainer(job, callbacks=[_ReportToTrial(queue), _RegisterPlacementGroup(janitor)])
    failures: List[BaseException] = []

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the trial's own thread below
            failures.append(exc)
        finally:
            queue.put(None)

    thread = threading.Thread(target=fit, name="train-fit", daemon=True)
    thread.start()
    while (result := queue.get()) is not None:
        path = result.get(CHECKPOINT_PATH_KEY)
        ray.tune.report(result, checkpoint=ray.tune.Checkpoint(path, filesystem=fs) if path else None)
    thread.join()
    if failures:
        raise failures[0]


def train_trial(config: Dict[str, Any], sweep: Sweep, storage_root: str, janitor: Any) -> None:
    """The Tune function trainable: one trial's full training run."""
    quiet_data_logs()
    trial_id = ray.tune.get_context().get_trial_id()
    handed = ray.tune.get_checkpoint()  # PBT: the better trial's checkpoint this trial continues from
    job = trial_job(sweep, config, run_name(storage_root, sweep.config.name, trial_id, handed is not None), storage_root)
    if handed is not None:
        adopt_checkpoint(job, handed, janitor)
    if sweep.config.scheduler == "pbt":
        fit_reporting_checkpoints(job, janitor)
    else:
        build_trainer(job, callbacks=[TuneReportCallback(), _RegisterPlacementGroup(janitor)]).fit()
