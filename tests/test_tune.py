"""Sweeps: a 4-trial ASHA sweep of the tiny model end to end, its results, promotion, resuming, and fail-fast checks."""

from __future__ import annotations

import json
import os
import time

import pandas as pd
import pytest

from conftest import launch
from framework.config import ConfigError

# One hopeless learning rate among the grid, so that ASHA has a trial that clearly trails at its first rung.
LEARNING_RATES = "grid(3e-3, 1e-2, 1e-5, 1e-3)"
MAX_STEPS = 30


def sweep_overrides(data_dir: str, root: str, name: str) -> list:
    """A grid over four learning rates of a 30-step tiny run, evaluated and checkpointed every 10 steps.

    Two workers per trial: on a 2-CPU machine they hold 0.5 CPU each and leave 1 for Ray Data's reads.
    """
    return [
        "model=tiny",
        "deepspeed=zero1",
        f"data.output_dir={data_dir}",
        "data.seq_len=64",
        "run.num_workers=2",
        f"run.max_steps={MAX_STEPS}",
        "run.global_batch_size=8",
        "run.micro_batch_size=4",
        "run.log_interval=10",
        "run.eval_interval=10",
        "run.checkpoint_interval=10",
        "run.eval_batches=2",
        "run.max_failures=0",
        "optim.warmup_steps=2",
        "tune=grid",
        "~tune/space",
        f'+tune.space.optim.lr="{LEARNING_RATES}"',
        f"tune.name={name}",
        f"tune.storage_path={root}",
        f"tune.output_dir={root}/{name}",
        "tune.max_concurrent_trials=1",
        "tune.asha.grace_period=10",
        "tune.asha.reduction_factor=2",
        "tune.verbose=0",
    ]


@pytest.fixture(scope="module")
def sweep_run(prepared_data, ray_session, tmp_path_factory):
    from framework.tune.runner import run
    from framework.tune.sweep import load_sweep

    overrides = sweep_overrides(prepared_data, str(tmp_path_factory.mktemp("sweeps")), "lr-grid")
    sweep = load_sweep(overrides)
    return overrides, sweep, run(sweep)


def test_asha_sweep_stops_a_trailing_trial_early(sweep_run):
    _, _, result = sweep_run
    table = result.table
    assert len(table) == 4 and set(table["status"]) <= {"completed", "stopped"}
    stopped = table[table["stopped_early"]]
    assert len(stopped) >= 1
    assert (stopped["steps"] < MAX_STEPS).all()
    assert (table[~table["stopped_early"]]["steps"] == MAX_STEPS).all()
    # The hopeless learning rate is among the stopped.
    assert 1e-5 in set(stopped["optim.lr"])


