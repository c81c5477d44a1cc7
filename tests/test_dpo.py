"""Preference tuning: preference pairs (TRL's plain and conversational shapes) rendered and packed pair by pair, the
DPO family's losses (framework/train/objectives.py) checked against a hand computation, the LoRA reference, and
DPO/SimPO/ORPO runs on a tiny model with a clear preference signal.

The base model is a local folder built here (a random tiny Llama and the framework's byte-level BPE with its ChatML
template); the pairs are written here: every chosen answer calls the thing "good", every rejected one "bad".
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

from conftest import STDLIB, copy_run_until, tiny_chat_model, train_bare
from framework.config import ConfigError
from framework.train.config import TRAIN

SEQ = 128
WORDS = ["apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "forest", "candle", "mirror", "ocean", "garden",
         "rocket", "silver", "window", "bridge", "planet", "castle", "pepper", "meadow"]
# The bad records written into the pairs file: one of each reason preference prep counts.
BAD = {"malformed": 1, "missing_field": 1, "identical_pair": 1, "too_long": 1}


def _pairs() -> list:
    """120 pairs with one clear preference (chosen: "... is good", rejected: "... is bad"), half plain, half conversational."""
    rng = np.random.default_rng(0)
    records = []
    for i in range(120):
        a, b = rng.choice(WORDS, 2, replace=False)
        prompt, chosen, rejected = f"Tell me about the {a} and the {b}.", f"The {a} is good.", f"The {a} is bad."
        if i % 2:
            records.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
        else:
            records.append({"prompt": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": prompt}],
                            "chosen": [{"role": "assistant", "content": chosen}], "rejected": [{"role": "assistant", "content": rejected}]})
    return records


def _bad_lines() -> list:
    return ["[1, 2]", json.dumps({"prompt": "hi", "chosen": "yes"}), json.dumps({"prompt": "hi", "chosen": "same", "rejected": "same"}),
            json.dumps({"prompt": "long " * 200, "chosen": "a", "rejected": "b"})]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    """A local HF model folder: a random tiny Llama and a 1k BPE trained on the pairs' text and a little stdlib code."""
    import glob

    folder = str(tmp_path_factory.mktemp("base") / "tiny-pref")
    return tiny_chat_model(folder, [open(p).read() for p in sorted(glob.glob(f"{STDLIB}/[a-b]*.py"))[:6]] + [json.dumps(_pairs())])


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _pairs()) + "".join(line + "\n" for line in _bad_lines()))
    return path


# ---------------------------------------------------------------------------------------------
# Losses against a hand computation (no Ray)

def _tiny(seed: int):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, max_position_embeddings=128, tie_word_embeddings=True)
    return AutoModelForCausalLM.from_config(config).eval()


# Two pairs of token ids: (prompt, chosen response, rejected response).
PAIRS = [([5, 9, 11, 3, 7], [20, 21, 22, 23], [30, 31, 32]), ([6, 8, 10, 12, 14, 16], [40, 41, 42], [50, 51, 52, 53, 54])]


def _pair_batch(seq_len: int):
    """The two pairs packed as prep packs them (framework/data/shards.py: pack_conversations) into rows of `seq_len`."""
    from framework.data.shards import pack_conversations, position_ids
    from framework.data.stream import POSITIONS, to_batch

    docs = []
    for prompt, chosen, rejected in PAIRS:
        ids = prompt + chosen + prompt + rejected
        mask = [0] * len(prompt) + [1] * len(chosen) + [0] * len(prompt) + [2] * len(rejected)
        docs.append((np.array(ids, np.int32), np.array(mask, np.uint8), len(prompt) + len(chosen)))
    ids, mask, starts, _ = pack_conversations(docs, seq_len, pad_id=0)
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in starts])])
    return to_batch({"input_ids": ids, "pair_mask": mask, POSITIONS: position_ids(np.concatenate(starts), offsets, seq_len)})


