"""What a sweep leaves a person to read: the results table and two plots (framework/tune/promotion.py exports the best trial).

    <output_dir>/results.csv, results.parquet   one row per trial, best first
    <output_dir>/history.parquet                every report of every trial (step, metrics, checkpoint)
    <output_dir>/curves.png                     the metric against step per trial; × ends a stopped trial
    <output_dir>/params.png                     the final metric against each swept value
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional

import pandas as pd

from framework.config import last_line
from framework.tune.sweep import Sweep
from framework.tune.space import format_value, trial_overrides

# A trial's status in the table. UNFINISHED: the driver was interrupted before the trial ended (a
# resume runs it again); it is neither completed nor stopped early.
COMPLETED, STOPPED, ERROR, UNFINISHED = "completed", "stopped", "error", "unfinished"


@dataclass
class TrialOutcome:
    """One trial as Tune recorded it."""

    trial_id: str
    config: Dict[str, Any]  # the swept values Tune chose
    history: pd.DataFrame  # one row per report: step, metrics, checkpoint_path, time_total_s
    error: Optional[str]
    finished: bool = True  # False: still to run when the driver was interrupted


def outcomes(results: Any, unfinished: Iterable[str] = ()) -> List[TrialOutcome]:
    """The trials of a Tune ResultGrid (trial folders are named by trial id); `unfinished` names those a resume runs again."""
    unfinished = set(unfinished)
    found = []
    for result in results:
        trial_id = os.path.basename(result.path.rstrip("/"))
        history = result.metrics_dataframe if result.metrics_dataframe is not None else pd.DataFrame()
        error = None if result.error is None else last_line(result.error)
        found.append(TrialOutcome(trial_id, dict(result.config or {}), history, error, trial_id not in unfinished))
    return found


def trial_status(trial: TrialOutcome, steps: int, max_steps: int) -> str:
    """How a trial ended: with an error, unfinished, at its last step, or stopped early by the scheduler."""
    if trial.error:
        return ERROR
    if not trial.finished:
        return UNFINISHED
    return COMPLETED if steps >= max_steps else STOPPED


def results_table(trials: List[TrialOutcome], sweep: Sweep) -> pd.DataFrame:
    """One row per trial: its values and overrides, final and best metric, steps, stopped early or not, wall time, checkpoint."""
    metric, mode = sweep.tune.metric, sweep.tune.mode
    rows = []
    for trial in trials:
        history = trial.history
        values = history[metric].dropna() if metric in history else pd.Series(dtype=float)
        steps = int(history["step"].max()) if "step" in history and len(history) else 0
        max_steps = int(trial.config.get("run.max_steps", sweep.base.run.max_steps))
        status = trial_status(trial, steps, max_steps)
        checkpoints = history.dropna(subset=["checkpoint_path"]) if "checkpoint_path" in history else history.iloc[0:0]
        row: Dict[str, Any] = {"trial": trial.trial_id, "status": status}
        row.update({key: trial.config.get(key) for key in sweep.params})
        row.update({
            "overrides": " ".join(trial_overrides(sweep.params, trial.config)) if trial.config else "",
            f"final_{metric}": float(values.iloc[-1]) if len(values) else math.nan,
            f"best_{metric}": float(values.min() if mode == "min" else values.max()) if len(values) else math.nan,
            "steps": steps,
            "stopped_early": status == STOPPED,
            "wall_s": float(history["time_total_s"].iloc[-1]) if "time_total_s" in history and len(history) else math.nan,
            "checkpoint": sweep.uri(checkpoints["checkpoint_path"].iloc[-1]) if len(checkpoints) else None,
            "checkpoint_step": int(checkpoints["step"].iloc[-1]) if len(checkpoints) else None,
            "error": trial.error,
        })
        rows.append(row)
    table = pd.DataFrame(rows)
    if len(table):
        table = table.sort_values(f"final_{metric}", ascending=(mode == "min"), na_position="last", kind="stable")
    return table.reset_index(drop=True)


def history_table(trials: List[TrialOutcome], metric: str) -> pd.DataFrame:
    """Every report of every trial, in order: trial, step, the metrics, the checkpoint's path."""
    columns = ["step", "tokens", "train_loss", "val_loss", "val_perplexity", "checkpoint_path", "time_total_s"]
    frames = []
    for trial in trials:
        frame = trial.history.reindex(columns=[c for c in columns if c in trial.history or c == metric])
        frames.append(frame.assign(trial=trial.trial_id))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["trial", *columns])


def save_tables(table: pd.DataFrame, history: pd.DataFrame, output_dir: str) -> None:
    os.makedirs(output_dir, exist_ok=True)
    table.to_csv(os.path.join(output_dir, "results.csv"), index=False)
    _parquet_safe(table).to_parquet(os.path.join(output_dir, "results.parquet"), index=False)
    _parquet_safe(history).to_parquet(os.path.join(output_dir, "history.parquet"), index=False)


