"""Promotion (launch/promote.py): a candidate gated on evaluation against the champion, on two models with a known
ordering (one run's checkpoints at step 10 and step 20, whose logged validation loss fell), recorded, refused,
rolled back; and the gate's arithmetic and refusals on their own."""

from __future__ import annotations

import json
import os
import shutil
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
def test_a_promotion_rolls_out_into_the_running_server_and_every_request_is_answered(trained_runs, compressed, tmp_path):
    """launch/serve.py serving the promotion record; clients send requests the whole time; the int8 compression of the
    finished run is promoted over the run's step-10 export and rolls out in place: every request gets a 200. Before
    the rollout the server scores a prompt as transformers does with the step-10 folder; after it, it answers as
    transformers does with the int8 folder, unchanged. SIGTERM with a stream in flight serves the stream to its end,
    then Serve shuts down and the command exits 0 without a stack dump. A rollback rewrites the record as a
    promotion does (the gate test shows it), so the server follows it by the same path: one rollout here, not two
    (each is a vLLM engine start)."""
    import threading

    import requests
    from transformers import AutoTokenizer

    from conftest import SERVE_API_KEY, SERVE_KEY_ENV, Interruptible, free_port, greedy_reference, ray_head
    from framework.export import export_checkpoint
    from framework.promote.job import run_promote

    KEY = {"Authorization": f"Bearer {SERVE_API_KEY}"}
    early = export_checkpoint(os.path.join(trained_runs[2], "checkpoint_00000010"), str(tmp_path / "early"))
    int8 = str(tmp_path / "int8")  # a copy: the promotion writes its eval.json beside the model
    shutil.copytree(compressed["int8"][0], int8)
    record = tmp_path / "promoted" / "champion.json"
    run_promote(PROMOTE.from_overrides([f"promote.record={record}", f"promote.candidate={early}"]))
    ids = AutoTokenizer.from_pretrained(early)("def main(argv):\n    return", add_special_tokens=False)["input_ids"]
    expected = _prompt_logprobs(early, ids)
    prompts = ["def wrap(text):", "class Template:\n    delimiter = '$'", "import os\n"]
    int8_texts = [greedy_reference(int8, prompt, 12) for prompt in prompts]

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # A rollout needs room for the new replica beside the old one: a head of its own (4 logical CPUs), whatever else the
    # suite runs on this machine meanwhile. Its proxy applies the suite's ingress policy (the key).
    with ray_head(num_cpus=4) as address, Interruptible(
            "serve.py", f"serve.model_path={record}", "serve.host=127.0.0.1", f"serve.port={port}",
            "serve.app_name=test-rollout", "serve.min_replicas=1", "serve.max_replicas=1", f"serve.ray_address={address}",
            f"serve.api_key_env={SERVE_KEY_ENV}", "serve.follow_interval_s=1", "serve.drain_timeout_s=120") as server:
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
                # A request a second per client spans the rollout as well as back-to-back ones would, and leaves the
                # CPUs to the new replica's engine start (on a 2-core machine, shared with the rest of the suite).
                stop.wait(1.0)

        clients = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(3)]
        for thread in clients:
            thread.start()
        try:
            assert scored() == pytest.approx(expected, abs=2e-3)
            # The gate passes it: the step-20 model's perplexity, within compression's bound, is well below step 10's.
            run_promote(PROMOTE.from_overrides([f"promote.record={record}", f"promote.candidate={int8}"]))
            server.wait_until(lambda: serving(int8), 600)
            server.wait_until(lambda: "now serving " + int8 in server.text(), 300)  # the old replicas stopped too
        finally:
            stop.set()
            for thread in clients:
                thread.join(timeout=300)
        assert len(statuses) > 0
        assert set(statuses) == {200}, [s for s in statuses if s != 200][:5]

        # The int8 folder, served unchanged, answers as transformers does with it (greedy), and not as step 10 scores.
        from openai import OpenAI

        openai = OpenAI(base_url=url + "/v1", api_key=SERVE_API_KEY, max_retries=0, timeout=60)
        for prompt, text in zip(prompts, int8_texts):
            assert openai.completions.create(model="promoted", prompt=prompt, max_tokens=12, temperature=0).choices[0].text == text, prompt
        chat = openai.chat.completions.create(model="promoted", messages=[{"role": "user", "content": "Hi"}], max_tokens=6, temperature=0)
        assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens >= 1
        assert scored() != pytest.approx(expected, abs=2e-3)

        # SIGTERM with a stream in flight: the stream is served to its end, then the command exits 0.
        lines, started = [], threading.Event()
        no_eos = {str(AutoTokenizer.from_pretrained(int8).eos_token_id): -100}  # decodes all of its max_tokens

        def stream() -> None:
            body = {"model": "promoted", "prompt": "def f(x):", "max_tokens": 96, "temperature": 0, "stream": True, "logit_bias": no_eos}
            with requests.post(url + "/v1/completions", json=body, headers=KEY, stream=True, timeout=120) as response:
                for line in response.iter_lines(decode_unicode=True):
                    if line:
                        lines.append(line)
                        started.set()

        reader = threading.Thread(target=stream)
        reader.start()
        assert started.wait(120)
        server.process.send_signal(signal.SIGTERM)
        reader.join(300)
        assert server.process.wait(timeout=300) == 0, server.text()[-3000:]
    assert lines[-1] == "data: [DONE]" and json.loads(lines[-2][6:])["choices"][0]["finish_reason"] == "length"
    assert "serve: stopped" in server.text()
    assert "SIGTERM received" not in server.text() and "Traceback" not in server.text(), server.text()[-3000:]
