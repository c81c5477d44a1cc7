"""Promotion: the sweep's best trial (`results.best_trial`) exported as a Hugging Face folder, and best.json.

    <output_dir>/best/      the best trial's final checkpoint, exported and verified (framework/export.py)
    <output_dir>/best.json  {"trial", "metric", "value", "mode", "overrides", "path", "step", "checkpoint"}

`launch/serve.py serve.model_path=<output_dir>/best.json` serves it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, Optional

import pandas as pd

from framework.tune.sweep import Sweep
from framework.tune.results import best_trial, finished_trials


def promote_on_eval(table: pd.DataFrame, sweep: Sweep, output_dir: str) -> Optional[Dict[str, Any]]:
    """tune.metric an eval score: export every finished trial to <output_dir>/trials/<trial>, score each with the eval
    stage (tune.eval's overrides, the same for all), and write best.json for the best score; eval_ranking.csv lists all."""
    from framework.config import RunError
    from framework.evaluation.config import EVAL
    from framework.evaluation.job import run_eval
    from framework.export import export_checkpoint

    metric, mode = sweep.ranking
    candidates = finished_trials(table)
    if not len(candidates):
        return None
    rows = []
    for _, trial in candidates.iterrows():
        tracking = sweep.base.tracking  # the sweep's own: each export registered, each evaluation a run under it
        folder = export_checkpoint(trial["checkpoint"], os.path.join(output_dir, "trials", str(trial["trial"])), tracking=tracking)
        plan = EVAL.from_overrides([f"eval.model={folder}", *sweep.tune.eval])
        [record] = run_eval(dataclasses.replace(plan, tracking=tracking))
        if metric not in record["scores"]:
            raise RunError(f"tune.metric={metric}: the evaluation of trial {trial['trial']} gave no such score (it gave: "
                           f"{', '.join(sorted(record['scores']))}); name the task that gives it in tune.eval")
        score = record["scores"][metric]
        if bool(score.get("higher_is_better", True)) != (mode == "max"):
            raise RunError(f"tune.mode={mode}: {metric} is {'higher' if score.get('higher_is_better', True) else 'lower'}-is-better "
                           f"(eval.json); expected tune.mode={'max' if score.get('higher_is_better', True) else 'min'}")
        rows.append({"trial": str(trial["trial"]), metric: float(score["value"]), "stderr": score.get("stderr"),
                     "count": score.get("count"), "path": folder, "overrides": trial["overrides"],
                     "step": int(trial["steps"]), "checkpoint": trial["checkpoint"]})
    ranking = pd.DataFrame(rows).sort_values(metric, ascending=(mode == "min"), kind="stable")
    ranking.to_csv(os.path.join(output_dir, "eval_ranking.csv"), index=False)
    best = ranking.iloc[0]
    record = {
        "trial": best["trial"], "metric": metric, "value": float(best[metric]), "mode": mode,
        "overrides": best["overrides"].split() if best["overrides"] else [], "path": os.path.abspath(best["path"]),
        "step": int(best["step"]), "checkpoint": best["checkpoint"], "ranked_by": "eval", "eval": list(sweep.tune.eval),
    }
    with open(os.path.join(output_dir, "best.json"), "w") as f:
        json.dump(record, f, indent=2)
        f.write("\n")
    return record


def promote(table: pd.DataFrame, sweep: Sweep, output_dir: str) -> Optional[Dict[str, Any]]:
    """Export the best trial's final checkpoint to <output_dir>/best and write best.json; gives best.json's content (None: no trial to promote)."""
    from framework.export import export_checkpoint

    metric = sweep.tune.metric
    trial = best_trial(table, metric)
    if trial is None:
        return None
    best = table[table["trial"] == trial].iloc[0]
    # Straight from the checkpoint's URI (export downloads one on object storage itself), so that export.json
    # records where the checkpoint lives, not a temporary copy: launch/compress.py finds the training shards there.
    path = export_checkpoint(best["checkpoint"], os.path.join(output_dir, "best"), tracking=sweep.base.tracking)
    record = {
        "trial": str(best["trial"]),
        "metric": metric,
        "value": float(best[f"final_{metric}"]),
        "mode": sweep.tune.mode,
        "overrides": best["overrides"].split() if best["overrides"] else [],
        "path": os.path.abspath(path),
        "step": int(best["steps"]),
        "checkpoint": best["checkpoint"],
    }
    with open(os.path.join(output_dir, "best.json"), "w") as f:
        json.dump(record, f, indent=2)
        f.write("\n")
    return record
