"""Promotion (launch/promote.py): a candidate gated on evaluation against the champion, on two models with a known
ordering (one run's checkpoints at step 10 and step 20, whose logged validation loss fell), recorded, refused,
rolled back; and the gate's arithmetic and refusals on their own."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import launch
from framework.config import RunError
from framework.promote.config import PROMOTE, GateConfig
from framework.promote.gate import judge


def _logged_val_loss(run_dir: str, step: int) -> float:
    with open(os.path.join(run_dir, "logs", "metrics.jsonl")) as f:
        return [r["val/loss"] for r in map(json.loads, f) if r["step"] == step and "val/loss" in r][-1]


@pytest.mark.slow
def test_the_gate_promotes_the_better_model_refuses_the_worse_and_rollback_restores(trained_runs, tmp_path):
    from framework.export import export_checkpoint
    from framework.promote.job import run_promote

    run = trained_runs[1]
    # The known ordering: the run's own validation loss fell from step 10 to step 20.
    assert _logged_val_loss(run, 20) < _logged_val_loss(run, 10)
    early = export_checkpoint(os.path.join(run, "checkpoint_00000010"), str(tmp_path / "early"))
    late = export_checkpoint(os.path.join(run, "checkpoint_00000020"), str(tmp_path / "late"))
    record = tmp_path / "promoted" / "champion.json"

    def promote(*overrides: str):
        return run_promote(PROMOTE.from_overrides([f"promote.record={record}", *overrides]))

    # The first promotion has nothing to beat; each folder is evaluated (perplexity) since it has no eval.json yet.
    promote(f"promote.candidate={early}")
    assert json.loads(record.read_text())["path"] == early
    assert (Path(early) / "eval.json").is_file()

    promote(f"promote.candidate={late}")
    promoted = json.loads(record.read_text())
    assert promoted["path"] == late and [h["path"] for h in promoted["history"]] == [early]
    [check] = promoted["current"]["checks"]
    scores = {p: json.loads((Path(p) / "eval.json").read_text())["scores"]["val/perplexity"]["value"] for p in (early, late)}
    assert check["candidate"] == scores[late] and check["champion"] == scores[early] and check["passed"] is True

    # The worse model against the champion now serving: refused in one line naming the score and both values, exit 1,
    # and the record untouched.
    before = record.read_text()
    result = launch("promote.py", f"promote.candidate={early}", f"promote.record={record}")
    assert result.returncode == 1, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("RunError: promote: refused: val/perplexity: candidate ") and f"{scores[early]:.6g}" in last \
        and f"{scores[late]:.6g}" in last, last
    assert record.read_text() == before

    # The served record reads as a best.json does, so `launch/serve.py serve.model_path=<record>` serves the champion.
    from framework.hf_folder import resolve_model_path

    assert str(resolve_model_path(str(record))) == late

    result = launch("promote.py", "rollback", f"promote.record={record}")
    assert result.returncode == 0, result.stderr[-2000:]
    rolled = json.loads(record.read_text())
    assert rolled["path"] == early and rolled["history"] == [] and rolled["rolled_back"][0]["path"] == late
    with pytest.raises(RunError, match="no earlier champion to roll back to"):
        promote("promote.action=rollback")


def _score(value: float, higher: bool = True, **extra) -> dict:
    return {"value": value, "higher_is_better": higher, "source": "lm-eval", "count": 100, "version": 1.0, "n_shot": 0, **extra}


def test_gains_and_guards_each_count_in_their_scores_direction():
    gate = GateConfig(metrics={"eval/t/acc": 0.01, "val/perplexity": 0.0}, guards={"eval/g/acc": 0.02})
    champion = {"eval/t/acc": _score(0.50), "val/perplexity": _score(20.0, higher=False), "eval/g/acc": _score(0.70)}
    better = {"eval/t/acc": _score(0.52), "val/perplexity": _score(19.0, higher=False), "eval/g/acc": _score(0.69)}
    assert all(k.passed for k in judge(gate, better, champion))
    too_little = {**better, "eval/t/acc": _score(0.505)}
    assert [k.score for k in judge(gate, too_little, champion) if not k.passed] == ["eval/t/acc"]
    guard_broken = {**better, "eval/g/acc": _score(0.67)}
    assert [k.score for k in judge(gate, guard_broken, champion) if not k.passed] == ["eval/g/acc"]
    worse_ppl = {**better, "val/perplexity": _score(21.0, higher=False)}
    [failed] = [k for k in judge(gate, worse_ppl, champion) if not k.passed]
    assert failed.why().startswith("val/perplexity: candidate 21 vs champion 20 (lower is better")


def test_scores_measured_differently_are_not_compared():
    gate = GateConfig(metrics={"eval/t/acc": 0.0})
    with pytest.raises(RunError, match=r"eval/t/acc was measured differently: count 50 for the candidate, 100 for the champion"):
        judge(gate, {"eval/t/acc": _score(0.9, count=50)}, {"eval/t/acc": _score(0.5)})


def test_a_record_that_is_not_ours_is_refused(tmp_path):
    from framework.config import ConfigError
    from framework.promote.job import run_promote

    (tmp_path / "champion.json").write_text('{"path": "/models/x"}')
    with pytest.raises(ConfigError, match=r"promote.record=.*: exists and is not a promotion record"):
        run_promote(PROMOTE.from_overrides([f"promote.record={tmp_path / 'champion.json'}", "promote.action=rollback"]))
