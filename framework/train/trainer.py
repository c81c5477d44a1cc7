"""The driver side of training: plan, place the workers, then assemble and run the TorchTrainer.

ScalingConfig, RunConfig, FailureConfig and CheckpointConfig are all built here, from `conf/run/*`
through the plan.
"""

from __future__ import annotations

import math
import os
from typing import Any, Dict, List, Optional

import ray
import ray.train
from ray.train.torch import TorchConfig, TorchTrainer

from framework.cluster import connect
from framework.config import RunError
from framework.schema import Config
from framework.train.plan import TrainPlan, make_plan, node_resources, size_workers

# Ray Train asks for its worker group's resources in attempts of this many seconds (its documented
# environment variable; 60 s unless set).
WORKER_GROUP_START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"


def train_loop_per_worker(config: Dict[str, Any]) -> None:
    """What every Ray Train worker runs: the training loop on a Ray session."""
    from framework.train.loop import train
    from framework.train.session import RaySession

    train(config["plan"], RaySession(config["plan"].resume_from))


def failure_config(plan: TrainPlan) -> ray.train.FailureConfig:
    """Restarts after a worker dies (run.max_failures), and a bounded wait for the workers' resources.

    Ray Train asks for its worker group's resources in attempts of RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S
    (60 s) and by default retries forever: a run that lost a node on a fixed-size cluster would wait for
    ever. run.resource_wait_s bounds the attempts, so such a run fails with Ray's timeout error instead.
    """
    run = plan.config.run
    attempt_s = float(os.environ.get(WORKER_GROUP_START_TIMEOUT_ENV, 60.0))
    attempts = max(1, math.ceil(run.resource_wait_s / attempt_s))
    return ray.train.FailureConfig(max_failures=run.max_failures, controller_failure_limit=attempts - 1)


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


def scaling_config(plan: TrainPlan, resources: Dict[str, float]) -> ray.train.ScalingConfig:
    """Fixed at run.num_workers, or elastic between run.min_workers and run.num_workers."""
    run = plan.config.run
    workers = run.num_workers if run.min_workers is None else (run.min_workers, run.num_workers)
    return ray.train.ScalingConfig(num_workers=workers, use_gpu=bool(run.gpus_per_worker), resources_per_worker=resources)


def build_trainer(plan: TrainPlan, resources: Dict[str, float], callbacks: Optional[List[Any]] = None) -> TorchTrainer:
    """A TorchTrainer for `plan` on the connected cluster; reruns of the same run name resume.

    `callbacks` (Ray Train callbacks) go into the RunConfig; a sweep passes Tune's TuneReportCallback.
    """
    run = plan.config.run
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"plan": plan},
        torch_config=TorchConfig(backend="nccl" if run.gpus_per_worker else "gloo", timeout_s=run.init_timeout_s),
        scaling_config=scaling_config(plan, resources),
        run_config=ray.train.RunConfig(
            name=run.name,
            storage_path=run.storage_path,
            failure_config=failure_config(plan),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=run.keep_checkpoints),
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            callbacks=callbacks,
        ),
    )


def fit(plan: TrainPlan, resources: Dict[str, float], callbacks: Optional[List[Any]] = None) -> ray.train.Result:
    """Run the TorchTrainer of `plan` to the end; a run whose workers could not be placed ends in one RunError line."""
    trainer = build_trainer(plan, resources, callbacks)
    try:
        return trainer.fit()
    except ray.train.ControllerError as exc:
        raise unplaced_workers_error(plan, resources, exc) from exc


def run(cfg: Config) -> ray.train.Result:
    """Train `cfg` to run.max_steps (resuming a run of the same name) and return Ray Train's Result."""
    plan = make_plan(cfg)  # everything that can be checked without a cluster is, before one is started or joined
    c = plan.config
    connect(c.run.ray_address)
    resources = size_workers(c.run, node_resources())
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
        print(f"train: latest checkpoint: {result.checkpoint.path}", flush=True)
    return result
