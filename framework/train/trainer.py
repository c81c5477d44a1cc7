"""The driver side of training: plan, place the workers, then assemble and run the TorchTrainer.

ScalingConfig, RunConfig, FailureConfig and CheckpointConfig are all built here, from `conf/run/*`
through the plan.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import replace
from typing import Any, Dict, List, Optional, Tuple

import ray
import ray.train
from ray.train.torch import TorchConfig, TorchTrainer

from framework import storage
from framework.cluster import connect
from framework.config import RunError
from framework.tracking import TRACKING_FILE, RunRef, end_run, parent_of, resume_run, start_run
from framework.train.config import TrainRoot
from framework.train.checkpoint import mark_complete
from framework.train.plan import TrainPlan, beside_engines, make_plan, node_resources, size_workers

# How long Ray Train waits for its worker group's resources in one attempt (its environment
# variable, passed from the driver to Ray Train's controller; 60 s unless set).
WORKER_GROUP_START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"


def train_loop_per_worker(config: Dict[str, Any]) -> None:
    """What every Ray Train worker runs: the training loop on a Ray session."""
    from framework.train.session import RaySession

    plan = config["plan"]
    loop_of(plan)(plan, RaySession(plan.resume_from))


def loop_of(plan: TrainPlan) -> Any:
    """The per-worker loop of a plan: the GRPO loop for an rl run, else the token or preference loss's."""
    if plan.config.rl is not None:
        from framework.train.rl_loop import train_rl

        return train_rl
    from framework.train.loop import train

    return train


class MarkComplete(ray.train.UserCallback):
    """On Ray Train's controller: mark each checkpoint complete once Ray Train has registered every rank's part of it.
    The checkpoint is named inside the run's own URI (plan.run_dir), which keeps any query such as an endpoint."""

    def __init__(self, run_dir: str) -> None:
        self.run_dir = run_dir

    def after_report(self, run_context: Any, metrics: List[Dict[str, Any]], checkpoint: Optional[ray.train.Checkpoint]) -> None:
        if checkpoint is not None:
            mark_complete(self.run_dir, os.path.basename(checkpoint.path.rstrip("/")), int(metrics[0]["step"]))


# An elastic run's attempt to start its workers is short: when it fails (Ray Train counted a lost
# node's resources as free), Ray Train decides again on the workers that really fit.
ELASTIC_START_ATTEMPT_S = 30


def start_attempt_s(plan: TrainPlan) -> int:
    """Seconds one attempt to start the worker group waits for its resources."""
    run = plan.config.run
    return run.resource_wait_s if run.min_workers is None else min(run.resource_wait_s, ELASTIC_START_ATTEMPT_S)


def failure_config(plan: TrainPlan) -> ray.train.FailureConfig:
    """Restarts after a worker dies (run.max_failures), and what a start that timed out leads to.

    Ray Train asks for its worker group's resources in attempts of RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S
    and by default retries forever: a run that lost a node on a fixed-size cluster would wait for ever.
    Its count of failed attempts never resets, so a budget of attempts would be one for the whole run;
    instead each start (and each restart) of a fixed-size run gets one attempt of run.resource_wait_s
    (`fit` sets the variable, which Ray Train hands to its controller) and a run whose attempt times out
    fails. An elastic run retries short attempts: Ray Train sizes each one to what the cluster holds,
    and waits (without a bound: that is what run.min_workers asks for) while fewer than run.min_workers fit.
    """
    elastic = plan.config.run.min_workers is not None
    return ray.train.FailureConfig(max_failures=plan.config.run.max_failures, controller_failure_limit=-1 if elastic else 0)


def unplaced_workers_error(plan: TrainPlan, resources: Dict[str, float], error: Exception) -> Exception:
    """What a run that waited run.resource_wait_s for its workers' resources in vain tells its user
    (Ray's own message points at an environment variable); any other controller error as it is."""
    # Ray exports no public name for the timeout; its class name is what tells it apart.
    if type(getattr(error, "controller_failure", None)).__name__ != "WorkerGroupStartupTimeoutError":
        return error
    run = plan.config.run
    each = ", ".join(f"{v:g} {k}" for k, v in resources.items())
    return RunError(
        f"run.resource_wait_s={run.resource_wait_s}: the run's {run.num_workers} Train workers ({each} each) could not "
        f"be placed on the cluster in that time (a node lost, or not added by the autoscaler); its checkpoints are kept "
        f"in {plan.run_dir}: run the same command again to resume"
    )


def worker_error(error: Exception) -> Exception:
    """A worker's RunError (a reward function that raised, ...) as the run's own one-line error; any other failure as it is
    (Ray Train's message, each worker's traceback)."""
    failures = getattr(error, "worker_failures", {}) or {}
    for rank in sorted(failures):
        failure = failures[rank]
        cause = getattr(failure, "cause", None) if not isinstance(failure, RunError) else failure
        if isinstance(cause, RunError):
            return RunError(f"rank {rank}: {cause}")
    return error


def scaling_config(plan: TrainPlan, resources: Dict[str, float]) -> ray.train.ScalingConfig:
    """Fixed at run.num_workers, or elastic between run.min_workers and run.num_workers."""
    run = plan.config.run
    workers = run.num_workers if run.min_workers is None else (run.min_workers, run.num_workers)
    return ray.train.ScalingConfig(
        num_workers=workers, use_gpu=bool(run.gpus_per_worker), resources_per_worker=resources,
        elastic_resize_monitor_interval_s=float(run.resize_check_s),
    )