def _hand_logps(model, prompt, response) -> tuple:
    """(sum, mean) of the response tokens' log-probs, the sequence run alone."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    values = [logp[t - 1, ids[0, t]].item() for t in range(len(prompt), ids.shape[1])]
    return sum(values), sum(values) / len(values)


@pytest.mark.parametrize("seq_len, rows", [(40, 1), (20, 2)], ids=["packed", "unpacked"])
def test_the_dpo_family_equals_a_hand_computation_from_the_same_log_probs(seq_len, rows):
    from types import SimpleNamespace

    from framework.train.objectives import PreferenceObjective, frozen_model

    policy, reference = _tiny(0), _tiny(1)
    batch = _pair_batch(seq_len)
    assert batch["input_ids"].shape[0] == rows
    # (sum, mean) log-probs of chosen 1, rejected 1, chosen 2, rejected 2, each sequence run alone.
    pol, ref = ([_hand_logps(m, p, y) for p, c, r in PAIRS for y in (c, r)] for m in (policy, reference))
    beta, eps, gamma = 0.3, 0.1, 0.4
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    expected = {}
    for loss in ("dpo", "ipo", "simpo", "orpo"):
        losses, chosen, rejected = [], [], []
        for k in range(2):
            (c, c_avg), (r, r_avg), (rc, rc_avg), (rr, rr_avg) = pol[2 * k], pol[2 * k + 1], ref[2 * k], ref[2 * k + 1]
            if loss == "dpo":
                h = (c - rc) - (r - rr)
                losses.append(-(1 - eps) * math.log(sig(beta * h)) - eps * math.log(sig(-beta * h)))
                chosen.append(beta * (c - rc)), rejected.append(beta * (r - rr))
            elif loss == "ipo":
                h = (c_avg - rc_avg) - (r_avg - rr_avg)
                losses.append((h - 1 / (2 * beta)) ** 2)
                chosen.append(beta * (c_avg - rc_avg)), rejected.append(beta * (r_avg - rr_avg))
            elif loss == "simpo":
                h = c_avg - r_avg - gamma / beta
                losses.append(-(1 - eps) * math.log(sig(beta * h)) - eps * math.log(sig(-beta * h)))
                chosen.append(beta * c_avg), rejected.append(beta * r_avg)
            else:
                odds = (c_avg - r_avg) - (math.log(1 - math.exp(c_avg)) - math.log(1 - math.exp(r_avg)))
                losses.append(-c_avg - beta * math.log(sig(odds)))
                chosen.append(beta * c_avg), rejected.append(beta * r_avg)
        expected[loss] = (losses, chosen, rejected)
        post = SimpleNamespace(loss=loss, beta=beta, label_smoothing=eps if loss in ("dpo", "simpo") else 0.0, simpo_gamma=gamma)
        objective = PreferenceObjective(post, frozen_model(reference) if loss in ("dpo", "ipo") else None, "copy")
        assert objective.units(batch) == 2
        total, sums = objective.loss(policy, batch, scale=2.0)  # scale: the step's pairs over workers × micro-batches
        logged = objective.metrics(sums, "train")
        losses, chosen, rejected = expected[loss]
        assert total.item() == pytest.approx(sum(losses) / 2, rel=1e-5), loss
        assert logged["train/loss"] == pytest.approx(np.mean(losses), rel=1e-5), loss
        # float32 sums in another order (other thread counts) move a reward of ~5e-3 by ~1e-7.
        assert logged["train/rewards/chosen"] == pytest.approx(np.mean(chosen), rel=1e-5, abs=1e-6), loss
        assert logged["train/rewards/rejected"] == pytest.approx(np.mean(rejected), rel=1e-5, abs=1e-6), loss
        assert logged["train/rewards/margin"] == pytest.approx(np.mean(chosen) - np.mean(rejected), rel=1e-5, abs=1e-6), loss
        assert logged["train/rewards/accuracy"] == np.mean([c > r for c, r in zip(chosen, rejected)]), loss
        total.backward()  # the loss is differentiable through the per-segment sums
        assert policy.model.embed_tokens.weight.grad.abs().sum() > 0
        policy.zero_grad()


def test_the_lora_reference_is_the_base_model_with_adapters_off():
    """The reference of a LoRA run is the policy itself, adapters disabled: exactly the base model's log-probs, while the
    adapted policy (B no longer zero) computes others."""
    import copy

    from framework.model import LoraConfig, with_lora
    from framework.train.objectives import adapters_disabled, frozen_model, response_logps

    base = _tiny(0)
    adapted = with_lora(copy.deepcopy(base), LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"])).eval()
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # as after training: the adapters change the output
    batch = _pair_batch(40)
    reference = response_logps(adapters_disabled(adapted)(batch), batch, average=False)
    expected = response_logps(frozen_model(base)(batch), batch, average=False)
    for got, want in zip(reference, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    with torch.no_grad():
        policy = response_logps(adapted(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits, batch, False)
    assert (policy[0] - expected[0]).abs().max() > 1e-2  # the comparison can fail: the adapters are on outside the reference


def test_reference_free_losses_load_no_reference_model():
    from types import SimpleNamespace

    from framework.train.objectives import build_objective

    for loss in ("simpo", "orpo"):
        cfg = SimpleNamespace(post=SimpleNamespace(loss=loss, beta=0.1, label_smoothing=0.0, simpo_gamma=0.5), model=SimpleNamespace(lora=None))
        objective = build_objective(cfg, engine=None, model_config=None, ds_config={})
        assert objective.reference is None and objective.reference_kind == "none"


# ---------------------------------------------------------------------------------------------
# Records and config (no Ray)

def test_both_record_shapes_become_pairs_and_bad_records_say_why():
    from framework.data.chat import BadRecord, Pair, preference_pair
    from framework.data.sources import SourceFile

    source = SourceFile("x.jsonl", "preference", "text", prompt="q", chosen="good", rejected="bad")
    plain = preference_pair({"q": "Hi?", "good": "Hello.", "bad": "Go away."}, source)
    assert plain == Pair([{"role": "user", "content": "Hi?"}], [{"role": "assistant", "content": "Hello."}], [{"role": "assistant", "content": "Go away."}])
    chat = preference_pair({"q": [{"role": "user", "content": "Hi?"}], "good": [{"role": "assistant", "content": "Hello."}],
                            "bad": [{"role": "assistant", "content": "Go away."}]}, source)
    assert chat == plain
    for record, reason in (([], "malformed"), ({"q": "a", "good": "b"}, "missing_field"), ({"q": "a", "good": "b", "bad": "b"}, "identical_pair"),
                           ({"q": "a", "good": [{"role": "user", "content": "b"}], "bad": "c"}, "no_assistant"),
                           ({"q": [{"role": "narrator", "content": "a"}], "good": "b", "bad": "c"}, "unknown_role")):
        with pytest.raises(BadRecord) as bad:
            preference_pair(record, source)
        assert bad.value.reason == reason, record


def test_a_pair_renders_as_sft_renders_its_two_conversations_with_targets_on_the_responses_alone(base):
    from transformers import AutoTokenizer

    from framework.data.chat import ChatRenderer, Pair

    tokenizer = AutoTokenizer.from_pretrained(base)
    data = TRAIN.from_overrides(["data=preference", "data.sources.0.path=x", f"data.tokenizer.path={base}", f"data.seq_len={SEQ}"]).data
    prompt = [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "Earlier answer."}, {"role": "user", "content": "And now?"}]
    pair = Pair(prompt, [{"role": "assistant", "content": "Yes."}], [{"role": "assistant", "content": "No."}])
    (rendered,) = ChatRenderer(tokenizer, data).render_pairs([pair])
    chosen, rejected = rendered.ids[: rendered.second], rendered.ids[rendered.second :]
    assert tokenizer.decode(chosen) == tokenizer.apply_chat_template(prompt + pair.chosen, tokenize=False)
    assert tokenizer.decode(rejected) == tokenizer.apply_chat_template(prompt + pair.rejected, tokenize=False)
    # The prompt's own assistant turn is no target; each response and its end-of-turn token are, marked 1 and 2.
    assert tokenizer.decode(rendered.ids[rendered.mask == 1]) == "Yes.<|im_end|>"
    assert tokenizer.decode(rendered.ids[rendered.mask == 2]) == "No.<|im_end|>"


@pytest.mark.parametrize("overrides, key", [
    (["post=dpo"], "post"),  # a preference loss on text data
    (["post=dpo", "post.loss=kto"], "post.loss"),
    (["post=dpo", "post.beta=0"], "post.beta"),
    (["post=ipo", "post.label_smoothing=0.1"], "post.label_smoothing"),
    (["data=preference", "post=dpo", "data.sources.0.path=x", "data.tokenizer.path=x", "data.overlong=truncate"], "data.overlong"),
    (["data=preference", "post=dpo", "data.sources.0.path=x", "data.tokenizer.path=x", "data.packing=plain"], "data.packing"),
    (["data=preference", "post=dpo", "data.sources=[{path: x, format: preference}, {path: y, format: chat}]", "data.tokenizer.path=x"],
     "data.sources.1.format"),
    (["data=chat", "data.sources.0.path=x", "data.tokenizer.path=x", "data.sources.0.chosen=better"], "data.sources.0.chosen"),
])
def test_preference_settings_that_cannot_work_fail_in_one_line(overrides, key):
    with pytest.raises(ConfigError, match="^" + key.replace(".", r"\.") + "="):
        TRAIN.from_overrides(overrides)


def test_the_recipes_compose_and_a_sweep_can_aim_at_validation_accuracy(base, pairs_file):
    from framework.tune.plan import load_sweep

    for recipe, lora in (("dpo", False), ("dpo-lora", True)):
        cfg = TRAIN.from_overrides([f"experiment={recipe}", f"model.pretrained_path={base}", f"data.sources.0.path='{pairs_file}'"])
        assert (cfg.post.loss, cfg.model.lora is not None, cfg.data.name, cfg.deepspeed.stage) == ("dpo", lora, "preference", 3)
    sweep = load_sweep(["experiment=dpo", f"model.pretrained_path={base}", f"data.sources.0.path='{pairs_file}'", "tune=grid",
                        "tune.metric=val_rewards_accuracy", "tune.mode=max", "~tune/space", '+tune.space.post.beta="choice(0.1, 0.5)"',
                        '+tune.space.optim.lr="choice(1e-5, 1e-4)"', '+tune.space.post.loss="choice(dpo, simpo)"'])
    assert sweep.tune.metric == "val_rewards_accuracy" and set(sweep.params) == {"post.beta", "optim.lr", "post.loss"}


# ---------------------------------------------------------------------------------------------
# Prep and runs (Ray)

@pytest.fixture(scope="module")
def preference_data(base, pairs_file, tmp_path_factory, ray_session) -> str:
    from framework.data.prepare import prepare_shards

    out = str(tmp_path_factory.mktemp("pref") / "pairs")
    prepare_shards(TRAIN.from_overrides(["data=preference", f"data.sources.0.path='{pairs_file}'", f"data.tokenizer.path={base}",
                                         f"data.seq_len={SEQ}", "data.val_fraction=0.2", f"data.output_dir={out}", "post=dpo"]).data)
    return out


@pytest.mark.slow
def test_prepared_rows_hold_whole_pairs_chosen_then_rejected_and_bad_records_are_counted(preference_data, base):
    from transformers import AutoTokenizer

    from framework.data.shards import read_manifest
    from framework.data.stream import ShardReader

    tokenizer = AutoTokenizer.from_pretrained(base)
    manifest = read_manifest(preference_data)
    assert {r: b["count"] for r, b in manifest["bad_records"].items()} == BAD
    assert manifest["columns"] == ["input_ids", "pair_mask", "segment_starts"]
    pairs = 0
    for split in ("train", "validation"):
        rows = ShardReader(preference_data, manifest, split, 4).read(np.arange(manifest["splits"][split]["rows"]))
        for ids, mask, positions in zip(rows["input_ids"], rows["pair_mask"], rows["position_ids"]):
            bounds = list(np.flatnonzero(positions == 0)) + [SEQ]
            kinds = [set(mask[a:z].tolist()) - {0} for a, z in zip(bounds, bounds[1:])]
            # Segments come as (chosen, rejected) pairs, then maybe padding: never a pair split across rows.
            while kinds and not kinds[-1]:
                kinds.pop()
            assert kinds == [{1}, {2}] * (len(kinds) // 2), kinds
            for (a, b), (_, z) in zip(zip(bounds[0::2], bounds[1::2]), zip(bounds[1::2], bounds[2::2])):
                chosen, rejected = tokenizer.decode(ids[a:b][mask[a:b] == 1]), tokenizer.decode(ids[b:z][mask[b:z] == 2])
                if chosen:
                    assert chosen.endswith(" is good.<|im_end|>") and rejected.endswith(" is bad.<|im_end|>"), (chosen, rejected)
                    pairs += 1
    assert pairs == manifest["splits"]["train"]["documents"] + manifest["splits"]["validation"]["documents"] == len(_pairs())


def dpo_overrides(base: str, data_dir: str, storage: str, name: str, **extra: object) -> list:
    """A 20-step DPO run of the tiny base on the pairs (about 30 train rows of 128 tokens, 3 pairs each), checkpoints at 10, 20."""
    overrides = {
        "experiment": "dpo", "model.pretrained_path": base, "data.sources.0.path": "unused", "data.output_dir": data_dir,
        "data.seq_len": SEQ, "data.val_fraction": 0.2, "run.name": name, "run.storage_path": storage, "run.num_workers": 2,
        "run.max_steps": 20, "run.global_batch_size": 8, "run.micro_batch_size": 2, "run.log_interval": 5, "run.eval_interval": 5,
        "run.checkpoint_interval": 10, "run.max_failures": 0, "optim.warmup_steps": 2, "optim.lr": 3e-3, **extra,
    }
    return [f"{k}={v}" for k, v in overrides.items()]


@pytest.fixture(scope="module")
def dpo_storage(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("dpo-runs"))


@pytest.fixture(scope="module")
def dpo_run(base, preference_data, dpo_storage, ray_session) -> str:
    """DPO of every weight under ZeRO-3 on 2 Ray Train workers, the reference a frozen copy: 20 steps."""
    from framework.train.trainer import train

    train(TRAIN.from_overrides(dpo_overrides(base, preference_data, dpo_storage, "dpo")))
    return os.path.join(dpo_storage, "dpo")


def _records(run_dir):
    with open(os.path.join(run_dir, "logs", "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _by_step(run_dir, key):
    return {r["step"]: r[key] for r in _records(run_dir) if key in r}


@pytest.mark.slow
def test_dpo_raises_validation_preference_accuracy_and_logs_every_metric(dpo_run):
    records = _records(dpo_run)
    val = _by_step(dpo_run, "val/rewards/accuracy")
    # Step 0: the policy is its reference, every reward 0, every pair a tie (no win), the loss log 2.
    assert val[0] == 0.0 and _by_step(dpo_run, "val/loss")[0] == pytest.approx(math.log(2), rel=1e-6)
    assert _by_step(dpo_run, "train/loss")[1] == pytest.approx(math.log(2), rel=1e-6)
    assert sorted(val) == [0, 5, 10, 15, 20] and val[20] >= 0.9, val
    margins = _by_step(dpo_run, "val/rewards/margin")
    assert margins[20] > margins[5] > 0, margins
    losses = _by_step(dpo_run, "train/loss")
    assert len(losses) == 20 and np.mean([losses[s] for s in range(16, 21)]) < 0.5 * math.log(2), losses
    names = {"loss", "rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy", "logps/chosen", "logps/rejected"}
    assert {f"train/{n}" for n in names} <= set(records[-1]) and {f"val/{n}" for n in names} <= set(records[-1])


@pytest.mark.slow
def test_a_dpo_run_resumes_mid_epoch_on_another_worker_count_to_the_same_losses(dpo_run, dpo_storage, base, preference_data, ray_session):
    """The 2-worker ZeRO-3 run cut after its step-10 checkpoint (mid-epoch), resumed on one worker (DeepSpeed's universal
    conversion; the reference built again from the starting weights): the same rows, the same losses."""
    from framework.data.shards import read_manifest

    train_rows = read_manifest(preference_data)["splits"]["train"]["rows"]
    assert (10 * 8) % train_rows != 0  # step 10 ends inside an epoch
    target = os.path.join(dpo_storage, "dpo-resumed")
    copy_run_until(dpo_run, 10, target)
    train_bare(ray_session, TRAIN.from_overrides(dpo_overrides(base, preference_data, dpo_storage, "dpo-resumed", **{"run.num_workers": 1})))
    for key in ("train/loss", "train/rewards/margin"):
        got, want = _by_step(target, key), _by_step(dpo_run, key)
        np.testing.assert_allclose([got[s] for s in range(11, 21)], [want[s] for s in range(11, 21)], rtol=1e-4, atol=1e-6)
    assert _by_step(target, "val/rewards/accuracy")[20] == pytest.approx(_by_step(dpo_run, "val/rewards/accuracy")[20])


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["simpo", "orpo"])
def test_reference_free_losses_train_without_a_reference(loss, base, preference_data, tmp_path, ray_session):
    run_dir, reports = train_bare(ray_session, TRAIN.from_overrides(dpo_overrides(
        base, preference_data, str(tmp_path), loss, **{"post": loss, "run.num_workers": 1, "run.max_steps": 12, "run.eval_interval": 6,
                                                       "run.checkpoint_interval": 12, "deepspeed": "zero2"})))
    losses = _by_step(run_dir, "train/loss")
    assert np.mean([losses[s] for s in range(10, 13)]) < np.mean([losses[s] for s in range(1, 4)]), losses
    accuracy = _by_step(run_dir, "val/rewards/accuracy")
    assert accuracy[12] >= accuracy[0] and reports[-1]["val_rewards_accuracy"] == accuracy[12]


@pytest.mark.slow
def test_a_dpo_checkpoint_exports_to_a_verified_folder_with_the_chat_template(dpo_run, base, preference_data, tmp_path):
    """Export (and so serving, which loads the folder) takes a DPO checkpoint as any other: the policy alone, no reference.
    A folder's token loss on preference shards is refused in one line (compression's gate measures it on other shards)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from framework.evaluate import evaluate_folder
    from framework.export import export_checkpoint

    folder = export_checkpoint(dpo_run, str(tmp_path / "dpo"))
    assert json.loads(open(os.path.join(folder, "export.json")).read())["max_logit_difference"] <= 1e-5
    assert AutoTokenizer.from_pretrained(folder).chat_template == AutoTokenizer.from_pretrained(base).chat_template
    exported = AutoModelForCausalLM.from_pretrained(folder)
    assert sum(p.numel() for p in exported.parameters()) == sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(base).parameters())
    with pytest.raises(ConfigError, match="holds preference pairs"):
        evaluate_folder(folder, preference_data, None, micro_batch=4)
