"""GRPO's rewards and arithmetic, checked against hand computations (no Ray, no engine: the fast tier)."""

from __future__ import annotations

import math

import pytest
import torch

from framework.config import ConfigError, RunError
from framework.rl import grpo
from framework.rl.rewards import RewardConfig, reward_functions, score


def _functions(**functions):
    return reward_functions(RewardConfig(name="test", functions=functions))


# ---------------------------------------------------------------------------------------------
# Rewards

def test_built_in_rewards_score_a_batch_and_combine_with_weights() -> None:
    functions = _functions(
        correct={"_target_": "framework.rl.rewards.last_number", "weight": 1.0},
        format={"_target_": "framework.rl.rewards.regex", "weight": 0.5, "pattern": r"answer: {answer}$", "full": False},
        long={"_target_": "framework.rl.rewards.length_penalty", "weight": 1.0, "max_tokens": 10, "soft_tokens": 4},
    )
    completions = ["2 + 3 = 5, answer: 5", "it is 1,204", "answer: 7.0", "-3"]
    ids = [[1] * 6, [1] * 8, [1] * 10, [1] * 12]
    records = [{"answer": "5"}, {"answer": 1204}, {"answer": "7"}, {"answer": -3}]
    scores = score(functions, ["p"] * 4, completions, ids, records)
    assert scores.by_function["correct"] == [1.0, 1.0, 1.0, 1.0]
    assert scores.by_function["format"] == [1.0, 0.0, 0.0, 0.0]  # "7.0" is not the literal "7"
    # Up to 10 − 4 = 6 tokens free; 8 tokens: (6 − 8) / 4; 10: −1; beyond: −1.
    assert scores.by_function["long"] == [0.0, -0.5, -1.0, -1.0]
    assert scores.total == pytest.approx([1.5, 0.5, 0.0, 0.0])


def maybe(prompts, completions, completion_ids, **columns):  # noqa: ANN001, ANN201 - a user's function, TRL's signature
    return [None if c == "skip" else 2.0 for c in completions]


def test_a_function_that_scores_none_is_left_out_of_the_sum_and_a_sample_nothing_scores_fails() -> None:
    functions = _functions(m={"_target_": f"{__name__}.maybe", "weight": 0.5},
                           exact={"_target_": "framework.rl.rewards.exact_match", "weight": 1.0})
    scores = score(functions, ["p", "p"], ["skip", " 4 "], [[1], [1]], [{"answer": 4}, {"answer": "4"}])
    assert math.isnan(scores.by_function["m"][0]) and scores.total == [0.0, 2.0]
    with pytest.raises(RunError, match=r"no reward function scored record 'q' \{\}"):
        score(_functions(m={"_target_": f"{__name__}.maybe", "weight": 1.0}), ["q"], ["skip"], [[1]], [{}])


def test_a_reward_that_raises_fails_naming_the_function_and_the_record() -> None:
    functions = _functions(correct={"_target_": "framework.rl.rewards.last_number", "weight": 1.0})
    records = [{"answer": "3"}, {"answer": "three"}]
    with pytest.raises(RunError, match=r"^reward correct \(framework\.rl\.rewards\.last_number\) raised ValueError on record "
                                       r"'what is 1\+2\?' \{\"answer\": \"three\"\}: last_number: answer='three' is not a number$"):
        score(functions, ["what is 1+1?", "what is 1+2?"], ["3", "3"], [[1], [1]], records)
    with pytest.raises(RunError, match=r"records have no field 'solution'"):
        score(_functions(c={"_target_": "framework.rl.rewards.last_number", "weight": 1.0, "field": "solution"}),
              ["p"], ["1"], [[1]], [{"answer": 1}])


