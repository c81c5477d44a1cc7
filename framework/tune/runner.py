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
from framework.data.stream import quiet_data_logs
from framework.train.trainer import check_data
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
    # The driver was interrupted (Ctrl-C): nothing was written or promoted; the same command resumes.
    interrupted: bool = False


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


def read_shards(sweep: Sweep) -> Dict[str, Any]:
    """The prepared shards' manifest, once every trial the space can draw has been checked against it.

    What only the shards can tell (their seq_len, a swept global batch larger than the train split, a
    validation split smaller than a swept micro-batch on every worker) would otherwise fail every such
    trial after Ray had started it; the corners of the space (`Sweep.corners`) stand for all trials.
    """
    data_dir = sweep.job.data.output_dir
    try:
        manifest = read_manifest(data_dir)
    except Exception:  # noqa: BLE001 - a missing or unreadable manifest means no shards to share
        raise ConfigError(
            f"data.output_dir={data_dir}: no prepared shards there; run launch/prep.py with the same data settings first"
        ) from None
    check_data(sweep.job, manifest)
    for words, job in sweep.corners:
        try:
            check_data(job, manifest)
        except ConfigError as exc:
            raise ConfigError(f"{words}: {exc}") from None
    return manifest


def unfinished_trials(experiment: str) -> List[str]:
    """The trials of the experiment at `experiment` that a resume would run again (neither TERMINATED nor ERROR).

    Tuner.fit returns normally when the driver is interrupted (Ctrl-C), and the ResultGrid it returns
    then calls the trials it was running TERMINATED: Tune's clean-up stops them that way. The state
    Tune saved just before that clean-up, which Tuner.restore resumes from, still has them unfinished.
    """
    from ray.tune.experiment import Trial

    done = (Trial.TERMINATED, Trial.ERROR)
    return [trial.trial_id for trial in tune.ExperimentAnalysis(experiment).trials if trial.status not in done]


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


class KeepInRanges:
    """PBT's explore step for ranges: scaling by 0.8 or 1.2 may leave the range (optim.min_lr_ratio past 1,
    optim.warmup_steps past run.max_steps) and fail the trial; a value is brought back to the range's
    nearer end, which the checks before the sweep have tried."""

    def __init__(self, sweep: Sweep):
        self.ranges = {key: p.corners() for key, p in sweep.params.items() if p.dist is not None and p.dist != "choice"}

    def __call__(self, config: Dict[str, Any]) -> Dict[str, Any]:
        for key, (low, high) in self.ranges.items():
            if key in config:
                config[key] = type(config[key])(min(max(config[key], low), high))
        return config


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
            # A list makes PBT step to a neighbouring value; a domain it would scale by 0.8 or 1.2.
            hyperparam_mutations={k: list(p.args) if p.dist == "choice" else p.to_tune() for k, p in sweep.params.items() if p.dist is not None},
            quantile_fraction=c.pbt.quantile_fraction,
            resample_probability=c.pbt.resample_probability,
            custom_explore_fn=KeepInRanges(sweep),
        )
    from ray.tune.schedulers import FIFOScheduler

    return FIFOScheduler()


def param_space(sweep: Sweep) -> Dict[str, Any]:
    """The Tuner's param_space: each swept key's Ray Tune domain (grid axes as grid_search), pinned values as they are."""
    return {key: param.to_tune() for key, param in sweep.params.items()}


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
        param_space=param_space(sweep),
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


def release_placement_groups(janitor: Any, timeout_s: float = 60.0) -> None:
    """End the janitor once the trials Tune stopped last have given their workers' placement groups back.

    Placement groups live as long as the driver's job: one left behind would hold its CPUs for
    whatever this process runs next (another sweep, a training run).
    """
    left = ray.get(janitor.wait_released.remote(timeout_s))
    if left:
        print(f"tune: {left} trial placement groups were still held after {timeout_s:.0f}s; Ray frees them when this job ends", flush=True)
    ray.kill(janitor)


def run(sweep: Sweep) -> SweepResult:
    """Run (or resume) the sweep to the end, then write the table and plots and promote the best trial.

    Fails before Ray builds any trial when a corner of the space does not fit the prepared shards.
    An interrupted driver (Ctrl-C) gets back a result marked `interrupted`, with nothing written.
    """
    c = sweep.config
    read_shards(sweep)
    connect(sweep.job.run.ray_address)
    quiet_data_logs()
    storage_root = absolute(c.storage_path)
    sweep_dir = storage.join(storage_root, c.name)
    experiment = storage.join(sweep_dir, "tune")
    output_dir = absolute(c.output_dir)

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
        release_placement_groups(janitor)
    wall = time.perf_counter() - start

    unfinished = unfinished_trials(experiment)
    trials = report.outcomes(grid, unfinished)
    table = report.results_table(trials, sweep, storage_root)
    if unfinished:
        # A partial sweep is not a result: no table, plots or best.json that could pass for the sweep's.
        finished = len(table) - len(unfinished)
        print(f"tune: sweep {c.name} interrupted ({finished} of {sweep.trial_count} trials finished); run the same command to resume it", flush=True)
        return SweepResult(table, output_dir, None, wall, resumed, interrupted=True)
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
