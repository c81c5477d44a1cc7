"""launch/promote.py: gate a candidate on its evaluation against the champion, then record it as the model serving;
or put the previous champion back (rollback).

Scores come from each folder's eval.json (launch/eval.py). A folder without one, or without a score the gate
names, is evaluated first with the gate's own eval overrides (promote.gate.eval), so both sides of every check
are computed the same way.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path
from typing import Any, Dict, List, Optional

from framework.config import ConfigError, RunError
from framework.evaluation.config import EVAL, EVAL_FILE, is_scores_file, read_scores
from framework.promote.config import PromoteConfig, PromoteRoot
from framework.tracking import TrackingConfig
from framework.promote.gate import Check, judge, missing
from framework.promote.record import read_record, write_record


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def model_folder(spec: str, key: str) -> Path:
    from framework.hf_folder import check_model_folder, resolve_model_path

    folder = resolve_model_path(spec, key)
    check_model_folder(folder, key)
    return folder


def scores_of(folder: Path, c: PromoteConfig, role: str) -> Dict[str, Any]:
    """The folder's scores from its eval.json, evaluated first (promote.gate.eval) if it lacks one the gate names."""
    path = folder / EVAL_FILE
    scores = read_scores(str(path), f"promote.{role}")["scores"] if path.is_file() else {}
    if missing(c.gate, scores):
        from framework.evaluation.job import run_eval

        print(f"promote: {role} {folder}: evaluating ({', '.join(missing(c.gate, scores))} not in its {EVAL_FILE})", flush=True)
        scores = run_eval(EVAL.from_overrides([f"eval.model={folder}", *c.gate.eval]))[0]["scores"]
    lacking = missing(c.gate, scores)
    if lacking:
        raise RunError(f"promote.gate: the {role} {folder} has no score {lacking[0]} after evaluation with "
                       f"promote.gate.eval={list(c.gate.eval)}; name the task that gives it there")
    return scores


def registered_version(folder: Path, tracking: TrackingConfig) -> Optional[Dict[str, str]]:
    """The model version an export of `folder` registered (its export.json), if it is a version of tracking.registered_model."""
    import json

    from framework.export import EXPORT_MARKER

    marker = folder / EXPORT_MARKER
    version = (json.loads(marker.read_text()).get("mlflow") or {}).get("model_version") if marker.is_file() else None
    return version if version and version.get("name") == tracking.registered_model else None


def registry_champion(tracking: TrackingConfig) -> Optional[Path]:
    """The folder of the registered version that carries the alias `champion` (tracking=mlflow), if one does."""
    if tracking.backend == "none":
        return None
    from framework import tracking as track

    version = track.champion_version(tracking)
    return Path(version.tags[track.FOLDER_TAG]) if version is not None else None


def champion_scores(c: PromoteConfig, record: Optional[Dict[str, Any]],
                    tracking: TrackingConfig) -> Optional[Dict[str, Any]]:
    """The scores the candidate must beat: promote.champion's, else the registry's champion (tracking=mlflow), else
    the serving model's (the record's), else none."""
    if c.champion is not None:
        if is_scores_file(c.champion):
            scores = read_scores(c.champion, "promote.champion")["scores"]
            if missing(c.gate, scores):
                raise ConfigError(f"promote.champion={c.champion}: has no score {missing(c.gate, scores)[0]} (the gate needs it)")
            return scores
        return scores_of(model_folder(c.champion, "promote.champion"), c, "champion")
    registered = registry_champion(tracking)
    if registered is not None:
        print(f"promote: the champion is the registry's: {tracking.registered_model}@champion → {registered}", flush=True)
        return scores_of(registered, c, "champion")
    if record is None:
        return None
    return scores_of(Path(record["path"]), c, "champion")


def print_checks(checks: List[Check]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="promotion gate")
    for column in ("score", "kind", "candidate", "champion", "change", "needed", "passed"):
        table.add_column(column)
    for k in checks:
        table.add_row(k.score, k.kind, f"{k.candidate:.6g}", f"{k.champion:.6g}", f"{k.gain:+.6g}",
                      f"≥ {k.margin:g}" if k.kind == "metric" else f"≥ -{k.margin:g}", "yes" if k.passed else "NO")
    Console(width=160).print(table)