@pytest.mark.parametrize("functions,message", [
    ({}, r"reward\.functions=\{\}: expected at least one reward function"),
    ({"c": {"weight": 1.0}}, r"reward\.functions\.c\._target_=None: missing"),
    ({"c": {"_target_": "framework.rl.rewards.last_number"}}, r"reward\.functions\.c\.weight=None: missing"),
    ({"c": {"_target_": "framework.rl.rewards.last_number", "weight": "high"}}, r"reward\.functions\.c\.weight=high: expected a finite number"),
    ({"c": {"_target_": "framework.rl.rewards.no_such", "weight": 1}}, r"reward\.functions\.c\._target_=framework\.rl\.rewards\.no_such: cannot be imported"),
    ({"c": {"_target_": "framework.rl.rewards.regex", "weight": 1, "patern": "x"}},
     r"reward\.functions\.c\.patern=x: not an argument of framework\.rl\.rewards\.regex \(it takes: full, pattern\)"),
    ({"c": {"_target_": "framework.rl.rewards.length_penalty", "weight": 1, "max_tokens": 8}},
     r"reward\.functions\.c\.soft_tokens=None: missing; framework\.rl\.rewards\.length_penalty needs it"),
], ids=["empty", "no-target", "no-weight", "bad-weight", "unknown", "bad-argument", "missing-argument"])
def test_a_bad_reward_config_fails_in_one_line(functions, message) -> None:  # noqa: ANN001
    with pytest.raises(ConfigError, match=message):
        _functions(**functions)


# ---------------------------------------------------------------------------------------------
# Advantages and the objective

def test_group_advantages_equal_a_hand_computation() -> None:
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    a = grpo.group_advantages(rewards, 4, "group")
    std = math.sqrt(((0.5 ** 2) * 4) / 3)  # Bessel-corrected std of [1, 0, 0, 1]
    assert a.tolist() == pytest.approx([0.5 / (std + 1e-4), -0.5 / (std + 1e-4), -0.5 / (std + 1e-4), 0.5 / (std + 1e-4), 0, 0, 0, 0])
    assert grpo.group_advantages(rewards, 4, "none").tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0])
    batch_std = float(torch.tensor([1.0, 0, 0, 1, 2, 2, 2, 2]).std())
    assert grpo.group_advantages(rewards, 4, "batch")[0].item() == pytest.approx(0.5 / (batch_std + 1e-4))
    assert grpo.equal_groups(rewards, 4).tolist() == [False, True]


def _hand_loss(logps, old, adv, mask, eps_low, eps_high, beta, ref, normalization) -> float:  # noqa: ANN001
    """The objective written out one token at a time from its definition (TRL's _compute_loss)."""
    per_seq, total, tokens = [], 0.0, 0
    for i in range(len(logps)):
        seq, n = 0.0, 0
        for t in range(len(logps[i])):
            if not mask[i][t]:
                continue
            ratio = math.exp(logps[i][t] - old[i][t])
            clipped = min(max(ratio, 1 - eps_low), 1 + eps_high)
            loss = -min(ratio * adv[i], clipped * adv[i])
            if beta:
                d = ref[i][t] - logps[i][t]
                loss += beta * (math.exp(d) - d - 1)
            seq, n = seq + loss, n + 1
        per_seq.append(seq / max(n, 1))
        total, tokens = total + seq, tokens + n
    return total / tokens if normalization == "token" else sum(per_seq) / len(per_seq)


@pytest.mark.parametrize("normalization", grpo.NORMALIZATIONS)
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_the_step_loss_equals_the_objective_computed_token_by_token(normalization: str, beta: float) -> None:
    generator = torch.Generator().manual_seed(0)
    logps = -torch.rand(4, 6, generator=generator) * 3
    old = logps + (torch.rand(4, 6, generator=generator) - 0.5) * 0.8  # ratios on both sides of the clip range
    ref = logps + (torch.rand(4, 6, generator=generator) - 0.5)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0], [1, 0, 0, 0, 0, 0]])
    adv = grpo.group_advantages(torch.tensor([1.0, 0.0, 0.5, 0.0]), 2, "group")
    losses = grpo.token_losses(logps, old, adv, mask, 0.2, 0.28, beta, ref)
    got = grpo.loss_sum(losses, mask, normalization) / grpo.units(mask, normalization)
    want = _hand_loss(logps.tolist(), old.tolist(), adv.tolist(), mask.tolist(), 0.2, 0.28, beta, ref.tolist(), normalization)
    assert got.item() == pytest.approx(want, rel=1e-6)
    # The loop's way (framework/train/loop.py): micro-batch sums over the step's units give the same loss.
    sums = sum(grpo.loss_sum(grpo.token_losses(logps[i:i + 2], old[i:i + 2], adv[i:i + 2], mask[i:i + 2], 0.2, 0.28, beta, ref[i:i + 2]),
                             mask[i:i + 2], normalization) for i in (0, 2))
    assert (sums / grpo.units(mask, normalization)).item() == pytest.approx(want, rel=1e-6)


