"""Run a sweep: size trials to the cluster, build Ray Tune's Tuner (search, scheduler), fit or resume, report, promote.

Layout under <tune.storage_path>/<tune.name> (a local directory or a URI):
    tune/          Ray Tune's experiment: its state (for resuming) and every trial's result.json
    <trial_id>/    each trial's Train run: checkpoint_*/, logs/ (metrics.jsonl, TensorBoard)
    sweep.json     what the sweep was started with; a resume must match it
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from typing import Any, Dict, List, Optional

import pandas as pd
import ray
import ray.tune as tune

from framework import storage
from framework.cluster import cluster_cpus, cluster_gpus, connect
from framework.config import ConfigError, absolute
from framework.data.shards import read_manifest
from framework.tune import results as report
from framework.tune.sweep import Sweep, format_value
from framework.tune.trial import DRIVER_RESOURCES, PlacementGroupJanitor, train_trial


@dataclass
class SweepResult:
    table: pd.DataFrame  # one row per trial, best first
    output_dir: str
    best: Optional[Dict[str, Any]]  # best.json's content; None when nothing was promoted
    wall_s: float
    resumed: bool


def fingerprint(sweep: Sweep) -> Dict[str, Any]:
    """What decides a sweep's trials; a sweep resumed under the same name must not differ in any of it."""
    c = sweep.config
    return {
        "base_overrides": sweep.base_overrides,
        "space": {k: p.text for k, p in sweep.params.items()},
        "search": c.search, "scheduler": c.scheduler, "metric": c.metric, "mode": c.mode,
        "num_samples": c.num_samples, "seed": c.seed,
    }


def trial_resources(sweep: Sweep) -> List[str]:
    """Overrides that let `max_concurrent_trials` trials and Ray Data's reads fit the cluster together.

    Train workers of concurrent trials share the cluster; a CPU trial's workers are sized down (at most
    1 CPU each) so that all of them plus run.data_cpus fit, and a sweep that cannot fit fails here.
    """
    run, n = sweep.job.run, sweep.config.max_concurrent_trials
    cpus, gpus = cluster_cpus(), cluster_gpus()
    workers = n * run.num_workers
    if run.gpus_per_worker and workers * run.gpus_per_worker > gpus:
        raise ConfigError(
            f"tune.max_concurrent_trials={n}: {n} trials × {run.num_workers} workers × {run.gpus_per_worker} GPUs "
            f"need {workers * run.gpus_per_worker:g} GPUs, the cluster has {gpus:g}"
        )
    spare = cpus - run.data_cpus
    per_worker = run.cpus_per_worker
    if per_worker is None:
        per_worker = min(1.0, spare / workers) if not run.gpus_per_worker else max(1.0, min(8.0, spare / workers))
        per_worker = float(f"{per_worker:.3g}") if per_worker > 0 else per_worker
    if per_worker <= 0 or workers * per_worker > spare + 1e-9:
        raise ConfigError(
            f"tune.max_concurrent_trials={n}: {n} trials × {run.num_workers} workers × {per_worker:g} CPUs plus "
            f"run.data_cpus={run.data_cpus:g} for reading do not fit the cluster's {cpus:g} CPUs; "
            f"lower tune.max_concurrent_trials, run.num_workers or run.cpus_per_worker"
        )
    return [f"run.cpus_per_worker={format_value(float(per_worker))}"]


def absolute_paths(sweep: Sweep) -> List[str]:
    """Trials run in Tune's trial folders, so paths the base config names relatively are pinned absolute."""
    job = sweep.job
    pinned = [f"data.output_dir={absolute(job.data.output_dir)}"]
    if job.model.pretrained_path:
        pinned.append(f"model.pretrained_path={absolute(job.model.pretrained_path)}")
    if job.data.tokenizer.path:
        pinned.append(f"data.tokenizer.path={absolute(job.data.tokenizer.path)}")
    return pinned


def search_algorithm(sweep: Sweep) -> Any:
    """Random and grid search: Tune's variant generator (which limits concurrency itself); Optuna: its TPE sampler."""
    c = sweep.config
    if c.search == "optuna":
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        return ConcurrencyLimiter(OptunaSearch(seed=c.seed), max_concurrent=c.max_concurrent_trials)
    from ray.tune.search import BasicVariantGenerator

    return BasicVariantGenerator(random_state=c.seed, max_concurrent=c.max_concurrent_trials)


def last_step(sweep: Sweep) -> int:
    """The most steps any trial trains (run.max_steps may itself be swept)."""
    swept = sweep.params["run.max_steps"].corners() if "run.max_steps" in sweep.params else []
    return max([sweep.job.run.max_steps, *swept])


def scheduler(sweep: Sweep) -> Any:
    c = sweep.config
    if c.scheduler == "asha":
        from ray.tune.schedulers import ASHAScheduler

        # One past the last step: a trial that reaches run.max_steps ends by itself, cleanly, rather
        # than being stopped by ASHA at its final report.
        return ASHAScheduler(time_attr="step", max_t=last_step(sweep) + 1, grace_period=c.asha.grace_period, reduction_factor=c.asha.reduction_factor)
    if c.scheduler == "pbt":
        from ray.tune.schedulers import PopulationBasedTraining

        return PopulationBasedTraining(
            time_attr="step",
            perturbation_interval=c.pbt.perturbation_interval,
            hyperparam_mutations={k: p.to_tune() for k, p in sweep.params.items() if p.dist is not None},
            quantile_fraction=c.pbt.quantile_fraction,
            resample_probability=c.pbt.resample_probability,
        )
    from ray.tune.schedulers import FIFOScheduler

    return FIFOScheduler()


