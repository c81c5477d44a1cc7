"""GRPO on the real stack (experiment=grpo): prompts prepared by prep, a vLLM rollout engine in a Ray actor, rewards from
conf/reward/, DeepSpeed steps, weights synced to the engine after each.

The task: "What is a + b?" (a in 0..8, b in 0..1, four phrasings), answered in one token (rl.max_tokens=1) and scored
by the last-number reward. The policy is a tiny Llama given 70 supervised steps on the answers (so it answers with a
digit, but starts well below 30% correct); the run must raise its validation reward clearly (validation prompts are
phrasings it never trains on), log every metric, resume mid-way to the same prompts, and fail in one line on a reward
function that raises.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest

from conftest import copy_run_until, tiny_chat_model, train_bare

pytestmark = pytest.mark.slow

PHRASES = ["What is {a} + {b}?", "Compute {a} + {b}.", "{a} + {b} = ?", "Add {a} and {b}."]
RECORDS = [{"prompt": p.format(a=a, b=b), "answer": str(a + b)} for a in range(9) for b in range(2) for p in PHRASES]
STEPS = 60


def warm_start(folder: str, steps: int) -> None:
    """A few supervised steps on the records' answers (the answer format, and a little of the task), in place."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    rows = []
    for record in RECORDS:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": record["prompt"]}], add_generation_prompt=True, tokenize=False)
        rows.append((tokenizer(prompt, add_special_tokens=False)["input_ids"], tokenizer(record["answer"], add_special_tokens=False)["input_ids"]))
    torch.manual_seed(0)
    rng = random.Random(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        batch = rng.sample(rows, 16)
        length = max(len(p) + len(a) for p, a in batch)
        ids = torch.zeros(len(batch), length, dtype=torch.long)
        labels = torch.full((len(batch), length), -100)
        for i, (p, a) in enumerate(batch):
            ids[i, : len(p) + len(a)] = torch.tensor(p + a)
            labels[i, len(p) : len(p) + len(a)] = torch.tensor(a)
        loss = model(input_ids=ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(folder)


def grpo_overrides(model: Path, source: Path, data: Path, storage: Path, name: str, **extra) -> List[str]:  # noqa: ANN003
    values = {
        "model.pretrained_path": model, "data.sources.0.path": source, "data.output_dir": data, "data.seq_len": 64,
        "data.val_fraction": 0.2, "run.storage_path": storage, "run.name": name, "run.num_workers": 1,
        "run.global_batch_size": 32, "run.micro_batch_size": 8, "run.max_steps": STEPS, "run.eval_interval": 20,
        "run.checkpoint_interval": 20, "run.keep_checkpoints": 3, "run.log_interval": 1, "optim.lr": 3e-3, "optim.beta2": 0.999, "rl.group_size": 16, "rl.max_tokens": 1,
        "rl.eval_samples": 8, "rl.eval_temperature": 1.0, **extra,
    }
    return ["experiment=grpo", *(f"{k}={v}" for k, v in values.items())]


@pytest.fixture(scope="module")
def task(tmp_path_factory, ray_session):  # noqa: ANN001, ANN201
    from framework.data.prepare import prepare_shards
    from framework.train.config import TRAIN

    root = tmp_path_factory.mktemp("grpo")
    source = root / "sums.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    model = root / "model"
    tiny_chat_model(str(model), [json.dumps(r) for r in RECORDS] * 20)
    warm_start(str(model), 70)
    data = root / "data"
    prepare_shards(TRAIN.from_overrides(grpo_overrides(model, source, data, root / "runs", "prep")).data)
    return root, model, source, data


@pytest.fixture(scope="module")
def grpo_run(task, ray_session):  # noqa: ANN001, ANN201
    from framework.train.config import TRAIN

    root, model, source, data = task
    run_dir, reports = train_bare(ray_session, TRAIN.from_overrides(grpo_overrides(model, source, data, root / "runs", "grpo")))
    return run_dir, reports


def _records(run_dir: str, name: str = "metrics.jsonl") -> List[Dict]:
    with open(os.path.join(run_dir, "logs", name)) as f:
        return [json.loads(line) for line in f]


def _by_step(run_dir: str, key: str) -> Dict[int, float]:
    return {r["step"]: r[key] for r in _records(run_dir) if key in r}


def test_grpo_raises_the_validation_reward_of_a_model_that_starts_below_30_percent(grpo_run) -> None:  # noqa: ANN001
    run_dir, reports = grpo_run
    val = _by_step(run_dir, "val/reward")
    assert sorted(val) == [0, 20, 40, 60], val
    assert val[0] < 0.3, val  # the warm start: mostly wrong
    assert val[60] >= val[0] + 0.1 and val[60] >= 1.5 * val[0], val
    assert reports[-1]["val_reward"] == val[60]
    train = _by_step(run_dir, "train/reward")
    first, last = np.mean([train[s] for s in range(1, 11)]), np.mean([train[s] for s in range(51, 61)])
    assert len(train) == STEPS and last >= first + 0.2, (first, last)


def test_every_step_logs_the_rl_metrics_and_its_rollouts(grpo_run) -> None:  # noqa: ANN001
    run_dir, _ = grpo_run
    records = _records(run_dir)
    steps = [r for r in records if r["step"] > 0]
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    names = {
        "train/reward", "train/reward_std", "train/rewards/correct", "train/correct", "train/groups/zero_std",
        "train/groups/all_correct", "train/groups/all_wrong", "train/entropy", "train/completion_length", "train/clip_ratio",
        "train/logprob_gap", "train/loss", "perf/rollout_tokens_per_s", "perf/rollout_s", "perf/train_s", "perf/sync_s",
    }
    assert all(names <= set(r) for r in steps), names - set(steps[0])
    # The engine samples with the trainer's weights: it and the trainer give the sampled tokens the same log-probs.
    assert max(r["train/logprob_gap"] for r in steps) < 1e-3
    assert all(0 <= r["train/groups/all_correct"] + r["train/groups/all_wrong"] <= r["train/groups/zero_std"] + 1e-9 for r in steps)
    rollouts = _records(run_dir, "rollouts.jsonl")
    assert [r["step"] for r in rollouts] == list(range(1, STEPS + 1)) and all(len(r["rows"]) == 32 for r in rollouts)
    group = rollouts[0]["groups"][0]
    assert len(group["completions"]) == 16 and group["rewards"] == [
        float(c.strip() == group["fields"]["answer"]) for c in group["completions"]]  # one-token completions (rl.max_tokens=1): the last number is the text


def test_a_run_resumed_mid_way_samples_the_same_prompts_and_completions(grpo_run, task, ray_session) -> None:  # noqa: ANN001
    """Cut after its step-20 checkpoint and resumed: the same rows every step, and at step 21 (the checkpoint's weights,
    the same seeds) the same completions."""
    from framework.train.config import TRAIN

    run_dir, _ = grpo_run
    root, model, source, data = task
    storage = root / "resumed"
    copy_run_until(run_dir, 20, str(storage / "grpo"))
    resumed, _ = train_bare(ray_session, TRAIN.from_overrides(grpo_overrides(model, source, data, storage, "grpo",
                                                                             **{"run.max_steps": 24})))
    original = {r["step"]: r for r in _records(run_dir, "rollouts.jsonl")}
    again = {r["step"]: r for r in _records(resumed, "rollouts.jsonl")}
    assert sorted(again) == [21, 22, 23, 24]
    assert all(again[s]["rows"] == original[s]["rows"] for s in again)
    assert again[21]["groups"] == original[21]["groups"]


def test_a_reward_that_raises_fails_the_run_in_one_line(task, tmp_path, ray_session) -> None:  # noqa: ANN001
    from framework.train.config import TRAIN

    _, model, source, data = task
    cfg = TRAIN.from_overrides(grpo_overrides(model, source, data, tmp_path, "raises", **{"reward.functions.correct.field": "solution"}))
    with pytest.raises(Exception) as failure:
        train_bare(ray_session, cfg)
    lines = [line for line in str(failure.value).splitlines() if "reward correct" in line]
    assert lines and lines[-1].strip().startswith("framework.config.RunError: reward correct (framework.rl.rewards.last_number) raised KeyError on record"), str(failure.value)[-2000:]
    assert "no field 'solution'" in lines[-1]


def test_lora_sends_only_the_adapters_and_the_kl_is_to_the_base_with_adapters_off(task, tmp_path, ray_session) -> None:  # noqa: ANN001
    """model/lora=default with rl.beta > 0, the engine colocated (on the worker's node, reserving no CPUs): the engine samples with the adapters the trainer holds (its log-probs of the sampled tokens are the
    trainer's), and the KL to the reference (the adapters switched off) is 0 at the first step, where the adapters are
    still zero, and grows after."""
    from framework.train.config import TRAIN

    import glob
    import tempfile

    root, model, source, data = task
    engine_copies = os.path.join(tempfile.gettempdir(), "rollout-weights-*")  # where the engine writes the weights sent to it
    before = set(glob.glob(engine_copies))
    run_dir, _ = train_bare(ray_session, TRAIN.from_overrides(grpo_overrides(
        model, source, data, tmp_path, "lora", **{"model/lora": "default", "rl.beta": 0.04, "rl.engine.placement": "colocated", "run.max_steps": 4,
                                                  "run.eval_interval": 4, "run.checkpoint_interval": 4})))
    kl, gap = _by_step(run_dir, "train/kl"), _by_step(run_dir, "train/logprob_gap")
    assert sorted(kl) == [1, 2, 3, 4] and kl[1] == pytest.approx(0.0, abs=1e-7) and kl[4] > 1e-4, kl
    assert max(gap.values()) < 1e-3, gap
    assert set(glob.glob(engine_copies)) <= before  # the run removed the engine's copy of the last adapters sent


def test_a_rollout_reused_for_two_steps_clips_against_the_log_probs_it_was_sampled_under(grpo_run, task, tmp_path, ray_session) -> None:  # noqa: ANN001
    """rl.iterations=2: one rollout per two steps, reading the rows the μ=1 run read at its first two steps. Its first step's
    ratio is 1 (nothing clipped); its second step's is taken against the log-probs from before the first, so the
    update of step 1 moves it and the clip binds; the engine gets the weights after the second step only, so its
    log-probs of the reused tokens trail the trainer's there."""
    from framework.train.config import TRAIN

    root, model, source, data = task
    run_dir, _ = train_bare(ray_session, TRAIN.from_overrides(grpo_overrides(model, source, data, tmp_path, "mu2", **{
        "rl.iterations": 2, "run.max_steps": 4, "run.eval_interval": 4, "run.checkpoint_interval": 4, "optim.lr": 3e-2})))
    steps = {r["step"]: r for r in _records(run_dir) if r["step"] > 0}
    rollouts = _records(run_dir, "rollouts.jsonl")
    original = {r["step"]: r for r in _records(grpo_run[0], "rollouts.jsonl")}
    assert [r["step"] for r in rollouts] == [1, 3]
    assert rollouts[0]["rows"] == original[1]["rows"] and rollouts[1]["rows"] == original[2]["rows"]
    for first, second in ((1, 2), (3, 4)):
        assert steps[second]["train/reward"] == steps[first]["train/reward"]  # the same completions
        assert "perf/rollout_s" in steps[first] and "perf/rollout_s" not in steps[second]
        assert steps[first]["perf/sync_s"] == 0.0 and steps[second]["perf/sync_s"] > 0
        assert steps[first]["train/clip_ratio"] == 0.0 and steps[second]["train/clip_ratio"] > 0, steps
        assert steps[first]["train/logprob_gap"] < 1e-3 < steps[second]["train/logprob_gap"], steps


def test_rl_iterations_is_a_resume_key_and_an_older_checkpoint_reads_as_one_step_per_rollout(grpo_run, task, tmp_path) -> None:  # noqa: ANN001
    """μ decides which prompt rows each step trains on, as the seed does: a resume with another is refused before any
    cluster work. A checkpoint written before the key existed reads as μ = 1."""
    from omegaconf import OmegaConf

    from framework.config import ConfigError
    from framework.train.checkpoint import CONFIG, read_config
    from framework.train.config import TRAIN
    from framework.train.plan import make_plan

    run_dir, _ = grpo_run
    root, model, source, data = task
    copy_run_until(run_dir, 20, str(tmp_path / "grpo"))
    with pytest.raises(ConfigError, match=r"^rl\.iterations=2: run grpo resumes checkpoint_00000020, trained with rl\.iterations=1"):
        make_plan(TRAIN.from_overrides(grpo_overrides(model, source, data, tmp_path, "grpo", **{"rl.iterations": 2})))
    checkpoint = tmp_path / "grpo" / "checkpoint_00000020"
    saved = OmegaConf.load(checkpoint / CONFIG)
    del saved.rl["iterations"]
    OmegaConf.save(saved, checkpoint / CONFIG)
    assert read_config(str(checkpoint)).rl.iterations == 1


def test_a_grpo_checkpoint_exports_to_a_verified_folder_that_answers_as_the_run_measured(grpo_run, tmp_path) -> None:  # noqa: ANN001
    from transformers import AutoModelForCausalLM

    from framework.export import export_checkpoint

    run_dir, _ = grpo_run
    folder = export_checkpoint(os.path.join(run_dir, f"checkpoint_{STEPS:08d}"), str(tmp_path / "grpo"))
    assert json.loads(open(os.path.join(folder, "export.json")).read())["max_logit_difference"] <= 1e-5
    AutoModelForCausalLM.from_pretrained(folder)


def test_a_sweep_over_grpo_ranks_its_trials_by_validation_reward_and_promotes_the_best(task, tmp_path, ray_session) -> None:  # noqa: ANN001
    """A sweep of experiment=grpo (launch/tune.py's own path, in this process: test_tune runs the command): each trial a
    whole RL run with its own rollout engine (the Train workers sized beside it), val_reward (mode max) the metric; the
    best trial is exported."""
    import pandas as pd

    from framework.tune.plan import plan_sweep
    from framework.tune.runner import run_sweep

    _, model, source, data = task
    overrides = [o for o in grpo_overrides(model, source, data, tmp_path, "unused", **{
        "run.max_steps": 4, "run.eval_interval": 4, "run.checkpoint_interval": 4, "run.max_failures": 0})
        if not o.startswith(("run.name=", "run.storage_path="))]
    overrides += [
        "tune=grid", "~tune/space", '+tune.space.optim.lr="choice(1e-3,3e-3)"', "tune.scheduler=fifo", "tune.metric=val_reward",
        "tune.mode=max", "tune.name=grpo-lr", f"tune.storage_path={tmp_path}", f"tune.output_dir={tmp_path}/results",
        "tune.max_concurrent_trials=1", "tune.verbose=0",
    ]
    result = run_sweep(plan_sweep(overrides))
    assert not result.interrupted
    table = pd.read_parquet(tmp_path / "results" / "results.parquet")
    best = json.loads((tmp_path / "results" / "best.json").read_text())
    assert len(table) == 2 and set(table["status"]) == {"completed"}
    assert best["metric"] == "val_reward" and best["mode"] == "max"
    assert best["value"] == table["final_val_reward"].max()
    assert (tmp_path / "results" / "best" / "config.json").is_file()