def test_the_clip_cuts_the_gradient_only_where_the_ratio_left_the_trust_region_in_the_advantages_direction() -> None:
    old = torch.zeros(4, 1)
    logps = torch.log(torch.tensor([[1.5], [1.5], [0.5], [1.1]])).requires_grad_()
    adv = torch.tensor([1.0, -1.0, -1.0, 1.0])
    losses = grpo.token_losses(logps, old, adv, torch.ones(4, 1), 0.2, 0.2)
    assert losses.clipped.flatten().tolist() == [1.0, 0.0, 1.0, 0.0]
    losses.loss.sum().backward()
    # Clipped tokens get no gradient; the others get −A·ρ (d(−ρA)/d log π).
    assert logps.grad.flatten().tolist() == pytest.approx([0.0, 1.5, 0.0, -1.1])


# ---------------------------------------------------------------------------------------------
# The rl config: refused in one line before any cluster work

@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    from transformers import LlamaConfig

    path = tmp_path_factory.mktemp("policy")
    LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2).save_pretrained(path)
    return str(path)


def _grpo(folder: str, *overrides: str):  # noqa: ANN202
    from framework.train.config import TRAIN

    return TRAIN.from_overrides(["experiment=grpo", f"model.pretrained_path={folder}", "data.sources.0.path=/x.jsonl", *overrides])


def test_experiment_grpo_composes_the_rl_group_and_a_reward(folder: str) -> None:
    cfg = _grpo(folder, "reward=math", "rl.max_tokens=64")
    assert cfg.rl.algorithm == "grpo" and cfg.data.name == "prompts" and cfg.post is None
    assert cfg.reward.functions["overlong"]["max_tokens"] == 64  # ${rl.max_tokens}, resolved
    assert [f.name for f in reward_functions(cfg.reward)] == ["correct", "format", "overlong"]


@pytest.mark.parametrize("overrides, message", [
    (["rl.group_size=1"], r"^rl\.group_size=1: expected 2 or more"),
    (["rl.temperature=0"], r"^rl\.temperature=0\.0: expected a positive temperature"),
    (["rl.scale_rewards=mean"], r"^rl\.scale_rewards=mean: expected one of group, batch, none$"),
    (["rl.engine.kv_cache_gib=0"], r"^rl\.engine\.kv_cache_gib=0: expected a whole number of GiB"),
    (["+reward.functions.correct.fild=answer"], r"^reward\.functions\.correct\.fild=answer: not an argument of framework\.rl\.rewards\.last_number"),
    (["~reward"], r"^reward=None: rl=grpo needs rewards"),
    (["rl.engine.placement=colocated", "rl.engine.num_gpus=1"], r"^rl\.engine\.placement=colocated: an engine colocated on the trainer's GPU needs vLLM's sleep mode"),
    (["data=stdlib"], r"^data=stdlib: rl samples completions of prompts: expected data=prompts"),
    (["rl.iterations=0"], r"^rl\.iterations=0: expected 1 or more"),
    (["rl.iterations=4"], r"^run\.checkpoint_interval=50: expected a multiple of rl\.iterations=4 \(each rollout trains that many steps\)"),
])
def test_a_bad_rl_config_fails_in_one_line(folder: str, overrides, message) -> None:  # noqa: ANN001
    with pytest.raises(ConfigError, match=message):
        _grpo(folder, *overrides)


def test_a_reward_without_rl_is_refused(folder: str) -> None:
    from framework.train.config import TRAIN

    with pytest.raises(ConfigError, match=r"^reward=last-number: rewards score the completions of reinforcement learning: add rl=grpo"):
        TRAIN.from_overrides(["reward=last-number"])


def test_a_workers_run_error_ends_the_run_as_one_line_naming_the_rank() -> None:
    """What launch/train.py prints for a reward that raised in a worker: the worker's RunError, not Ray Train's
    WorkerGroupError with every worker's traceback; any other worker failure stays Ray Train's."""
    import ray.train

    from framework.train.trainer import worker_error

    failed = ray.train.WorkerGroupError("rank 1 failed", {1: RunError("reward correct (...) raised KeyError on record 'q'")})
    error = worker_error(failed)
    assert isinstance(error, RunError) and str(error) == "rank 1: reward correct (...) raised KeyError on record 'q'"
    other = ray.train.WorkerGroupError("rank 0 failed", {0: ValueError("boom")})
    assert worker_error(other) is other
