"""Sweeps: a 4-trial ASHA sweep of the tiny model run by launch/tune.py, interrupted and resumed; its
results, promotion and evaluation rows; a PBT sweep whose clone trains with its own values; and the
checks that fail a sweep before any trial (Hydra's grammar, presets, the docs' commands)."""

from __future__ import annotations

import ast
import glob
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from conftest import ROOT, VAL_FRACTION, launch
from framework.config import CONF_DIR, ConfigError

# A hopeless learning rate beside a good one, each at two micro-batch sizes: ASHA has trials that
# clearly trail at its first rung, and two pairs of trials that differ only in run.micro_batch_size.
LEARNING_RATES = "choice(3e-3,1e-5)"
MICRO_BATCHES = "choice(2,4)"
MAX_STEPS = 20
EVAL_ROWS = 32


def sweep_overrides(data_dir: str, root: str, name: str) -> list:
    """A grid of 2 learning rates × 2 micro-batch sizes of a 20-step, 2-worker tiny run, evaluated and
    checkpointed every 10 steps (2 workers of 1 CPU: a trial holds the whole 2-CPU machine)."""
    return [
        "model=tiny",
        "deepspeed=zero1",
        f"data.output_dir={data_dir}",
        "data.seq_len=64",
        f"data.val_fraction={VAL_FRACTION}",
        "run.num_workers=2",
        f"run.max_steps={MAX_STEPS}",
        "run.global_batch_size=8",
        "run.micro_batch_size=2",
        "run.log_interval=10",
        "run.eval_interval=10",
        f"run.eval_rows={EVAL_ROWS}",
        "run.checkpoint_interval=10",
        "run.max_failures=0",
        "optim.warmup_steps=2",
        "tune=grid",
        "~tune/space",
        f'+tune.space.optim.lr="{LEARNING_RATES}"',
        f'+tune.space.run.micro_batch_size="{MICRO_BATCHES}"',
        f"tune.name={name}",
        f"tune.storage_path={root}",
        f"tune.output_dir={root}/{name}-results",
        "tune.max_concurrent_trials=1",
        "tune.asha.grace_period=10",
        "tune.asha.reduction_factor=2",
        "tune.verbose=0",
    ]


# What a finished sweep writes into its output folder.
PUBLISHED = ("results.csv", "results.parquet", "history.parquet", "curves.png", "params.png", "best.json", "best")


def start_sweep(overrides: list, log: str) -> subprocess.Popen:
    """`python launch/tune.py <overrides>` as a user starts it; SIGINT acts as Ctrl-C does (a child of a
    background shell would otherwise inherit SIGINT ignored)."""
    with open(log, "w") as out:
        return subprocess.Popen(
            [sys.executable, str(ROOT / "launch" / "tune.py"), *overrides], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )


def training_trials(sweep_dir: str) -> int:
    """Trials whose training loop has started: rank 0 makes the run's `logs/` just before its first step."""
    return len(glob.glob(os.path.join(sweep_dir, "*", "logs")))


def published(output_dir: str) -> list:
    return [name for name in PUBLISHED if os.path.exists(os.path.join(output_dir, name))]


@pytest.fixture(scope="module")
def sweep_run(prepared_data, tmp_path_factory):
    """The sweep's own process interrupted (SIGINT) once its second trial trains, then the same command
    run again to the end: what each run left and said. The signal goes as the second trial's loop starts,
    ten steps before its first report: at that report ASHA may stop it (a hopeless learning rate), and a
    signal landing after that leaves no trial unfinished, only trials not yet made."""
    from framework.tune.runner import unfinished_trials

    root = str(tmp_path_factory.mktemp("sweeps"))
    overrides = sweep_overrides(prepared_data, root, "lr-grid")
    sweep_dir, output_dir = os.path.join(root, "lr-grid"), os.path.join(root, "lr-grid-results")
    first = start_sweep(overrides, os.path.join(root, "first.log"))
    deadline = time.monotonic() + 900
    while training_trials(sweep_dir) < 2 and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    first.send_signal(signal.SIGINT)
    first_rc = first.wait(timeout=600)
    interrupted = {"rc": first_rc, "published": published(output_dir), "unfinished": unfinished_trials(os.path.join(sweep_dir, "tune"))}
    second = start_sweep(overrides, os.path.join(root, "second.log"))
    second_rc = second.wait(timeout=1800)
    logs = {name: open(os.path.join(root, f"{name}.log")).read() for name in ("first", "second")}
    return {
        "overrides": overrides, "sweep_dir": sweep_dir, "output_dir": output_dir, "interrupted": interrupted,
        "rc": second_rc, "logs": logs,
    }


