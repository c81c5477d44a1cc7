"""Promotion: the sweep's best trial (`results.best_trial`) exported as a Hugging Face folder, and best.json.

    <output_dir>/best/      the best trial's final checkpoint, exported and verified (framework/export.py)
    <output_dir>/best.json  {"trial", "metric", "value", "mode", "overrides", "path", "step", "checkpoint"}

`launch/serve.py serve.model_path=<output_dir>/best.json` serves it.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional

import pandas as pd

from framework.tune.sweep import Sweep
from framework.tune.results import best_trial


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
    path = export_checkpoint(best["checkpoint"], os.path.join(output_dir, "best"))
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