def entry(folder: Path, how: str, scores: Dict[str, Any], checks: List[Check],
          version: Optional[Dict[str, str]]) -> Dict[str, Any]:
    return {"path": str(folder), "model_id": folder.name, "how": how, "at": _now(), "model_version": version,
            "scores": {name: {k: v for k, v in score.items() if k != "answers"} for name, score in sorted(scores.items())},
            "checks": [{**k.__dict__, "gain": k.gain, "passed": k.passed} for k in checks]}


def promote(c: PromoteConfig, tracking: TrackingConfig) -> Dict[str, Any]:
    """Gate the candidate; unless promote.action=check, record it as the champion. Raises RunError when refused."""
    record = read_record(c.record)
    candidate = model_folder(c.candidate, "promote.candidate")
    version = registered_version(candidate, tracking)
    if tracking.backend != "none" and version is None and c.action == "promote":
        raise RunError(f"promote.candidate={c.candidate}: not a registered version of {tracking.registered_model} (export it "
                       f"with tracking=mlflow tracking.registered_model={tracking.registered_model}); nothing was changed")
    if record is not None and Path(record["path"]) == candidate and c.champion is None:
        raise RunError(f"promote.candidate={c.candidate}: is the champion already (promote.record={c.record})")
    scores = scores_of(candidate, c, "candidate")
    champion = champion_scores(c, record, tracking)
    checks = judge(c.gate, scores, champion)
    if checks:
        print_checks(checks)
    failed = [k for k in checks if not k.passed]
    if failed:
        raise RunError(f"promote: refused: {failed[0].why()}")
    if champion is None:
        print(f"promote: no champion yet ({c.record} does not exist): the candidate has nothing to beat", flush=True)
    if c.action == "check":
        print(f"promote: {candidate} passes the gate (promote.action=check: nothing recorded)", flush=True)
        return record or {}
    history = ([*record["history"], record["current"]] if record else [])
    new = {"path": str(candidate), "current": entry(candidate, "promote", scores, checks, version), "history": history,
           "rolled_back": record.get("rolled_back", []) if record else []}
    write_record(c.record, new)
    print(f"promote: {candidate} is the champion now (recorded in {c.record})", flush=True)
    crown(tracking, version)
    return new


def crown(tracking: TrackingConfig, version: Optional[Dict[str, str]]) -> None:
    """Move the registry's alias `champion` to `version` (tracking=mlflow)."""
    if tracking.backend == "none" or version is None:
        return
    from framework import tracking as track

    track.set_champion(tracking, version["version"])
    print(f"promote: {version['name']} version {version['version']} carries the alias {track.CHAMPION_ALIAS}", flush=True)


def rollback(c: PromoteConfig, tracking: TrackingConfig) -> Dict[str, Any]:
    """Make the previous champion current again; the one rolled back from moves to `rolled_back` (a second rollback
    goes one further back)."""
    record = read_record(c.record)
    if record is None or not record["history"]:
        raise RunError(f"promote.record={c.record}: " + ("no promotion recorded" if record is None
                                                            else "no earlier champion to roll back to"))
    previous = record["history"][-1]
    if not os.path.isdir(previous["path"]):
        raise RunError(f"promote: the previous champion {previous['path']} is gone; nothing was changed")
    current = {**previous, "how": "rollback", "at": _now(), "rolled_back_from": record["path"]}
    new = {"path": previous["path"], "current": current, "history": record["history"][:-1],
           "rolled_back": [*record.get("rolled_back", []), {**record["current"], "rolled_back_at": _now()}]}
    write_record(c.record, new)
    print(f"promote: rolled back to {previous['path']} (from {record['path']}; recorded in {c.record})", flush=True)
    crown(tracking, previous.get("model_version"))
    return new


def run_promote(root: PromoteRoot) -> Dict[str, Any]:
    c = root.promote
    return rollback(c, root.tracking) if c.action == "rollback" else promote(c, root.tracking)