@pytest.fixture(scope="module")
def finished(sweep_run):
    """The finished sweep's results table and best.json, as it published them."""
    assert sweep_run["rc"] == 0, sweep_run["logs"]["second"][-3000:]
    out = sweep_run["output_dir"]
    with open(os.path.join(out, "best.json")) as f:
        best = json.load(f)
    return pd.read_parquet(os.path.join(out, "results.parquet")), best


@pytest.mark.slow
def test_an_interrupted_sweep_exits_130_and_publishes_nothing(sweep_run):
    interrupted = sweep_run["interrupted"]
    assert interrupted["rc"] == 130, sweep_run["logs"]["first"][-3000:]
    assert interrupted["published"] == []
    # Tune's own ResultGrid calls the trial it was running TERMINATED; its saved state still has it to run.
    assert interrupted["unfinished"]
    # The signal comes once a second trial trains, so at least the first has finished and not all four
    # have; how many more finished before it landed depends on the machine's load.
    said = re.search(r"tune: sweep lr-grid interrupted \((\d) of 4 trials finished\); run the same command to resume it", sweep_run["logs"]["first"])
    assert said and 1 <= int(said[1]) <= 3, sweep_run["logs"]["first"][-3000:]


@pytest.mark.slow
def test_the_same_command_resumes_the_sweep_to_its_end_and_publishes(sweep_run, finished):
    table, _ = finished
    assert "tune: resuming sweep lr-grid" in sweep_run["logs"]["second"]
    assert published(sweep_run["output_dir"]) == list(PUBLISHED)
    assert len(table) == 4 and set(table["status"]) <= {"completed", "stopped"}
    # The trial that was interrupted resumed its own run: one run folder per trial.
    assert sorted(os.path.basename(os.path.dirname(p)) for p in glob.glob(os.path.join(sweep_run["sweep_dir"], "*", "logs"))) == sorted(table["trial"])


@pytest.mark.slow
def test_asha_sweep_stops_a_trailing_trial_early(finished):
    table, _ = finished
    stopped = table[table["stopped_early"]]
    assert (stopped["steps"] < MAX_STEPS).all()
    assert (table[~table["stopped_early"]]["steps"] == MAX_STEPS).all()
    # A trial of the hopeless learning rate that meets a rung after a better trial is stopped there. (Tune
    # saves no scheduler state: after the resume, the first trial to reach a rung passes it.)
    assert 1e-5 in set(stopped["optim.lr"])
    assert (table[table["optim.lr"] == 3e-3]["status"] == "completed").all()


@pytest.mark.slow
def test_every_trial_evaluates_the_same_validation_rows(finished, sweep_run):
    """Trials that differ only in run.micro_batch_size train the same gradients (up to float summation
    order) and, evaluated on the same rows, report the same val_loss; rows chosen by batch layout would not."""
    table, _ = finished

    def val_losses(trial: str) -> dict:
        with open(os.path.join(sweep_run["sweep_dir"], trial, "logs", "metrics.jsonl")) as f:
            records = [json.loads(line) for line in f]
        return {r["step"]: r["val/loss"] for r in records if "val/loss" in r}

    for lr, pair in table.groupby("optim.lr"):
        assert sorted(pair["run.micro_batch_size"]) == [2, 4]
        small, large = (val_losses(t) for t in pair.sort_values("run.micro_batch_size")["trial"])
        shared = sorted(set(small) & set(large))
        assert shared[:1] == [10], (lr, small, large)
        for step in shared:
            assert small[step] == pytest.approx(large[step], rel=1e-6), (lr, step)