def _parquet_safe(frame: pd.DataFrame) -> pd.DataFrame:
    """Columns mixing types (choice(4, auto)) become strings; Parquet wants one type per column."""
    frame = frame.copy()
    for column in frame.columns:
        kinds = {type(v) for v in frame[column].dropna()}
        if len(kinds) > 1 and not kinds <= {int, float}:
            frame[column] = frame[column].map(lambda v: None if v is None else format_value(v))
    return frame


def print_table(table: pd.DataFrame, sweep: Sweep) -> None:
    """The results table on the console, best trial first."""
    from rich.console import Console
    from rich.table import Table

    metric = sweep.tune.metric
    view = Table(title=f"sweep {sweep.tune.name}: {len(table)} trials, {metric} ({sweep.tune.mode})")
    columns = ["trial", "status", *sweep.params, f"final_{metric}", f"best_{metric}", "steps", "wall_s"]
    for column in columns:
        view.add_column(column, justify="left" if column in ("trial", "status") else "right")
    for _, row in table.iterrows():
        view.add_row(*(_cell(row[c]) for c in columns))
    Console(width=max(120, 16 * len(columns))).print(view)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4g}"
    return "" if value is None else str(value)


def _short(value: Any) -> str:
    """A swept value for a legend: floats to 4 significant digits (the table keeps them whole)."""
    return f"{value:.4g}" if isinstance(value, float) else format_value(value)


def plot_curves(trials: List[TrialOutcome], table: pd.DataFrame, sweep: Sweep, path: str) -> None:
    """The metric against step for every trial; a trial stopped early ends in ×, the best (`best_trial`) is drawn thick."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = sweep.tune.metric
    status = dict(zip(table["trial"], table["status"]))
    best = best_trial(table, sweep.tune.metric)
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for i, trial in enumerate(trials):
        if metric not in trial.history or "step" not in trial.history:
            continue
        points = trial.history[["step", metric]].dropna()
        if not len(points):
            continue
        color = f"C{i % 10}"
        label = f"{trial.trial_id}: " + " ".join(f"{k.rsplit('.', 1)[-1]}={_short(trial.config.get(k))}" for k in sweep.params if sweep.params[k].sampled)
        ax.plot(points["step"], points[metric], "-o", color=color, ms=3, lw=3 if trial.trial_id == best else 1.2, label=label)
        end = {STOPPED: "x", ERROR: "s"}.get(status.get(trial.trial_id), "o")
        ax.plot(points["step"].iloc[-1], points[metric].iloc[-1], end, color=color, ms=11 if end == "x" else 6, mew=2.5)
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.set_title(f"sweep {sweep.tune.name}: {metric} per trial (× stopped early, thick: best)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_params(table: pd.DataFrame, sweep: Sweep, path: str) -> None:
    """The final metric against each swept value, one panel per key; × marks a trial stopped early, ★ the best (`best_trial`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = f"final_{sweep.tune.metric}"
    swept = [p for p in sweep.params.values() if p.sampled] or list(sweep.params.values())
    fig, axes = plt.subplots(1, max(1, len(swept)), figsize=(max(7.0, 4.5 * len(swept)), 4.5), squeeze=False)
    rows = table[table["status"] != ERROR]
    best = best_trial(table, sweep.tune.metric)
    for ax, param in zip(axes[0], swept):
        values = list(rows[param.key]) if param.key in rows else []
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        if numeric:
            xs = values
        else:
            categories = sorted({format_value(v) for v in values})
            xs = [categories.index(format_value(v)) for v in values]
            ax.set_xticks(range(len(categories)), categories)
        for x, (_, row) in zip(xs, rows.iterrows()):
            stopped = row["status"] == STOPPED
            ax.plot(x, row[metric], "x" if stopped else "o", color="C1" if stopped else "C0", ms=9 if stopped else 7, mew=2)
            if row["trial"] == best:
                ax.plot(x, row[metric], "*", color="C3", ms=16, zorder=5)
        spread = numeric and values and min(values) > 0 and max(values) / min(values) >= 100
        if numeric and (param.log or spread):
            ax.set_xscale("log")
        ax.set_xlabel(param.key)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    fig.suptitle(f"sweep {sweep.tune.name}: {metric} against each swept value\n(× stopped early, ★ best)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def finished_trials(table: pd.DataFrame) -> pd.DataFrame:
    """The ended trials whose final report came with a checkpoint (every completed trial: the loop checkpoints at
    run.max_steps), so that exported weights are exactly those the final metric was measured on."""
    if not len(table):
        return table
    ended = ~table["status"].isin([ERROR, UNFINISHED])
    return table[ended & table["checkpoint"].notna() & (table["checkpoint_step"] == table["steps"])]


def best_trial(table: pd.DataFrame, metric: str) -> Optional[str]:
    """The trial promotion exports (and the plots mark): the best final metric among the finished trials."""
    candidates = finished_trials(table)
    if not len(candidates):
        return None
    candidates = candidates.dropna(subset=[f"final_{metric}"])
    return str(candidates["trial"].iloc[0]) if len(candidates) else None  # the table is sorted best first
