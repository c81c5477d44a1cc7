"""Training the tiny model with 2 Ray Train workers under DeepSpeed ZeRO 1, 2 and 3: the same rows and losses
on any worker count, resume on another worker count, and the checks before any cluster work. (Resume after a
killed worker and an interrupted driver is proven on object storage, in test_checkpoints.py's lifecycle.)"""

import json
import os
import shutil

import numpy as np
import pytest
import torch

from conftest import copy_run_until, launch, run_overrides, train_bare
from framework.config import ConfigError
from framework.train.config import TRAIN

pytestmark = pytest.mark.slow

# Worker counts change only how floating-point sums are grouped: the all-reduce of 2 workers' gradients
# against 1 worker's accumulation, and 2 micro-batch sums per step against 4. Each regrouping moves an
# fp32 result by ~1e-7 relative; over 20 Adam steps that compounds to ~1e-6 on the losses. 1e-5 leaves
# room while a real difference (a row trained twice or skipped, a wrong LR step) moves losses by >1e-3.
WORKER_COUNT_RTOL = 1e-5


def _losses(run_dir):
    """Per-step training losses from the run's metrics.jsonl (the last record for each step wins)."""
    by_step = {}
    with open(os.path.join(run_dir, "logs", "metrics.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            by_step[record["step"]] = record["train/loss"]
    return np.array([by_step[s] for s in sorted(by_step)]), sorted(by_step)


def _weights(checkpoint_dir):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag="deepspeed")


def test_loss_falls(trained_runs):
    losses, steps = _losses(trained_runs[2])
    assert steps == list(range(1, 21))
    assert losses[-5:].mean() < losses[:5].mean() - 0.5, losses


def test_every_step_logs_its_metrics_to_jsonl_and_tensorboard(trained_runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logs = os.path.join(trained_runs[3], "logs")
    with open(os.path.join(logs, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    at_eval = [r for r in records if "val/loss" in r]
    assert [r["step"] for r in at_eval] == [10, 20]
    for record in at_eval:
        assert {"train/lr", "train/grad_norm", "perf/tokens_per_s", "perf/step_s", "perf/peak_mem_gb"} <= set(record)
        assert record["val/perplexity"] == pytest.approx(np.exp(record["val/loss"]))
        assert record["perf/tokens_per_s"] > 0 and record["train/grad_norm"] > 0 and record["perf/peak_mem_gb"] > 0.1
    events = EventAccumulator(logs)
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 21))
    assert [e.step for e in events.Scalars("val/perplexity")] == [10, 20]


def _grad_norms(run_dir):
    with open(os.path.join(run_dir, "logs", "metrics.jsonl")) as f:
        return {r["step"]: r["train/grad_norm"] for r in map(json.loads, f) if "train/grad_norm" in r}


def test_zero0_logs_the_gradient_norm_zero1_logs(prepared_data, run_storage, bare_runs, ray_session):
    """DeepSpeed leaves the norm unset under ZeRO-0 with a plain fp32 optimizer; the loop's own must be the same
    number ZeRO-1's optimizer reports for the same run (one worker, so only summation order differs)."""
    from framework.train.config import TRAIN

    zero0, _ = train_bare(ray_session, TRAIN.from_overrides(run_overrides(
        prepared_data, run_storage, "bare-zero0", deepspeed="zero0", **{"run.num_workers": 1})))
    own, deepspeeds = _grad_norms(zero0), _grad_norms(bare_runs[1])
    assert sorted(own) == sorted(deepspeeds) and all(v > 0 for v in own.values())
    np.testing.assert_allclose([own[s] for s in sorted(own)], [deepspeeds[s] for s in sorted(own)], rtol=1e-3)


def test_zero_stages_give_the_same_losses(trained_runs):
    # The three stages compute the same mathematics; only the order of floating-point reductions
    # differs (all-reduce vs reduce-scatter of partitioned gradients), which perturbs fp32 losses
    # at the 1e-6 level per step. Over 20 steps that stays far below 1e-3 relative, while any real
    # difference (a lost gradient partition, a wrong LR step, different data) moves losses by >1e-2.
    z1, _ = _losses(trained_runs[1])
    for stage in (2, 3):
        zs, _ = _losses(trained_runs[stage])
        rel = np.abs(zs - z1) / z1
        assert rel.max() < 1e-3, f"ZeRO-{stage} vs ZeRO-1 relative loss difference {rel.max():.2e}"


def test_checkpoints_hold_every_rank_and_the_run_state(trained_checkpoints):
    from framework.train.checkpoint import read_config, read_state

    z3 = trained_checkpoints[3]
    files = os.listdir(os.path.join(z3, "deepspeed"))
    assert {f for f in files if f.startswith("zero_pp_rank_") and "optim" in f} == {
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    }
    state = read_state(z3)
    assert (state.step, state.rows, state.world_size, read_config(z3).deepspeed.stage) == (20, 20 * 8, 2, 3)
    assert len(state.data_fingerprint) == 64
    assert os.path.isfile(os.path.join(z3, "tokenizer", "tokenizer.json"))
    assert os.path.isfile(os.path.join(z3, "hf_config", "config.json"))
    # keep_checkpoints=2: steps 10 and 20 are kept
    run_dir = os.path.dirname(z3)
    assert sorted(n for n in os.listdir(run_dir) if n.startswith("checkpoint_") and os.path.isdir(os.path.join(run_dir, n))) == [
        "checkpoint_00000010", "checkpoint_00000020"
    ]


def test_zero3_shards_consolidate_to_the_zero1_weights(trained_checkpoints):
    w1, w3 = _weights(trained_checkpoints[1]), _weights(trained_checkpoints[3])
    assert w1.keys() == w3.keys()
    for name in w1:
        torch.testing.assert_close(w3[name], w1[name], rtol=1e-3, atol=1e-4, msg=name)


def test_one_and_two_workers_train_on_the_same_rows_to_the_same_losses(trained_runs, bare_runs):
    """The rows of a step are a function of the seed and the step alone; each worker takes its slice."""
    two, steps = _losses(trained_runs[1])
    one, one_steps = _losses(bare_runs[1])
    assert one_steps == steps == list(range(1, 21))
    np.testing.assert_allclose(one, two, rtol=WORKER_COUNT_RTOL)
    three_two, _ = _losses(trained_runs[3])
    three_one, _ = _losses(bare_runs[3])
    np.testing.assert_allclose(three_one, three_two, rtol=WORKER_COUNT_RTOL)


# Both directions under ZeRO-3 (its own loader), and ZeRO-1's partitions merged; ZeRO-1/2's split (1→2) is
# test_cluster's elastic run growing back under ZeRO-2 (one Ray Train start fewer here).
@pytest.mark.parametrize("stage, direction", [(1, "2→1"), (3, "2→1"), (3, "1→2")])
def test_a_run_killed_after_its_first_checkpoint_resumes_on_another_worker_count(
    prepared_data, run_storage, trained_runs, bare_runs, ray_session, stage, direction
):
    """It continues the same sample sequence, and its optimizer state (DeepSpeed's universal checkpoint), to
    the losses and weights of the run never interrupted."""
    from framework.train.checkpoint import latest_checkpoint, read_state
    from framework.train.trainer import train

    name = f"elastic-zero{stage}-{'to1' if direction == '2→1' else 'to2'}"
    source, workers = (trained_runs[stage], 1) if direction == "2→1" else (bare_runs[stage], 2)
    copy_run_until(source, 10, os.path.join(run_storage, name))
    cfg = TRAIN.from_overrides(run_overrides(prepared_data, run_storage, name, deepspeed=f"zero{stage}", **{"run.num_workers": workers}))
    if workers == 1:
        train_bare(ray_session, cfg)
    else:
        train(cfg)
    resumed = os.path.join(run_storage, name)
    assert read_state(latest_checkpoint(resumed)).world_size == workers
    losses, steps = _losses(resumed)
    reference, _ = _losses(source)
    assert steps == list(range(1, 21))
    np.testing.assert_allclose(losses[10:], reference[10:], rtol=WORKER_COUNT_RTOL)
    got, want = _weights(latest_checkpoint(resumed)), _weights(latest_checkpoint(source))
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5, msg=key)


def test_one_checkpoint_gives_one_validation_loss_on_any_worker_count_and_micro_batch(
    prepared_data, run_storage, trained_runs, ray_session
):
    """A finished run run again evaluates its final checkpoint: 1 worker × micro-batch 4 (no Ray Train) measures the
    mean that 2 workers × micro-batch 2 logged in training, over the same rows, to float summation order. (A copy of the
    session's run: the shared one stays as it trained. Ray Train's own evaluation on 2 workers is every run's val/loss.)"""
    name = "zero1-evaluated-again"
    copy_run_until(trained_runs[1], 20, os.path.join(run_storage, name))
    logged = [r for r in map(json.loads, open(os.path.join(trained_runs[1], "logs", "metrics.jsonl"))) if "val/loss" in r][-1]["val/loss"]
    overrides = run_overrides(prepared_data, run_storage, name, deepspeed="zero1", **{"run.micro_batch_size": 4, "run.num_workers": 1})
    _, reports = train_bare(ray_session, TRAIN.from_overrides(overrides))
    assert reports[-1]["step"] == 20
    assert reports[-1]["val_loss"] == pytest.approx(logged, rel=1e-6, abs=0)


def test_workers_that_cannot_fit_the_nodes_fail_before_training_with_the_numbers(prepared_data, run_storage, ray_session):
    from framework.train.trainer import train

    with pytest.raises(ConfigError, match=r"^run.num_workers=3: 3 workers × 1 CPUs do not fit the cluster's nodes \(.*: 2 CPUs\): at most 2 fit"):
        train(TRAIN.from_overrides(run_overrides(prepared_data, run_storage, "too-big", **{"run.num_workers": 3, "run.cpus_per_worker": 1,
                                                                                "run.global_batch_size": 12})))


def test_setting_cpus_aside_for_reads_is_refused_by_name_since_workers_read_their_own_rows():
    result = launch("train.py", "run.data_cpus=0.5", timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["ConfigError: run.data_cpus: Key 'data_cpus' not in 'RunConfig'"]


def test_rerunning_a_run_name_with_other_settings_fails_before_ray(prepared_data, run_storage, trained_runs, tmp_path):
    """zero1 has checkpoints; resuming them under ZeRO-2 would not fit their optimizer state: one line, no cluster."""
    ray_tmp = tmp_path / "ray"
    ray_tmp.mkdir()
    overrides = run_overrides(prepared_data, run_storage, "zero1", deepspeed="zero2")
    result = launch("train.py", *overrides, env={"RAY_TMPDIR": str(ray_tmp)}, timeout=180)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert lines == [
        "ConfigError: deepspeed.stage=2: run zero1 resumes checkpoint_00000020, trained with deepspeed.stage=1; "
        "keep the run's settings or start a new run.name"
    ], result.stderr
    assert list(ray_tmp.iterdir()) == [], "a Ray session was started for a run that cannot resume"


@pytest.mark.parametrize("key, value, saved", [("run.seed", 7, 0), ("run.shuffle_window", 3, 8)])
def test_a_resume_with_another_sample_order_is_refused_by_key(prepared_data, run_storage, trained_runs, key, value, saved):
    """The seed and the shuffle window decide the rows of every step: zero1 resumed under others would train some
    rows of the epoch twice and skip others."""
    from framework.train.plan import make_plan

    with pytest.raises(ConfigError) as refused:
        make_plan(TRAIN.from_overrides(run_overrides(prepared_data, run_storage, "zero1", deepspeed="zero1", **{key: value})))
    assert str(refused.value) == (
        f"{key}={value}: run zero1 resumes checkpoint_00000020, trained with {key}={saved}; keep the run's settings or start a new run.name"
    )


def test_reprepared_shards_are_refused_and_the_same_shards_elsewhere_resume(prepared_data, run_storage, trained_runs, tmp_path, ray_session):
    """A run's checkpoints record the shards' fingerprint (tokenizer and every shard's content, not their path)."""
    from conftest import prep_overrides
    from framework.data.prepare import prepare_shards
    from framework.train.plan import make_plan

    moved = tmp_path / "mounted-elsewhere"
    shutil.copytree(prepared_data, moved)
    plan = make_plan(TRAIN.from_overrides(run_overrides(str(moved), run_storage, "zero1", deepspeed="zero1")))
    assert plan.resume_from.endswith("checkpoint_00000020") and plan.resume_state.step == 20

    again = tmp_path / "again"
    prepare_shards(TRAIN.from_overrides(prep_overrides(str(again)) + ["data.tokenizer.vocab_size=1000"]).data)
    result = launch("train.py", *run_overrides(str(again), run_storage, "zero1", deepspeed="zero1"), timeout=180)
    assert result.returncode == 2, result.stderr[-2000:]
    line = result.stderr.strip().splitlines()
    assert len(line) == 1 and line[0].startswith(f"ConfigError: data.output_dir={again}: run zero1 resumes checkpoint_00000020, trained on other shards")


def test_fine_tuning_starts_from_the_local_hugging_face_model(prepared_data, run_storage, trained_runs, exports, ray_session):
    """model=hf-local trains the folder's own weights: with a learning rate too small to move them, its
    validation loss is the one the exported run measured last on the same evaluation rows. (One worker on a bare
    session: the loop loads the folder the same way under Ray Train, where test_sft.py's LoRA run loads one on
    2 workers; the validation loss is the same on any worker count, as tested above.)"""
    folder = exports[1]
    overrides = {
        "model": "hf-local", "model.pretrained_path": folder, "optim.lr": 1e-9, "optim.warmup_steps": 0,
        "run.max_steps": 2, "run.eval_interval": 2, "run.checkpoint_interval": 2, "run.num_workers": 1,
    }
    train_bare(ray_session, TRAIN.from_overrides(run_overrides(prepared_data, run_storage, "fine-tune", **overrides)))

    def last_val_loss(run_dir):
        with open(os.path.join(run_dir, "logs", "metrics.jsonl")) as f:
            return [json.loads(line) for line in f if "val/loss" in line][-1]["val/loss"]

    tuned, trained = last_val_loss(os.path.join(run_storage, "fine-tune")), last_val_loss(trained_runs[1])
    assert tuned == pytest.approx(trained, rel=1e-4), (tuned, trained)


def test_a_cpu_run_builds_no_deepspeed_op(prepared_data, run_storage, ray_session, tmp_path):
    """DeepSpeed's CPU backend compiles its shared-memory all-reduce (45-65 s of CPU) at the first engine start on a
    machine, for its inference all-reduce only; a training worker tells it not to: its C++ build folder stays empty."""
    extensions = tmp_path / "torch_extensions"
    overrides = {"run.max_steps": 2, "optim.warmup_steps": 0, "run.eval_interval": 2, "run.checkpoint_interval": 2,
                 "run.num_workers": 1}
    _, reports = train_bare(ray_session, TRAIN.from_overrides(run_overrides(prepared_data, run_storage, "no-ops", **overrides)),
                            env={"TORCH_EXTENSIONS_DIR": str(extensions)})
    assert reports[-1]["step"] == 2
    assert not extensions.exists() or not any(extensions.iterdir()), sorted(p.name for p in extensions.rglob("*"))
