"""The evaluation stage (launch/eval.py) on the real stack: a tiny exported model scored on its shards, on local
lm-evaluation-harness tasks and on a chat set, through the serving engine (Ray Serve LLM running vLLM's CPU build);
its scores against lm-eval run by hand on the same folder, and against what transformers answers. The config
checks at the end need no engine."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict

import pytest

from conftest import ROOT, launch
from framework.config import ConfigError
from framework.evaluation.config import EVAL, EVAL_KIND

LM_EVAL_TASKS = ROOT / "tests" / "data" / "lm_eval"
TASKS = ("serve_snippets_choice", "serve_snippets_generate")
CHAT_PROMPTS = ["What does import do?", "Name a Python keyword.", "def f(x): return", "Say hello.", "for i in range(",
                "What is a list?"]
CHAT_TOKENS = 8


def _copy(folder: str, target: Path) -> Path:
    """A copy of a session export (its export.json still leads to the run's checkpoint and shards): eval.json goes into it."""
    shutil.copytree(folder, target)
    return target


def _chat_greedy(folder: Path, prompt: str) -> str:
    """What transformers answers to one user turn, greedy, laid out by the folder's chat template."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    out = model.generate(**ids, do_sample=False, max_new_tokens=CHAT_TOKENS)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def _lm_eval_by_hand(folder: Path, out: Path) -> Dict[str, Any]:
    """`lm_eval --model hf` on the folder, as a user would run it: the reference the served scores must equal."""
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(out / "hf")}
    result = subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={folder},dtype=float32",
         "--tasks", ",".join(TASKS), "--include_path", str(LM_EVAL_TASKS), "--device", "cpu", "--output_path", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    [results] = out.rglob("results_*.json")
    return json.loads(results.read_text())["results"]


@pytest.mark.slow
def test_eval_scores_a_folder_through_the_engine_as_lm_eval_and_transformers_do(exports, trained_checkpoints, tmp_path):
    from framework.train.checkpoint import read_config, read_state

    folder = _copy(exports[3], tmp_path / "tiny")
    # A chat set whose references are transformers' own greedy answers for the first half and never-said text for the
    # rest: served greedy answers scored by exact match must come out at exactly one half.
    records = [{"prompt": p, "answer": _chat_greedy(folder, p) if i < len(CHAT_PROMPTS) // 2 else "no model says this"}
               for i, p in enumerate(CHAT_PROMPTS)]
    chat_set = tmp_path / "echo.jsonl"
    chat_set.write_text("".join(json.dumps(r) + "\n" for r in records))

    result = launch("eval.py", f"eval.model={folder}", f"eval.tasks=[{','.join(TASKS)}]", f"eval.include_path={LM_EVAL_TASKS}",
                    f"+eval.chat_sets.echo={{path: {chat_set}, scoring: exact_match, field: answer}}",
                    f"eval.max_tokens={CHAT_TOKENS}", "eval.num_concurrent=2", timeout=900)
    (tmp_path / "eval.log").write_text(result.stdout + result.stderr)
    assert result.returncode == 0, f"see {tmp_path / 'eval.log'}: " + result.stderr[-2000:]
    scores = json.loads((folder / "eval.json").read_text())
    assert scores["kind"] == EVAL_KIND and scores["model"] == str(folder) and scores["lm_eval"]
    got = scores["scores"]

    # lm-eval's scores through the engine are those lm-eval computes by hand with transformers on the same folder.
    by_hand = _lm_eval_by_hand(folder, tmp_path / "by-hand")
    for task, metric in ((TASKS[0], "acc"), (TASKS[1], "exact_match")):
        score = got[f"eval/{task}/{metric}"]
        assert score["value"] == pytest.approx(by_hand[task][f"{metric},none"], abs=1e-9), (task, score, by_hand[task])
        assert score["stderr"] == pytest.approx(by_hand[task][f"{metric}_stderr,none"], abs=1e-9)
        assert score["count"] == 8 and score["version"] == 1.0 and score["n_shot"] == 0 and score["higher_is_better"] is True

    chat = got["eval/echo/exact_match"]
    assert chat["value"] == 0.5 and chat["count"] == len(CHAT_PROMPTS), chat
    assert chat["stderr"] == pytest.approx(math.sqrt(0.25 * len(CHAT_PROMPTS) / (len(CHAT_PROMPTS) - 1)) / math.sqrt(len(CHAT_PROMPTS)))
    assert chat["answers"][:3] == [r["answer"] for r in records[:3]]

    # Perplexity is the number training logged at the exported step, over the same evaluation rows.
    checkpoint = trained_checkpoints[3]
    step = read_state(checkpoint).step
    with open(Path(checkpoint).parent / "logs" / "metrics.jsonl") as f:
        logged = [r["val/loss"] for r in map(json.loads, f) if r["step"] == step and "val/loss" in r][-1]
    assert got["val/loss"]["value"] == pytest.approx(logged, rel=1e-4)
    assert got["val/perplexity"]["value"] == pytest.approx(math.exp(got["val/loss"]["value"]))
    assert got["val/loss"]["count"] == (read_config(checkpoint).run.eval_rows or got["val/loss"]["count"])
    assert "eval/echo/exact_match" in result.stdout and "serve_snippets_choice" in result.stdout  # the table

    # A second model, perplexity only (no engine, so in this process), compared with the first's eval.json: its own
    # eval.json, a plot.
    from framework.evaluation.job import run_eval

    other = _copy(exports[1], tmp_path / "other")
    run_eval(EVAL.from_overrides([f"eval.model={other}", f"eval.compare=[{folder / 'eval.json'}]"]))
    assert (tmp_path / "other" / "eval-compare.png").stat().st_size > 10_000
    assert set(json.loads((other / "eval.json").read_text())["scores"]) == {"val/loss", "val/perplexity"}


# ---------------------------------------------------------------------------------------------
# Checks before any model is loaded

def _plan(*overrides: str):
    return EVAL.from_overrides(list(overrides))


def test_an_endpoint_gives_no_perplexity_and_needs_an_output(tmp_path):
    with pytest.raises(ConfigError, match=r"^eval.perplexity=True: eval.model=http://h:8000 is an endpoint"):
        _plan("eval.model=http://h:8000")
    with pytest.raises(ConfigError, match=r"^eval.output=None: "):
        _plan("eval.model=http://h:8000", "eval.perplexity=false", "+eval.chat_sets.a={path: tests/data/arith_chat.jsonl, "
              "scoring: contains, field: answer}")


@pytest.mark.slow  # the session's trained exports
def test_an_eval_json_of_someone_elses_is_never_overwritten(exports, tmp_path):
    folder = _copy(exports[1], tmp_path / "m")
    (folder / "eval.json").write_text('{"mine": true}')
    with pytest.raises(ConfigError, match=r"eval.output=.*eval.json: exists and was not written by launch/eval.py"):
        _plan(f"eval.model={folder}")
    assert json.loads((folder / "eval.json").read_text()) == {"mine": True}


@pytest.mark.slow  # lm-eval reads its whole task index (about 13 s)
def test_endpoint_options_on_a_folder_are_refused_not_ignored(tmp_path):
    with pytest.raises(ConfigError, match=r"^eval.model_name=x: applies to an endpoint"):
        _plan(f"eval.model={tmp_path}", "eval.model_name=x")


def test_bad_chat_sets_fail_in_one_line():
    with pytest.raises(ConfigError, match=r"^eval.chat_sets.a.path=missing.jsonl: no such file"):
        _plan("eval.model=http://h:8000", "eval.perplexity=false", "eval.output=x.json",
              "+eval.chat_sets.a={path: missing.jsonl, scoring: contains, field: answer}")
    with pytest.raises(ConfigError, match=r"^eval.chat_sets.a.scoring=fuzzy: expected one of"):
        _plan("eval.model=http://h:8000", "eval.perplexity=false", "eval.output=x.json",
              "+eval.chat_sets.a={path: tests/data/arith_chat.jsonl, scoring: fuzzy, field: answer}")
    with pytest.raises(ConfigError, match=r"^eval.tasks=\[\]: nothing to score"):
        _plan("eval.model=http://h:8000", "eval.perplexity=false", "eval.output=x.json")
