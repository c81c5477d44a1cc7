"""Run a planned sweep: size its trials to the cluster, build Ray Tune's Tuner (search, scheduler), fit or resume, publish.

Layout under <tune.storage_path>/<tune.name> (a local directory or a URI):
    tune/          Ray Tune's experiment: its state (for resuming) and every trial's result.json
    <trial_id>/    each trial's Train run: checkpoint_*/, logs/ (metrics.jsonl, TensorBoard)
    sweep.json     what the sweep was started with (`Sweep.fingerprint`); a resume must match it
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import pandas as pd
import ray.tune as tune

from framework import storage
from framework.cluster import connect
from framework.config import ConfigError
from framework.train.plan import beside_engines, node_resources, size_workers
from framework.tune import placement, promotion, results
from framework.tune.algorithms import SCHEDULERS, SEARCHES
from framework.tune.sweep import Sweep, SweepPlan
from framework.tune.trial import DRIVER_RESOURCES, train_trial


@dataclass
class SweepResult:
    table: pd.DataFrame  # one row per trial, best first
    output_dir: str
    best: Optional[Dict[str, Any]]  # best.json's content; None when nothing was promoted
    wall_s: float
    resumed: bool
    # The driver was interrupted (Ctrl-C): nothing was written or promoted; the same command resumes.
    interrupted: bool = False


def check_fits(sweep: Sweep, nodes: List[Dict[str, Any]]) -> None:
    """Every corner's trials, tune.max_concurrent_trials at a time, fit the cluster's nodes (sized as each trial sizes its own)."""
    for words, config in [("", sweep.base), *sweep.corners]:
        try:
            trials = sweep.tune.max_concurrent_trials
            size_workers(config.run, beside_engines(config, nodes, trials, "tune.max_concurrent_trials"), trials=trials,
                         key="tune.max_concurrent_trials")
        except ConfigError as exc:
            raise ConfigError(f"{words}: {exc}" if words else str(exc)) from None


def unfinished_trials(experiment: str) -> List[str]:
    """The trials of the experiment at `experiment` that a resume would run again (neither TERMINATED nor ERROR).

    Tuner.fit returns normally when the driver is interrupted (Ctrl-C), and the ResultGrid it returns
    then calls the trials it was running TERMINATED: Tune's clean-up stops them that way. The state
    Tune saved just before that clean-up, which Tuner.restore resumes from, still has them unfinished.
    """
    from ray.tune.experiment import Trial

    done = (Trial.TERMINATED, Trial.ERROR)
    return [trial.trial_id for trial in tune.ExperimentAnalysis(experiment).trials if trial.status not in done]


def param_space(sweep: Sweep) -> Dict[str, Any]:
    """The Tuner's param_space: each key's Ray Tune domain (grid axes as grid_search), pinned values as they are."""
    return {key: param.domain(grid=sweep.tune.search == "grid") for key, param in sweep.params.items()}


def build_tuner(sweep: SweepPlan, nodes: List[Dict[str, Any]], janitor: Any) -> tune.Tuner:
    """A new Tuner, or the interrupted one at the sweep's experiment restored (it then carries its own search state)."""
    trainable = tune.with_resources(tune.with_parameters(train_trial, sweep=sweep, nodes=nodes, janitor=janitor), DRIVER_RESOURCES)
    experiment = sweep.experiment_dir
    if tune.Tuner.can_restore(experiment):
        return tune.Tuner.restore(experiment, trainable=trainable, resume_unfinished=True, resume_errored=False)
    t = sweep.tune
    return tune.Tuner(
        trainable,
        param_space=param_space(sweep),
        tune_config=tune.TuneConfig(
            metric=t.metric,
            mode=t.mode,
            search_alg=SEARCHES.get(sweep.tune.search).build(sweep),
            scheduler=SCHEDULERS.get(sweep.tune.scheduler).build(sweep),
            num_samples=t.num_samples,
            trial_name_creator=lambda trial: trial.trial_id,
            trial_dirname_creator=lambda trial: trial.trial_id,
        ),
        run_config=tune.RunConfig(
            name=os.path.basename(experiment),
            storage_path=sweep.sweep_dir,
            verbose=t.verbose,
            # A trial's final report ends it before PBT sees it: exploiting there would hand a finished
            # trial the donor's final checkpoint with nothing left to train (it would only relabel it).
            stop={"step": sweep.last_step} if t.scheduler == "pbt" else None,
            # Train retries a failing run itself (run.max_failures); a trial that still fails is reported.
            failure_config=tune.FailureConfig(max_failures=0),
            # PBT clones trials from these (copies of their Train checkpoints): all are kept, since a
            # paused clone may start long after its donor moved on.
            checkpoint_config=tune.CheckpointConfig(num_to_keep=None),
        ),
    )