def test_sweep_writes_the_results_table_and_both_plots(sweep_run):
    _, _, result = sweep_run
    out = result.output_dir
    csv = pd.read_csv(os.path.join(out, "results.csv"))
    parquet = pd.read_parquet(os.path.join(out, "results.parquet"))
    assert list(csv["trial"]) == list(parquet["trial"]) == list(result.table["trial"])
    for column in ("optim.lr", "overrides", "final_val_loss", "best_val_loss", "steps", "stopped_early", "wall_s"):
        assert column in parquet.columns
    assert (parquet["best_val_loss"] <= parquet["final_val_loss"] + 1e-12).all()
    assert (parquet["wall_s"] > 0).all()
    history = pd.read_parquet(os.path.join(out, "history.parquet"))
    assert set(history["trial"]) == set(parquet["trial"])
    for plot in ("curves.png", "params.png"):
        with open(os.path.join(out, plot), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        assert os.path.getsize(os.path.join(out, plot)) > 10_000


def test_best_trial_has_the_best_final_metric_in_the_table(sweep_run):
    _, _, result = sweep_run
    with open(os.path.join(result.output_dir, "best.json")) as f:
        best = json.load(f)
    assert set(best) >= {"trial", "metric", "value", "mode", "overrides", "path"}
    assert best["metric"] == "val_loss" and best["mode"] == "min"
    table = pd.read_parquet(os.path.join(result.output_dir, "results.parquet"))
    assert best["value"] == pytest.approx(table["final_val_loss"].min())
    row = table[table["trial"] == best["trial"]].iloc[0]
    assert row["final_val_loss"] == pytest.approx(best["value"])
    assert best["overrides"] == row["overrides"].split()
    assert os.path.isabs(best["path"]) and os.path.isfile(os.path.join(best["path"], "config.json"))


def test_promoted_model_gives_the_trial_checkpoints_logits(sweep_run):
    """The HF folder, loaded by transformers, matches the weights in the best trial's own DeepSpeed checkpoint."""
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoConfig, AutoModelForCausalLM

    from framework.train.checkpoint import DEEPSPEED_TAG, HF_CONFIG_DIR

    _, _, result = sweep_run
    best = result.best
    checkpoint = result.table.set_index("trial").loc[best["trial"], "checkpoint"]
    own = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(os.path.join(checkpoint, HF_CONFIG_DIR)))
    own.load_state_dict(get_fp32_state_dict_from_zero_checkpoint(checkpoint, tag=DEEPSPEED_TAG), strict=False)
    own.tie_weights()
    exported = AutoModelForCausalLM.from_pretrained(best["path"])
    ids = torch.randint(0, own.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = own.eval()(ids).logits, exported.eval()(ids).logits
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()


def test_running_a_finished_sweep_again_resumes_it_without_training(sweep_run):
    from framework.tune.runner import run
    from framework.tune.sweep import load_sweep

    overrides, _, first = sweep_run
    again = run(load_sweep(overrides))
    assert again.resumed
    assert list(again.table["trial"]) == list(first.table["trial"])
    assert list(again.table["final_val_loss"]) == pytest.approx(list(first.table["final_val_loss"]))
    assert again.best["trial"] == first.best["trial"]


def test_resuming_with_a_different_space_is_refused(sweep_run):
    from framework.tune.runner import run
    from framework.tune.sweep import load_sweep

    overrides, _, _ = sweep_run
    changed = [o.replace(LEARNING_RATES, "grid(3e-3, 1e-2)") for o in overrides]
    with pytest.raises(ConfigError, match="tune.name=lr-grid: a sweep of this name"):
        run(load_sweep(changed))


def test_a_bad_search_space_fails_before_any_trial_with_one_line():
    start = time.perf_counter()
    proc = launch("tune.py", '+tune.space.optim.lrr="loguniform(1e-4,3e-3)"', timeout=300)
    elapsed = time.perf_counter() - start
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("ConfigError: tune.space.optim.lrr: ") and "not a key" in lines[0]
    assert "Ray" not in proc.stdout and elapsed < 120


@pytest.mark.parametrize(
    "override, message",
    [
        ('+tune.space.optim.lr="lognormal(1e-4,3e-3)"', "tune.space.optim.lr=lognormal(1e-4,3e-3): unknown distribution"),
        ('+tune.space.optim.lr="loguniform(0,3e-3)"', "tune.space.optim.lr=loguniform(0,3e-3): a log-scale range needs low > 0"),
        ('+tune.space.run.micro_batch_size="choice(3,4)"', "tune.space.run.micro_batch_size: choice(3,4) gives 3: run.global_batch_size=16"),
        ('+tune.space.deepspeed="choice(zero1,zero9)"', "tune.space.deepspeed: choice(zero1,zero9) gives zero9: 'zero9' is not an option"),
        ('+tune.space.data.seq_len="choice(64,128)"', "tune.space.data.seq_len: set by the sweep itself"),
        ("tune.metric=accuracy", "tune.metric=accuracy: expected a metric the training loop reports"),
        ("tune.asha.grace_period=300", "tune.asha.grace_period=300: expected fewer steps than run.max_steps=300"),
    ],
)
def test_sweep_checks_name_the_bad_key(override, message):
    from framework.tune.sweep import load_sweep

    with pytest.raises(ConfigError) as error:
        load_sweep([override])
    assert str(error.value).startswith(message)


def test_sweep_config_composes_the_same_training_tree_as_config():
    """conf/tune.yaml repeats conf/config.yaml's training defaults; the two must not drift apart."""
    from omegaconf import OmegaConf

    from framework.config import JobConfig, compose
    from framework.tune.sweep import register_sweep_schema

    register_sweep_schema()
    for overrides in ([], ["experiment=smoke", "deepspeed=zero3"]):
        sweep_cfg, train_cfg = compose(overrides, "tune"), compose(overrides)
        for key in JobConfig.__dataclass_fields__:
            assert OmegaConf.to_container(sweep_cfg[key], resolve=True) == OmegaConf.to_container(train_cfg[key], resolve=True)