@pytest.mark.slow
def test_sweep_writes_the_results_table_and_both_plots(finished, sweep_run):
    table, _ = finished
    out = sweep_run["output_dir"]
    csv = pd.read_csv(os.path.join(out, "results.csv"))
    assert list(csv["trial"]) == list(table["trial"])
    for column in ("optim.lr", "run.micro_batch_size", "overrides", "final_val_loss", "best_val_loss", "steps", "stopped_early", "wall_s"):
        assert column in table.columns
    assert (table["best_val_loss"] <= table["final_val_loss"] + 1e-12).all()
    assert (table["wall_s"] > 0).all()
    history = pd.read_parquet(os.path.join(out, "history.parquet"))
    assert set(history["trial"]) == set(table["trial"])
    for plot in ("curves.png", "params.png"):
        with open(os.path.join(out, plot), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        assert os.path.getsize(os.path.join(out, plot)) > 10_000


@pytest.mark.slow
def test_best_trial_has_the_best_final_metric_in_the_table(finished):
    table, best = finished
    assert set(best) >= {"trial", "metric", "value", "mode", "overrides", "path", "step", "checkpoint"}
    assert best["metric"] == "val_loss" and best["mode"] == "min" and best["step"] == MAX_STEPS
    assert best["value"] == pytest.approx(table["final_val_loss"].min())
    row = table[table["trial"] == best["trial"]].iloc[0]
    assert best["overrides"] == row["overrides"].split() == [f"optim.lr={row['optim.lr']}", f"run.micro_batch_size={row['run.micro_batch_size']}"]
    assert os.path.isabs(best["path"]) and os.path.isfile(os.path.join(best["path"], "config.json"))


@pytest.mark.slow
def test_promoted_model_gives_the_trial_checkpoints_logits(finished, prepared_data):
    """The HF folder, loaded by transformers, matches the weights in the best trial's own DeepSpeed
    checkpoint, and scores best.json's validation loss on the evaluation rows every trial used."""
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoConfig, AutoModelForCausalLM

    from framework.data.sampler import evaluation_rows
    from framework.data.shards import read_manifest
    from framework.data.stream import ShardReader, to_batch
    from framework.train.checkpoint import DEEPSPEED_TAG, HF_CONFIG_DIR

    _, best = finished
    checkpoint = best["checkpoint"]
    own = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(os.path.join(checkpoint, HF_CONFIG_DIR)))
    own.load_state_dict(get_fp32_state_dict_from_zero_checkpoint(checkpoint, tag=DEEPSPEED_TAG), strict=True)
    exported = AutoModelForCausalLM.from_pretrained(best["path"]).eval()
    ids = torch.randint(0, own.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = own.eval()(ids).logits, exported(ids).logits
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()

    manifest = read_manifest(prepared_data)
    rows = evaluation_rows(manifest["splits"]["validation"]["rows"], EVAL_ROWS, manifest["seed"])
    batch = to_batch(ShardReader(prepared_data, manifest, "validation", cache_groups=4).read(rows))
    with torch.no_grad():
        loss = exported(**batch).loss.item()  # whole rows of one length: the mean over every target token
    assert loss == pytest.approx(best["value"], rel=1e-4)


@pytest.mark.slow
def test_a_sweep_ranked_on_an_eval_score_promotes_the_trial_with_the_best_score(finished, sweep_run, prepared_data, tmp_path,
                                                                              ray_session):
    """tune.metric names an eval.json score: the finished sweep (resumed, nothing trained again) exports each trial and
    scores it with the eval stage over every validation row (training measured EVAL_ROWS of them); best.json names the
    trial whose own eval.json has the lowest perplexity, and its export."""
    from framework.data.shards import read_manifest
    from framework.tune.plan import plan_sweep
    from framework.tune.runner import run_sweep

    out = tmp_path / "ranked"
    overrides = sweep_run["overrides"] + ["tune.metric=val/perplexity", "tune.mode=min", f"tune.output_dir={out}",
                                          "tune.eval=['eval.eval_rows=null']"]
    checkpoints = sorted(glob.glob(os.path.join(sweep_run["sweep_dir"], "*", "checkpoint_*")))
    result = run_sweep(plan_sweep(overrides))
    table, _ = finished
    # The finished sweep run again resumes it and trains nothing: the same trials and values, no new checkpoint.
    assert result.resumed and not result.interrupted
    assert list(result.table["trial"]) == list(table["trial"])
    assert list(result.table["final_val_loss"]) == pytest.approx(list(table["final_val_loss"]))
    assert sorted(glob.glob(os.path.join(sweep_run["sweep_dir"], "*", "checkpoint_*"))) == checkpoints
    scores = {}
    for folder in (out / "trials").iterdir():
        score = json.loads((folder / "eval.json").read_text())["scores"]["val/perplexity"]
        scores[folder.name] = score["value"]
        assert score["count"] == read_manifest(prepared_data)["splits"]["validation"]["rows"] != EVAL_ROWS
    assert set(scores) == set(table["trial"])  # every trial finished, every one scored
    best = json.loads((out / "best.json").read_text())
    assert best == result.best and best["ranked_by"] == "eval" and best["metric"] == "val/perplexity"
    assert best["trial"] == min(scores, key=scores.get) and best["value"] == scores[best["trial"]]
    assert best["path"] == str(out / "trials" / best["trial"])


@pytest.mark.slow
def test_resuming_with_a_different_space_is_refused(finished, sweep_run):
    from framework.tune.plan import plan_sweep
    from framework.tune.runner import run_sweep

    changed = [o.replace(LEARNING_RATES, "choice(3e-3,1e-2)") for o in sweep_run["overrides"]]
    with pytest.raises(ConfigError, match="^tune.name=lr-grid: a sweep of this name at .* was started with other settings"):
        run_sweep(plan_sweep(changed))


@pytest.mark.slow
@pytest.mark.parametrize(
    "change, message",
    [
        ('+tune.space.run.global_batch_size="choice(8,100000)"', "tune.space.run.global_batch_size: choice(8,100000) gives 100000: run.global_batch_size=100000: the train split of "),
        (f'+tune.space.run.eval_rows="choice({EVAL_ROWS},100000)"', "tune.space.run.eval_rows: choice(32,100000) gives 100000: run.eval_rows=100000: the validation split of "),
        ("data.seq_len=128", "data.seq_len=128: the shards in "),
    ],
)
def test_a_sweep_that_does_not_fit_the_shards_fails_before_any_trial(prepared_data, tmp_path, change, message):
    from framework.tune.plan import plan_sweep

    with pytest.raises(ConfigError) as error:
        plan_sweep(sweep_overrides(prepared_data, str(tmp_path), "misfit") + [change])  # the last value of a key wins
    assert str(error.value).startswith(message), error.value
    assert not os.path.exists(os.path.join(str(tmp_path), "misfit"))


# ---------------------------------------------------------------------------------------------
# PBT

@pytest.fixture(scope="module")
def pbt_sweep(prepared_data, ray_session, tmp_path_factory):
    """Two 1-worker trials of one learning rate drawn from a log interval; at step 10 (synchronous PBT)
    the worse clones the better one's checkpoint with its learning rate scaled by 0.8 or 1.2."""
    from framework.tune.plan import plan_sweep
    from framework.tune.runner import run_sweep

    root = str(tmp_path_factory.mktemp("pbt"))
    overrides = [
        "model=tiny", "deepspeed=zero1", f"data.output_dir={prepared_data}", "data.seq_len=64", f"data.val_fraction={VAL_FRACTION}",
        "run.num_workers=1", "run.max_steps=20", "run.global_batch_size=8", "run.micro_batch_size=4", "run.log_interval=1",
        "run.eval_interval=10", "run.checkpoint_interval=10", f"run.eval_rows={EVAL_ROWS}", "run.max_failures=0", "optim.warmup_steps=2",
        "tune=pbt", "~tune/space", '+tune.space.optim.lr="tag(log, interval(1e-4, 1e-1))"', "tune.num_samples=2",
        "tune.max_concurrent_trials=2", "tune.pbt.quantile_fraction=0.5", "tune.pbt.resample_probability=0", "tune.pbt.synch=true",
        "tune.name=pbt", f"tune.storage_path={root}", f"tune.output_dir={root}/pbt-results", "tune.promote=false", "tune.verbose=0",
    ]
    return run_sweep(plan_sweep(overrides)), os.path.join(root, "pbt")


@pytest.mark.slow
def test_a_pbt_clone_trains_with_its_own_learning_rate_from_its_first_step(pbt_sweep):
    """The clone's new run resumes the donor's step-10 checkpoint, which carries the donor's optimizer
    state and LR; the LR its first step leaves (train/lr at step 11) is its own config's schedule."""
    from framework.train.checkpoint import latest_checkpoint, read_config
    from framework.train.optim import scheduled_lr

    result, sweep_dir = pbt_sweep
    assert not result.interrupted and set(result.table["status"]) == {"completed"}
    optim = {os.path.basename(d): read_config(latest_checkpoint(d)).optim for d in glob.glob(os.path.join(sweep_dir, "*")) if os.path.isdir(d) and latest_checkpoint(d)}
    trials = sorted(result.table["trial"])
    clones = [t for t in trials if f"{t}.1" in optim and optim[f"{t}.1"].lr != optim[t].lr]
    assert len(clones) == 1, {run: o.lr for run, o in optim.items()}
    clone = clones[0]
    [donor] = [t for t in trials if t != clone]
    with open(os.path.join(sweep_dir, f"{clone}.1", "logs", "metrics.jsonl")) as f:
        first = json.loads(f.readline())
    assert first["step"] == 11
    own, donors = optim[f"{clone}.1"], optim[donor]
    assert own.lr / donors.lr == pytest.approx(0.8) or own.lr / donors.lr == pytest.approx(1.2)
    assert first["train/lr"] == pytest.approx(scheduled_lr(own, 20, 11))
    assert first["train/lr"] != pytest.approx(scheduled_lr(donors, 20, 11))


# ---------------------------------------------------------------------------------------------
# Without Ray: Hydra's grammar, the checks, the presets, the docs' commands, the results table

def test_hydra_grammar_maps_to_tune_domains():
    from ray.tune.search.sample import Categorical, Float, Integer, LogUniform

    from framework.tune.space import parse_param

    lr = parse_param("optim.lr", "tag(log, interval(3e-4, 1e-2))").domain()
    assert isinstance(lr, Float) and isinstance(lr.get_sampler(), LogUniform) and (lr.lower, lr.upper) == (3e-4, 1e-2)
    wd = parse_param("optim.weight_decay", "interval(0, 1)")
    assert wd.values == (0.0, 1.0) and isinstance(wd.domain(), Float) and not wd.integer
    # int(interval(a, b)) includes b, as Hydra's interval does; Tune's randint leaves its upper bound out.
    steps = parse_param("optim.warmup_steps", "int(interval(2, 20))")
    assert steps.corners() == [2, 20] and isinstance(steps.domain(), Integer) and (steps.domain().lower, steps.domain().upper) == (2, 21)
    assert isinstance(parse_param("run.micro_batch_size", "tag(log, int(interval(1, 8)))").domain().get_sampler(), LogUniform)
    assert parse_param("optim.warmup_steps", "range(0, 20, 5)").values == (0, 5, 10, 15)
    choice = parse_param("deepspeed", "choice(zero1, zero2)")
    assert isinstance(choice.domain(), Categorical) and choice.domain(grid=True) == {"grid_search": ["zero1", "zero2"]}
    pinned = parse_param("optim.beta1", 0.9)
    assert not pinned.sampled and pinned.domain() == 0.9 and pinned.override(0.9) == "optim.beta1=0.9"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (['+tune.space.optim.lrr="tag(log, interval(1e-4,3e-3))"'], "tune.space.optim.lrr: tag(log, interval(1e-4,3e-3)) gives 0.0001: not a key of the training config"),
        (['+tune.space.optim.lr="loguniform(1e-4,3e-3)"'], "tune.space.optim.lr=loguniform(1e-4,3e-3): HydraException while evaluating 'loguniform(1e-4,3e-3)': Unknown function 'loguniform'"),
        (['+tune.space.optim.lr="tag(log, interval(0,3e-3))"'], "tune.space.optim.lr=tag(log, interval(0,3e-3)): a log-scale interval needs start > 0"),
        (['+tune.space.optim.lr="interval(3e-3,1e-4)"'], "tune.space.optim.lr=interval(3e-3,1e-4): expected start < end"),
        (['+tune.space.optim.lr="tag(lg, interval(1e-4,3e-3))"'], "tune.space.optim.lr=tag(lg, interval(1e-4,3e-3)): unknown tag lg"),
        (['+tune.space.run.micro_batch_size="range(5,1)"'], "tune.space.run.micro_batch_size=range(5,1): the range holds no values"),
        (["tune.metric=eval/my_task/acc", "tune.mode=max", "tune.promote=false"],
         "tune.promote=False: tune.metric=eval/my_task/acc ranks trials by evaluating their exports: expected tune.promote=true"),
        (["tune.eval=['eval.limit=10']"], "tune.eval=['eval.limit=10']: scores trials on an eval score; tune.metric=val_loss is not one"),
        (['+tune.space.run.micro_batch_size="choice(3,4)"'], "tune.space.run.micro_batch_size: choice(3,4) gives 3: run.global_batch_size=16"),
        (['+tune.space.optim.warmup_steps="int(interval(2,300))"'], "tune.space.optim.warmup_steps: int(interval(2,300)) gives 300: optim.warmup_steps=300"),
        (['+tune.space.deepspeed="choice(zero1,zero9)"'], "tune.space.deepspeed: choice(zero1,zero9) gives zero9: 'zero9' is not an option"),
        # A config group's option is composed for real: hf-local needs model.pretrained_path.
        (['+tune.space.model="choice(tiny,hf-local)"'], "tune.space.model: choice(tiny,hf-local) gives hf-local: model.pretrained_path"),
        (['+tune.space.data.seq_len="choice(64,128)"'], "tune.space.data.seq_len: set by the sweep itself"),
        (['+tune.space.run.name="choice(a,b)"'], "tune.space.run.name: set by the sweep itself"),
        (["tune.metric=accuracy"], "tune.metric=accuracy: expected a metric the training loop reports"),
        (["tune.asha.grace_period=300"], "tune.asha.grace_period=300: expected fewer steps than run.max_steps=300"),
        (["tune=grid", '+tune.space.optim.eps="interval(1e-8,1e-6)"'], "tune.space.optim.eps=interval(1e-8,1e-6): grid search takes lists of values"),
        (["tune=pbt", '+tune.space.run.micro_batch_size="choice(2,4)"'], "tune.space.run.micro_batch_size=choice(2,4): PBT cannot explore it"),
        (["tune=pbt", '+tune.space.deepspeed="choice(zero1,zero2)"'], "tune.space.deepspeed=choice(zero1,zero2): PBT cannot explore it"),
        (["tune=pbt", "tune.pbt.perturbation_interval=30"], "tune.pbt.perturbation_interval=30: expected a multiple of run.checkpoint_interval=100"),
    ],
)
def test_sweep_checks_name_the_bad_key_in_one_line(overrides, message):
    from framework.tune.plan import load_sweep

    with pytest.raises(ConfigError) as error:
        load_sweep(overrides)
    assert str(error.value).startswith(message), error.value
    assert "\n" not in str(error.value)


