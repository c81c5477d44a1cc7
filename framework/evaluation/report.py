"""eval.json, the printed table, and the comparison plot."""

from __future__ import annotations

import math
import os
from typing import Any, Dict, List, Optional

from framework.evaluation.config import EVAL_KIND


def write_scores(path: str, record: Dict[str, Any]) -> None:
    """Write eval.json whole or not at all."""
    from framework import storage

    storage.write_json(os.path.abspath(path), {"kind": EVAL_KIND, **record})


def _cell(score: Optional[Dict[str, Any]]) -> str:
    if score is None:
        return "–"
    value, stderr = score["value"], score.get("stderr")
    text = f"{value:.4g}"
    return f"{text} ± {stderr:.2g}" if isinstance(stderr, float) and math.isfinite(stderr) else text


def score_names(records: List[Dict[str, Any]]) -> List[str]:
    return sorted({name for r in records for name in r["scores"]})


def print_table(records: List[Dict[str, Any]]) -> None:
    """One row per score, one column per model (a model that lacks a score shows –)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="evaluation")
    table.add_column("score")
    for r in records:
        table.add_column(r["model_id"], justify="right")
    table.add_column("n", justify="right")
    for name in score_names(records):
        counts = {r["scores"][name].get("count") for r in records if name in r["scores"]}
        table.add_row(name, *(_cell(r["scores"].get(name)) for r in records), ", ".join(str(c) for c in sorted(counts, key=str)))
    Console(width=160).print(table)


def plot(records: List[Dict[str, Any]], path: str) -> None:
    """One panel per score, a bar per model with its standard error."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = score_names(records)
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
    labels = [r["model_id"] for r in records]
    for ax, name in zip(axes.flat, names):
        values = [r["scores"].get(name, {}).get("value", math.nan) for r in records]
        errors = [r["scores"].get(name, {}).get("stderr") or 0.0 for r in records]
        ax.bar(range(len(records)), values, yerr=errors, color=[f"C{i}" for i in range(len(records))], capsize=3)
        ax.set_xticks(range(len(records)), labels, rotation=20, ha="right", fontsize=8)
        higher = next((r["scores"][name].get("higher_is_better", True) for r in records if name in r["scores"]), True)
        ax.set_title(f"{name} ({'higher' if higher else 'lower'} is better)", fontsize=9)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
