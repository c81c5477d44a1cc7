"""Promotion: the sweep's best trial (`results.best_trial`) exported as a Hugging Face folder, and best.json.

    <output_dir>/best/            the best trial's final checkpoint, exported and verified (framework/export.py)
    <output_dir>/best.json        {"trial", "metric", "value", "mode", "overrides", "path", "step", "checkpoint"}
    <output_dir>/trials/<trial>/  every finished trial exported (tune.export_trials, or a ranking on an eval score)

`launch/serve.py serve.model_path=<output_dir>/best.json` serves the best. A LoRA trial's export holds its PEFT
adapter folder too (`adapter/`), so that `serve.adapters_from=<output_dir>` serves every trial on their base.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, Optional

import pandas as pd

from framework.hf_folder import TRIALS_DIR
from framework.tune.sweep import Sweep
from framework.tune.results import best_trial, finished_trials


def export_trial(checkpoint: str, folder: str, sweep: Sweep) -> str:
    """A trial's checkpoint exported to `folder` (straight from its URI: export.json records where it lives); a LoRA
    trial's with its adapter folder. Registered in the sweep's tracking, if any."""
    from framework.export import export_checkpoint
    from framework.train.checkpoint import read_config

    lora = read_config(checkpoint).model.lora is not None
    return export_checkpoint(checkpoint, folder, adapter=lora, tracking=sweep.base.tracking)


def export_trials(table: pd.DataFrame, sweep: Sweep, output_dir: str) -> Dict[str, str]:
    """Every finished trial exported to <output_dir>/trials/<trial>: trial → folder."""
    return {str(trial["trial"]): export_trial(trial["checkpoint"], os.path.join(output_dir, TRIALS_DIR, str(trial["trial"])), sweep)
            for _, trial in finished_trials(table).iterrows()}


def promote_on_eval(table: pd.DataFrame, sweep: Sweep, output_dir: str) -> Optional[Dict[str, Any]]:
    """tune.metric an eval score: export every finished trial to <output_dir>/trials/<trial>, score each with the eval
    stage (tune.eval's overrides, the same for all), and write best.json for the best score; eval_ranking.csv lists all."""
    from framework.config import RunError
    from framework.evaluation.config import EVAL
    from framework.evaluation.job import run_eval

    metric, mode = sweep.ranking
    candidates = finished_trials(table)
    if not len(candidates):
        return None
    folders = export_trials(table, sweep, output_dir)
    rows = []
    for _, trial in candidates.iterrows():
        folder = folders[str(trial["trial"])]
        plan = EVAL.from_overrides([f"eval.model={folder}", *sweep.tune.eval])
        # The sweep's own tracking: each evaluation a run under it.
        [record] = run_eval(dataclasses.replace(plan, tracking=sweep.base.tracking))
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
    metric = sweep.tune.metric
    trial = best_trial(table, metric)
    if trial is None:
        return None
    best = table[table["trial"] == trial].iloc[0]
    # Straight from the checkpoint's URI (export downloads one on object storage itself), so that export.json
    # records where the checkpoint lives, not a temporary copy: launch/compress.py finds the training shards there.
    path = export_trial(best["checkpoint"], os.path.join(output_dir, "best"), sweep)
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
