"""One trial: one Ray Train + DeepSpeed run of the trial's config (`make_plan` + `fit`), reporting to Tune.

A trial's config is the sweep's base with the values Tune chose (`Sweep.trial_config`), as the Train
run `<tune.name>/<trial_id>` under the sweep's storage. Tune's `TuneReportCallback`, a Train callback
on the Train controller, passes every report of the loop (step, tokens, train_loss, val_loss,
val_perplexity, and the checkpoint's path when there is one) on to Tune, so a scheduler can act at
any evaluation; ending the trial's actor ends its Train run with it (framework/tune/placement.py gives
the workers' CPUs back). A trial that starts again after the sweep's driver was interrupted keeps its
run name, and its run resumes from its latest checkpoint. Under PBT the trial reports checkpoints to
Tune, and a trial Tune restarts with one continues from it in a new run (framework/tune/pbt.py).
"""

from __future__ import annotations

from typing import Any, Dict, List

import pyarrow.fs as pafs

from framework import storage
from framework.train.plan import beside_engines, make_plan, size_workers
from framework.train.trainer import fit
from framework.tune import pbt
from framework.tune.placement import RegisterPlacementGroup
from framework.tune.sweep import SweepPlan

# What the Tune actor that only drives a trial's Train run holds: no CPU (every CPU goes to Train
# workers), but its process's memory, since Tune refuses an empty request.
DRIVER_RESOURCES = {"CPU": 0, "memory": 512 * 1024**2}


def run_name(sweep: SweepPlan, trial_id: str, restarted: bool) -> str:
    """`<trial_id>`, or for a trial restarted from a handed-over checkpoint the next unused `<trial_id>.<n>`."""
    if not restarted:
        return trial_id
    fs, path = storage.resolve(sweep.sweep_dir)
    taken = {info.base_name for info in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))}
    n = 1
    while f"{trial_id}.{n}" in taken:
        n += 1
    return f"{trial_id}.{n}"


def train_trial(values: Dict[str, Any], sweep: SweepPlan, nodes: List[Dict[str, Any]], janitor: Any) -> None:
    """The Tune function trainable: one trial's whole training run."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = ray.tune.get_context().get_trial_id()
    handed = ray.tune.get_checkpoint()  # PBT: the checkpoint this trial continues from
    plan = make_plan(sweep.trial_config(values, run_name(sweep, trial_id, handed is not None)))
    if handed is not None:
        plan = pbt.adopt(plan, sweep.uri(handed.path))
    trials = sweep.tune.max_concurrent_trials
    resources = size_workers(plan.config.run, beside_engines(plan.config, nodes, trials, "tune.max_concurrent_trials"),
                             trials=trials, key="tune.max_concurrent_trials")
    callbacks = [RegisterPlacementGroup(janitor)]
    if sweep.tune.scheduler == "pbt":
        pbt.fit_reporting_checkpoints(plan, resources, callbacks)
    else:
        fit(plan, resources, [TuneReportCallback(), *callbacks])