def build_trainer(plan: TrainPlan, resources: Dict[str, float], callbacks: Optional[List[Any]] = None) -> TorchTrainer:
    """A TorchTrainer for `plan` on the connected cluster; reruns of the same run name resume.

    `callbacks` (Ray Train callbacks) go into the RunConfig; a sweep passes Tune's TuneReportCallback.
    """
    run = plan.config.run
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"plan": plan},
        # The process group's own timeout bounds its set-up; the loop then sets run.collective_timeout_s.
        torch_config=TorchConfig(backend="nccl" if run.gpus_per_worker else "gloo", timeout_s=run.setup_timeout_s),
        scaling_config=scaling_config(plan, resources),
        run_config=ray.train.RunConfig(
            name=run.name,
            storage_path=run.storage_path,
            failure_config=failure_config(plan),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=run.keep_checkpoints),
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            callbacks=[MarkComplete(plan.run_dir), *(callbacks or [])],
        ),
    )


def tracked(plan: TrainPlan) -> TrainPlan:
    """The plan with its MLflow run (tracking=mlflow): the run this run directory logged to before (a resume goes on
    in the same MLflow run), or a new one whose id is kept in the run directory (tracking.json)."""
    t = plan.config.tracking
    if t.backend == "none":
        return plan
    marker = storage.join(plan.run_dir, TRACKING_FILE)
    if storage.exists(marker):
        ref = RunRef.from_dict(storage.read_json(marker))
        if ref.uri == (t.uri or os.environ.get("MLFLOW_TRACKING_URI")):
            resume_run(ref)
            return replace(plan, tracking=ref)
    c = plan.config
    prepared = parent_of(storage.join(plan.data_dir, TRACKING_FILE))  # the shards' preparation, when it was tracked
    ref = start_run(t, "train", c.run.name, dataclasses.asdict(c), parent=prepared, tags={"framework.run_dir": plan.run_dir})
    storage.write_json(marker, ref.as_dict())
    return replace(plan, tracking=ref)


def fit(plan: TrainPlan, resources: Dict[str, float], callbacks: Optional[List[Any]] = None) -> ray.train.Result:
    """Run the TorchTrainer of `plan` to the end; a run whose workers could not be placed ends in one RunError line."""
    plan = tracked(plan)
    trainer = build_trainer(plan, resources, callbacks)
    previous = os.environ.get(WORKER_GROUP_START_TIMEOUT_ENV)
    os.environ[WORKER_GROUP_START_TIMEOUT_ENV] = str(start_attempt_s(plan))
    ok = False
    try:
        result = trainer.fit()
        ok = True
        return result
    except ray.train.ControllerError as exc:
        raise unplaced_workers_error(plan, resources, exc) from exc
    except ray.train.WorkerGroupError as exc:
        raise worker_error(exc) from exc
    finally:
        end_run(plan.tracking, ok)
        if previous is None:
            os.environ.pop(WORKER_GROUP_START_TIMEOUT_ENV, None)
        else:
            os.environ[WORKER_GROUP_START_TIMEOUT_ENV] = previous


def train(cfg: TrainRoot) -> ray.train.Result:
    """Train `cfg` to run.max_steps (resuming a run of the same name) and return Ray Train's Result."""
    plan = make_plan(cfg)  # everything that can be checked without a cluster is, before one is started or joined
    c = plan.config
    connect(c.run.ray_address)
    resources = size_workers(c.run, beside_engines(c, node_resources()))
    workers = c.run.num_workers if c.run.min_workers is None else f"{c.run.min_workers}-{c.run.num_workers}"
    resume = f", resuming {plan.resume_from.rsplit('/', 1)[-1]} (step {plan.resume_state.step})" if plan.resume_from else ""
    print(
        f"train: run {c.run.name}: {c.model.name} on {c.data.name}, ZeRO-{c.deepspeed.stage}, {workers} workers, "
        f"{c.run.max_steps} steps → {plan.run_dir}{resume}",
        flush=True,
    )
    result = fit(plan, resources)
    print(f"train: done. metrics: {result.metrics}", flush=True)
    if result.checkpoint:
        print(f"train: latest checkpoint: {storage.join(plan.run_dir, os.path.basename(result.checkpoint.path.rstrip('/')))}", flush=True)
    return result


def run_bare(cfg: TrainRoot) -> Tuple[TrainPlan, List[Dict[str, Any]]]:
    """Train `cfg` in this one process on a bare session (no Ray Train; run.num_workers must be 1); gives its plan and reports.

    The benchmark's baseline (framework/bench/train.py): the same loop, data path and checkpoints.
    """
    from framework.train.session import LocalSession

    plan = make_plan(cfg)
    if plan.config.run.num_workers != 1:
        raise ValueError(f"run.num_workers={plan.config.run.num_workers}: a bare run is one process")
    run = plan.config.run
    session = LocalSession(plan.run_dir, run.keep_checkpoints, run.setup_timeout_s, use_gpu=run.gpus_per_worker > 0)
    loop_of(plan)(plan, session)
    return plan, session.reports