def build_tuner(sweep: Sweep, trial_sweep: Sweep, storage_root: str, experiment: str, janitor: Any) -> tune.Tuner:
    """A new Tuner, or the interrupted one at `experiment` restored (it then carries its own search state)."""
    trainable = tune.with_resources(
        tune.with_parameters(train_trial, sweep=trial_sweep, storage_root=storage_root, janitor=janitor), DRIVER_RESOURCES
    )
    if tune.Tuner.can_restore(experiment):
        return tune.Tuner.restore(experiment, trainable=trainable, resume_unfinished=True, resume_errored=False)
    c = sweep.config
    return tune.Tuner(
        trainable,
        param_space={k: p.to_tune() for k, p in sweep.params.items()},
        tune_config=tune.TuneConfig(
            metric=c.metric,
            mode=c.mode,
            search_alg=search_algorithm(sweep),
            scheduler=scheduler(sweep),
            num_samples=c.num_samples,
            trial_name_creator=lambda trial: trial.trial_id,
            trial_dirname_creator=lambda trial: trial.trial_id,
        ),
        run_config=tune.RunConfig(
            name=os.path.basename(experiment),
            storage_path=os.path.dirname(experiment),
            verbose=c.verbose,
            # A trial's final report ends it before PBT sees it: exploiting there would hand a finished
            # trial the donor's final checkpoint with nothing left to train (it would only relabel it).
            stop={"step": last_step(sweep)} if c.scheduler == "pbt" else None,
            # Train retries a failing run itself (run.max_failures); a trial that still fails is reported.
            failure_config=tune.FailureConfig(max_failures=0),
            # PBT clones trials from these (copies of their Train checkpoints): all are kept, since a
            # paused clone may start long after its donor moved on.
            checkpoint_config=tune.CheckpointConfig(num_to_keep=None),
        ),
    )


def run(sweep: Sweep) -> SweepResult:
    """Run (or resume) the sweep to the end, then write the table and plots and promote the best trial."""
    c = sweep.config
    connect(sweep.job.run.ray_address)
    ray.data.DataContext.get_current().enable_progress_bars = False
    storage_root = absolute(c.storage_path)
    sweep_dir = storage.join(storage_root, c.name)
    experiment = storage.join(sweep_dir, "tune")
    output_dir = absolute(c.output_dir)
    try:
        read_manifest(sweep.job.data.output_dir)
    except Exception:  # noqa: BLE001 - a missing or unreadable manifest means no shards to share
        raise ConfigError(
            f"data.output_dir={sweep.job.data.output_dir}: no prepared shards there; run launch/prep.py with the same data settings first"
        ) from None

    resumed = tune.Tuner.can_restore(experiment)
    recorded = storage.join(sweep_dir, "sweep.json")
    if resumed and storage.exists(recorded) and storage.read_json(recorded) != fingerprint(sweep):
        raise ConfigError(
            f"tune.name={c.name}: a sweep of this name at {sweep_dir} was started with other settings "
            f"(space, search, scheduler or training overrides); resume it unchanged, or pick a new tune.name"
        )
    storage.write_json(recorded, fingerprint(sweep))
    trial_sweep = replace(sweep, base_overrides=sweep.base_overrides + absolute_paths(sweep) + trial_resources(sweep))
    print(
        f"tune: {'resuming' if resumed else 'starting'} sweep {c.name}: {sweep.trial_count} trials "
        f"({c.search} search, {c.scheduler}), {c.max_concurrent_trials} at a time, {c.metric} ({c.mode}) → {sweep_dir}",
        flush=True,
    )
    start = time.perf_counter()
    janitor = PlacementGroupJanitor.remote()
    try:
        grid = build_tuner(sweep, trial_sweep, storage_root, experiment, janitor).fit()
    finally:
        ray.kill(janitor)
    wall = time.perf_counter() - start

    trials = report.outcomes(grid)
    table = report.results_table(trials, sweep, storage_root)
    os.makedirs(output_dir, exist_ok=True)
    report.save_tables(table, report.history_table(trials, c.metric), output_dir)
    report.plot_curves(trials, table, sweep, os.path.join(output_dir, "curves.png"))
    report.plot_params(table, sweep, os.path.join(output_dir, "params.png"))
    report.print_table(table, sweep)
    best = report.promote(table, sweep, output_dir) if c.promote else None
    if best:
        print(f"tune: best trial {best['trial']}: {best['metric']}={best['value']:.4f} ({' '.join(best['overrides'])}) → {best['path']}", flush=True)
    print(f"tune: {len(table)} trials in {wall:.0f}s; results, plots and best.json in {output_dir}", flush=True)
    return SweepResult(table, output_dir, best, wall, resumed)