def test_a_sweep_may_explore_under_pbt_what_the_loop_applies_over_a_checkpoint():
    """Since the loop applies optim.* after loading (apply_optim_settings), PBT may explore weight decay, betas and eps too."""
    from framework.tune.plan import load_sweep

    sweep = load_sweep(["tune=pbt", '+tune.space.optim.beta2="interval(0.9,0.999)"', '+tune.space.optim.eps="tag(log, interval(1e-9,1e-6))"'])
    assert {"optim.weight_decay", "optim.beta2", "optim.eps"} <= set(sweep.params)


@pytest.mark.slow
def test_a_bad_search_space_fails_before_any_trial_with_one_line(tmp_path):
    ray_tmp = tmp_path / "ray"
    ray_tmp.mkdir()
    proc = launch("tune.py", '+tune.space.optim.lrr="tag(log, interval(1e-4,3e-3))"', env={"RAY_TMPDIR": str(ray_tmp)}, timeout=300)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("ConfigError: tune.space.optim.lrr: ") and "not a key" in lines[0]
    assert list(ray_tmp.iterdir()) == [], "a Ray session was started for an invalid sweep"


def test_launch_tune_composes_config_yaml_with_the_asha_preset_unless_one_is_picked():
    import importlib.util

    from framework.submit import jobs

    spec = importlib.util.spec_from_file_location("launch_tune", ROOT / "launch" / "tune.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (module.main.job.config_name, module.main.job.default_groups) == ("config", ("tune=asha",))
    assert jobs.compose_job("tune", ["experiment=smoke"]).tune.scheduler == "asha"
    assert jobs.compose_job("tune", ["tune=pbt", "experiment=smoke"]).tune.scheduler == "pbt"


PRESETS = sorted(p.stem for p in (CONF_DIR / "tune").glob("*.yaml"))


@pytest.mark.parametrize("preset", PRESETS)
def test_every_tune_preset_passes_its_checks_and_builds_its_search_and_scheduler(preset):
    """Alone (the defaults: 300 steps, checkpoints every 100) and with experiment=smoke (40 steps, every 20)."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining
    from ray.tune.search import BasicVariantGenerator
    from ray.tune.search.optuna import OptunaSearch

    from framework.tune.plan import load_sweep
    from framework.tune.algorithms import SCHEDULERS, SEARCHES
    from framework.tune.runner import param_space

    schedulers = {"asha": ASHAScheduler, "pbt": PopulationBasedTraining, "fifo": FIFOScheduler}
    searches = {"random": BasicVariantGenerator, "grid": BasicVariantGenerator, "optuna": OptunaSearch}
    for extra in ([], ["experiment=smoke"]):
        sweep = load_sweep([f"tune={preset}", *extra])
        assert isinstance(SCHEDULERS.get(sweep.tune.scheduler).build(sweep), schedulers[sweep.tune.scheduler])
        search = SEARCHES.get(sweep.tune.search).build(sweep)
        assert isinstance(getattr(search, "searcher", search), searches[sweep.tune.search])
        assert set(param_space(sweep)) == set(sweep.params) and sweep.params
        if sweep.tune.scheduler == "pbt":
            assert sweep.tune.pbt.perturbation_interval == sweep.base.run.checkpoint_interval == (20 if extra else 100)


def test_grid_search_enumerates_choice_values_and_composes_each_config_group_option_once():
    from ray.tune.search.variant_generator import generate_variants

    from framework.tune.plan import load_sweep
    from framework.tune.runner import param_space

    # conf/tune/space/grid.yaml: 3 learning rates × 2 ZeRO stages; choice(2, 4) doubles it, num_samples repeats it.
    sweep = load_sweep(["tune=grid", '+tune.space.run.micro_batch_size="choice(2,4)"', "tune.num_samples=2"])
    variants = {tuple(spec[k] for k in sweep.params) for _, spec in generate_variants(param_space(sweep))}
    assert len(variants) == 3 * 2 * 2
    assert {v[list(sweep.params).index("run.micro_batch_size")] for v in variants} == {2, 4}
    assert sweep.trial_count == 2 * len(variants)
    assert {c.deepspeed.stage for c in sweep.bases.values()} == {1, 2}
    config = sweep.trial_config({"optim.lr": 1e-2, "deepspeed": "zero1", "run.micro_batch_size": 2}, "t1")
    assert (config.deepspeed.stage, config.optim.lr, config.run.micro_batch_size, config.run.name) == (1, 1e-2, 2, "grid-tiny/t1")


def test_trials_are_sized_by_size_workers_three_workers_fit_two_cpus():
    """One helper sizes every run's workers (framework.train.plan.size_workers): 3 × 0.6666 CPU fit 2 CPUs."""
    from framework.tune.plan import load_sweep
    from framework.tune.runner import check_fits

    node = [{"CPU": 2.0, "GPU": 0.0, "name": "node"}]
    check_fits(load_sweep(["run.num_workers=3", "run.global_batch_size=24", "~tune/space", '+tune.space.optim.lr="choice(1e-3,3e-3)"']), node)
    fixed = load_sweep(["run.num_workers=1", "run.cpus_per_worker=1", "tune.max_concurrent_trials=2", "~tune/space", '+tune.space.run.num_workers="choice(1,2)"'])
    with pytest.raises(ConfigError, match=r"^tune.space.run.num_workers: choice\(1,2\) gives 2: tune.max_concurrent_trials=2: 2 trials × 2 workers × 1 CPUs do not fit"):
        check_fits(fixed, node)


def test_pbt_keeps_explored_values_inside_the_space():
    """PBT scales a value by 0.8 or 1.2 past its interval's end; a ratio above 1 would fail the trial."""
    from framework.tune.pbt import KeepInRanges
    from framework.tune.plan import load_sweep

    sweep = load_sweep(["tune=pbt", '+tune.space.optim.min_lr_ratio="interval(0.5,0.95)"', '+tune.space.optim.warmup_steps="int(interval(2,20))"'])
    keep = KeepInRanges(sweep.params)
    explored = {"optim.lr": 1.2e-2, "optim.grad_clip": 0.08, "optim.min_lr_ratio": 1.14, "optim.warmup_steps": 23, "optim.weight_decay": 0.1}
    assert keep(explored) == {"optim.lr": 1e-2, "optim.grad_clip": 0.1, "optim.min_lr_ratio": 0.95, "optim.warmup_steps": 20, "optim.weight_decay": 0.1}
    assert keep({"optim.lr": 5e-3, "optim.warmup_steps": 7}) == {"optim.lr": 5e-3, "optim.warmup_steps": 7}


def tuning_docs_commands() -> list:
    """The arguments of every `python launch/tune.py` command in docs/tuning.md's first code block."""
    block = (ROOT / "docs" / "tuning.md").read_text().split("```bash", 1)[1].split("```", 1)[0]
    commands = [shlex.split(line, comments=True) for line in block.replace("\\\n", " ").splitlines()]
    return [c[2:] for c in commands if c[:2] == ["python", "launch/tune.py"]]


def test_the_tuning_docs_commands_compose_and_their_errors_are_what_the_checks_say():
    from framework.tune.plan import load_sweep

    text = (ROOT / "docs" / "tuning.md").read_text()
    commands = tuning_docs_commands()
    commands += [ast.literal_eval(args) for args in re.findall(r"plan_sweep\((\[.*?\])\)", text)]
    assert len(commands) >= 6
    names = [load_sweep(args).tune.name for args in commands]
    assert len(set(names)) == len(names), f"two commands run the same sweep (tune.name): {names}"
    shown = re.findall(r"^\$ python launch/tune.py (.*)\nConfigError: (.*)$", text, flags=re.M)
    assert len(shown) >= 3
    for args, message in shown:
        with pytest.raises(ConfigError) as error:
            load_sweep(shlex.split(args))
        assert str(error.value) == message


def test_results_table_tells_unfinished_trials_from_stopped_ones_and_plots_mark_the_promoted_trial():
    from framework.tune.plan import load_sweep
    from framework.tune.results import TrialOutcome, best_trial, results_table

    sweep = load_sweep(["tune=grid", "~tune/space", '+tune.space.optim.lr="choice(1e-3,3e-3,1e-2,3e-2)"', "run.max_steps=30"])

    def history(losses, checkpointed):
        steps = [10 * (i + 1) for i in range(len(losses))]
        return pd.DataFrame({"step": steps, "val_loss": losses, "checkpoint_path": [f"/c/{s}" if s in checkpointed else None for s in steps]})

    trials = [
        TrialOutcome("done", {"optim.lr": 1e-3}, history([3.0, 2.5, 2.2], {10, 20, 30}), None),
        # The best final metric, but its last report (step 20) came without a checkpoint: not promotable.
        TrialOutcome("cut", {"optim.lr": 3e-3}, history([3.0, 2.0], {10}), None),
        TrialOutcome("running", {"optim.lr": 1e-2}, history([2.9, 2.1], {10, 20}), None, finished=False),
        TrialOutcome("failed", {"optim.lr": 3e-2}, history([9.0], {10}), "RuntimeError: loss is nan"),
    ]
    table = results_table(trials, sweep)
    status = dict(zip(table["trial"], table["status"]))
    assert status == {"done": "completed", "cut": "stopped", "running": "unfinished", "failed": "error"}
    assert list(table[table["stopped_early"]]["trial"]) == ["cut"]
    assert table["trial"].iloc[0] == "cut"
    assert best_trial(table, "val_loss") == "done"
    assert table.set_index("trial").loc["done", "overrides"] == "optim.lr=0.001"
