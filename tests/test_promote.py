"""Promotion (launch/promote.py): a candidate gated on evaluation against the champion, on two models with a known
ordering (one run's checkpoints at step 10 and step 20, whose logged validation loss fell), recorded, refused,
rolled back; and the gate's arithmetic and refusals on their own."""

from __future__ import annotations

import json
import os
import signal
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


def _prompt_logprobs(folder: str, ids: list) -> list:
    """transformers' log-probability of each prompt token after the first: what `echo` + `logprobs` must give."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits, -1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].tolist()


@pytest.mark.slow
def test_a_promotion_rolls_out_into_the_running_server_and_every_request_is_answered(trained_runs, tmp_path):
    """launch/serve.py serving the promotion record; clients send requests the whole time; a promotion, then a
    rollback, each roll out in place: every request gets a 200, and after each the server scores a prompt as
    transformers does with the folder the record names (and not as with the other)."""
    import threading

    import requests
    from transformers import AutoTokenizer

    from conftest import SERVE_API_KEY, SERVE_KEY_ENV, Interruptible, free_port, ray_head
    from framework.export import export_checkpoint
    from framework.promote.job import run_promote

    KEY = {"Authorization": f"Bearer {SERVE_API_KEY}"}
    run = trained_runs[2]
    early = export_checkpoint(os.path.join(run, "checkpoint_00000010"), str(tmp_path / "early"))
    late = export_checkpoint(os.path.join(run, "checkpoint_00000020"), str(tmp_path / "late"))
    record = tmp_path / "promoted" / "champion.json"
    run_promote(PROMOTE.from_overrides([f"promote.record={record}", f"promote.candidate={early}"]))
    ids = AutoTokenizer.from_pretrained(early)("def main(argv):\n    return", add_special_tokens=False)["input_ids"]
    expected = {folder: _prompt_logprobs(folder, ids) for folder in (early, late)}

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # A rollout needs room for the new replica beside the old one: a head of its own (4 logical CPUs), whatever else the
    # suite runs on this machine meanwhile. Its proxy applies the suite's ingress policy (the key).
    with ray_head(num_cpus=4) as address, Interruptible(
            "serve.py", f"serve.model_path={record}", "serve.host=127.0.0.1", f"serve.port={port}",
            "serve.app_name=test-rollout", "serve.min_replicas=1", "serve.max_replicas=1", f"serve.ray_address={address}",
            f"serve.api_key_env={SERVE_KEY_ENV}", "serve.follow_interval_s=1", "serve.drain_timeout_s=30") as server:
        server.wait_until(lambda: "SIGTERM or Ctrl-C to stop" in server.text(), 600)
        model = requests.get(url + "/v1/models", headers=KEY, timeout=30).json()["data"][0]
        assert model["id"] == "promoted" and model["root"] == early

        def scored() -> tuple:
            body = {"model": "promoted", "prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 0}
            response = requests.post(url + "/v1/completions", json=body, headers=KEY, timeout=120).json()
            return tuple(response["choices"][0]["logprobs"]["token_logprobs"][1:])

        def serving(folder: str) -> bool:
            return requests.get(url + "/v1/models", headers=KEY, timeout=30).json()["data"][0]["root"] == folder

        statuses, stop = [], threading.Event()

        def client(n: int) -> None:
            while not stop.is_set():
                try:
                    r = requests.post(url + "/v1/completions", timeout=300, headers=KEY,
                                      json={"model": "promoted", "prompt": f"import os{n}", "max_tokens": 8})
                    statuses.append(r.status_code)
                except requests.RequestException as exc:  # a dropped connection is a failed request too
                    statuses.append(repr(exc))

        clients = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(3)]
        for thread in clients:
            thread.start()
        try:
            assert scored() == pytest.approx(expected[early], abs=2e-3)
            run_promote(PROMOTE.from_overrides([f"promote.record={record}", f"promote.candidate={late}"]))
            server.wait_until(lambda: serving(late), 600)
            server.wait_until(lambda: "now serving " + late in server.text(), 300)  # the old replicas stopped too
            got = scored()
            assert got == pytest.approx(expected[late], abs=2e-3) and got != pytest.approx(expected[early], abs=2e-3)
            served_before_rollback = len(statuses)

            result = launch("promote.py", "rollback", f"promote.record={record}")
            assert result.returncode == 0, result.stderr[-2000:]
            server.wait_until(lambda: serving(early), 600)
            server.wait_until(lambda: server.text().count("now serving " + early) == 1, 300)
            assert scored() == pytest.approx(expected[early], abs=2e-3)
        finally:
            stop.set()
            for thread in clients:
                thread.join(timeout=300)
        assert len(statuses) > served_before_rollback > 0
        assert set(statuses) == {200}, [s for s in statuses if s != 200][:5]
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=120) == 0