def fingerprint_uri(sweep: Sweep) -> str:
    return storage.join(sweep.sweep_dir, "sweep.json")


def check_resume(sweep: Sweep) -> bool:
    """Whether a sweep of this name is there to resume; refuses one started with other settings (sweep.json)."""
    resumed = tune.Tuner.can_restore(sweep.experiment_dir)
    recorded = fingerprint_uri(sweep)
    if resumed and storage.exists(recorded) and storage.read_json(recorded) != sweep.fingerprint():
        raise ConfigError(
            f"tune.name={sweep.tune.name}: a sweep of this name at {sweep.sweep_dir} was started with other settings "
            f"(space, search, scheduler or training overrides); resume it unchanged, or pick a new tune.name"
        )
    return resumed


def publish(sweep: Sweep, trials: List[results.TrialOutcome], table: pd.DataFrame) -> Optional[Dict[str, Any]]:
    """Write the table, history and plots into tune.output_dir, print the table, promote the best trial."""
    t, out = sweep.tune, sweep.tune.output_dir
    os.makedirs(out, exist_ok=True)
    results.save_tables(table, results.history_table(trials, t.metric), out)
    results.plot_curves(trials, table, sweep, os.path.join(out, "curves.png"))
    results.plot_params(table, sweep, os.path.join(out, "params.png"))
    results.print_table(table, sweep)
    if sweep.ranking is not None:
        best = promotion.promote_on_eval(table, sweep, out)  # exports every finished trial to rank them
    else:
        if t.export_trials:
            promotion.export_trials(table, sweep, out)
        best = promotion.promote(table, sweep, out) if t.promote else None
    if "://" in sweep.sweep_dir:
        mirror(out, storage.join(sweep.sweep_dir, PUBLISHED), best)
    return best


# Under a sweep on object storage, the published results are copied beside its trials' runs.
PUBLISHED = "published"


def mirror(output_dir: str, uri: str, best: Optional[Dict[str, Any]]) -> None:
    """Copy what a sweep published (tables, plots, best/ and best.json) to object storage; best.json there points at best/ beside it."""
    storage.upload_dir(output_dir, uri)
    if best is not None:
        storage.write_json(storage.join(uri, "best.json"), {**best, "path": "best"})
    print(f"tune: results, plots, best/ and best.json copied to {uri}", flush=True)


def run_sweep(sweep: SweepPlan) -> SweepResult:
    """Run (or resume) the sweep to the end, then write the table and plots and promote the best trial.

    Fails before Ray builds any trial when a corner of the space does not fit the cluster. An
    interrupted driver (Ctrl-C) gets back a result marked `interrupted`, with nothing written.
    """
    t = sweep.tune
    resumed = check_resume(sweep)
    connect(sweep.base.run.ray_address)
    nodes = node_resources()
    check_fits(sweep, nodes)
    storage.write_json(fingerprint_uri(sweep), sweep.fingerprint())
    print(
        f"tune: {'resuming' if resumed else 'starting'} sweep {t.name}: {sweep.trial_count} trials "
        f"({t.search} search, {t.scheduler}), {t.max_concurrent_trials} at a time, {t.metric} ({t.mode}) → {sweep.sweep_dir}",
        flush=True,
    )
    start = time.perf_counter()
    janitor = placement.PlacementGroupJanitor.remote()
    try:
        grid = build_tuner(sweep, nodes, janitor).fit()
    finally:
        placement.release(janitor)
    wall = time.perf_counter() - start

    unfinished = unfinished_trials(sweep.experiment_dir)
    trials = results.outcomes(grid, unfinished)
    table = results.results_table(trials, sweep)
    # Interrupted: a trial Tune saved as unfinished, or fewer trials than the sweep has (Ctrl-C between a trial's
    # end and the search's next suggestion leaves nothing unfinished, only trials never made).
    if unfinished or len(table) < sweep.trial_count:
        # A partial sweep is not a result: no table, plots or best.json that could pass for the sweep's.
        finished = len(table) - len(unfinished)
        print(f"tune: sweep {t.name} interrupted ({finished} of {sweep.trial_count} trials finished); run the same command to resume it", flush=True)
        return SweepResult(table, t.output_dir, None, wall, resumed, interrupted=True)
    best = publish(sweep, trials, table)
    if best:
        print(f"tune: best trial {best['trial']}: {best['metric']}={best['value']:.4f} ({' '.join(best['overrides'])}) → {best['path']}", flush=True)
    print(f"tune: {len(table)} trials in {wall:.0f}s; results, plots and best.json in {t.output_dir}", flush=True)
    return SweepResult(table, t.output_dir, best, wall, resumed)
