"""Population Based Training: what it may explore, its scheduler, and how a clone adopts another trial's checkpoint.

PBT exploits by handing the better trial's checkpoint to a worse trial, which Tune then restarts with
that checkpoint and explored values. Tune must hold checkpoints for that, so under PBT a trial reports
each Train result to Tune itself, with the Train checkpoint attached (`fit_reporting_checkpoints`).
A trial Tune restarts with a checkpoint opens a new Train run, `<tune.name>/<trial_id>.<n>`, that
resumes from it (`adopt`): weights, optimizer moments, LR schedule position and data position. It
trains under its own config, since the training loop applies `optim.*` after loading any checkpoint
(framework/train/optim.py: apply_optim_settings): the peak and current LR, betas, eps, weight decay
and clipping norm; the schedule's shape (warm-up, minimum ratio) is built from the config to begin
with. Everything else a checkpoint fixes (model, ZeRO stage, batch layout, steps), which is why PBT
explores only EXPLORABLE.
"""

from __future__ import annotations

import threading
from dataclasses import replace
from typing import Any, Dict, List, Mapping, Optional

from framework.config import require
from framework.train import checkpoint
from framework.train.plan import TrainPlan
from framework.tune.space import Param
from framework.tune.sweep import Sweep

# What a clone really trains with after resuming another trial's checkpoint: the values
# apply_optim_settings sets on the restored engine, and the schedule's shape.
EXPLORABLE = (
    "optim.lr", "optim.min_lr_ratio", "optim.warmup_steps", "optim.weight_decay",
    "optim.beta1", "optim.beta2", "optim.eps", "optim.grad_clip",
)


def check_pbt(sweep: Sweep) -> None:
    """PBT's rules; raises ConfigError naming the first bad `tune.*` key."""
    tune, base, params = sweep.tune, sweep.base, sweep.params
    p = tune.pbt
    require(tune.search == "random", "tune.search", tune.search, "PBT draws its own population; use tune.search=random")
    interval = base.run.checkpoint_interval
    require(
        p.perturbation_interval >= interval and p.perturbation_interval % interval == 0,
        "tune.pbt.perturbation_interval", p.perturbation_interval,
        f"expected a multiple of run.checkpoint_interval={interval}, so that exploiting has a checkpoint to clone",
    )
    require(0 < p.quantile_fraction <= 0.5, "tune.pbt.quantile_fraction", p.quantile_fraction, "expected a fraction in (0, 0.5]")
    require(0 <= p.resample_probability <= 1, "tune.pbt.resample_probability", p.resample_probability, "expected a probability")
    sampled = [param for param in params.values() if param.sampled]
    require(bool(sampled), "tune.space", "{}", "PBT needs at least one key to explore")
    for param in sampled:
        require(
            param.name in EXPLORABLE, f"tune.space.{param.key}", param.text,
            "PBT cannot explore it: a clone resumes the better trial's checkpoint, which fixes its model, ZeRO stage, "
            f"batch layout and steps; PBT explores {', '.join(EXPLORABLE)} (pin other keys with a plain value)",
        )
    require(tune.num_samples >= 2, "tune.num_samples", tune.num_samples, "PBT needs a population of at least 2")


class KeepInRanges:
    """PBT's explore step scales a value by 0.8 or 1.2, which may leave its interval (optim.min_lr_ratio
    past 1, optim.warmup_steps past run.max_steps) and fail the trial; such a value is brought back to
    the interval's nearer end, which the checks before the sweep tried. A list steps to a neighbour."""

    def __init__(self, params: Mapping[str, Param]):
        self.ranges = {key: p.values for key, p in params.items() if p.kind == "interval"}

    def __call__(self, config: Dict[str, Any]) -> Dict[str, Any]:
        for key, (low, high) in self.ranges.items():
            if key in config:
                config[key] = type(config[key])(min(max(config[key], low), high))
        return config


def scheduler(sweep: Sweep) -> Any:
    """Tune's PopulationBasedTraining over the space's sampled keys."""
    from ray.tune.schedulers import PopulationBasedTraining

    p = sweep.tune.pbt
    return PopulationBasedTraining(
        time_attr="step",
        perturbation_interval=p.perturbation_interval,
        # A list makes PBT step to a neighbouring value; a domain it scales by 0.8 or 1.2 (or resamples).
        hyperparam_mutations={k: list(q.values) if q.listed else q.domain() for k, q in sweep.params.items() if q.sampled},
        quantile_fraction=p.quantile_fraction,
        resample_probability=p.resample_probability,
        custom_explore_fn=KeepInRanges(sweep.params),
        synch=p.synch,
    )


def adopt(plan: TrainPlan, checkpoint_uri: str) -> TrainPlan:
    """`plan` (a new Train run) resuming the checkpoint PBT handed over, as a run resumes its own latest one."""
    return replace(plan, resume_from=checkpoint_uri, resume_state=checkpoint.read_state(checkpoint_uri))


def fit_reporting_checkpoints(plan: TrainPlan, resources: Dict[str, float], callbacks: List[Any]) -> None:
    """Fit `plan` and report every Train result to Tune with its checkpoint attached (Tune keeps a copy, for clones)."""
    import ray.train
    import ray.tune
    from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY
    from ray.util.queue import Queue

    from framework import storage
    from framework.train.trainer import fit

    class ReportToTrial(ray.train.UserCallback):
        """On the Train controller: pass each result and its checkpoint's path to the trial's thread."""

        def __init__(self, queue: Queue):
            self.queue = queue

        def after_report(self, run_context: Any, metrics: List[Dict[str, Any]], checkpoint: Optional[ray.train.Checkpoint]) -> None:
            result = dict(metrics[0])  # every rank reports the same all-reduced values
            if checkpoint is not None:
                result[CHECKPOINT_PATH_KEY] = checkpoint.path
            self.queue.put(result)

    fs, _ = storage.resolve(plan.config.run.storage_path)
    queue = Queue(maxsize=1, actor_options={"num_cpus": 0})
    failures: List[BaseException] = []

    def train() -> None:
        try:
            fit(plan, resources, [ReportToTrial(queue), *callbacks])
        except BaseException as exc:  # noqa: BLE001 - re-raised in the trial's own thread below
            failures.append(exc)
        finally:
            queue.put(None)

    # ray.tune.report works in the trial's own thread only; Train's fit() blocks, so it runs beside it.
    thread = threading.Thread(target=train, name="train-fit", daemon=True)
    thread.start()
    while (result := queue.get()) is not None:
        path = result.get(CHECKPOINT_PATH_KEY)
        ray.tune.report(result, checkpoint=ray.tune.Checkpoint(path, filesystem=fs) if path else None)
    thread.join()
    if failures:
        raise failures[0]
