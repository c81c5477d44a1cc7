"""Sweeps: a 4-trial ASHA sweep of the tiny model end to end, its results, promotion, resuming, an
interrupted driver, what a PBT clone trains with, and the checks that fail a sweep before any trial."""

from __future__ import annotations

import ast
import glob
import json
import multiprocessing
import os
import re
import shlex
import signal
import threading
import time
from concurrent.futures import ProcessPoolExecutor

import pandas as pd
import pytest

from conftest import ROOT, launch
from framework.config import CONF_DIR, ConfigError

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


# What a finished sweep writes into its output folder.
PUBLISHED = ("results.csv", "results.parquet", "history.parquet", "curves.png", "params.png", "best.json", "best")


def interrupt_when(ready, timeout_s: float = 300) -> None:
    """Send this process one SIGINT, as Ctrl-C does, as soon as `ready()` holds (from a watcher thread)."""

    def watch() -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if ready():
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(0.2)

    threading.Thread(target=watch, name="interrupt", daemon=True).start()


@pytest.fixture(scope="module")
def interrupted_sweep(prepared_data, ray_session, tmp_path_factory):
    """The sweep, its driver interrupted once the second trial trains (the first has finished): run()'s
    result, what it wrote into the output folder, and the trials Tune's saved state leaves for a resume."""
    from framework.tune.runner import run, unfinished_trials
    from framework.tune.sweep import load_sweep

    root = str(tmp_path_factory.mktemp("sweeps"))
    overrides = sweep_overrides(prepared_data, root, "lr-grid")
    sweep_dir = os.path.join(root, "lr-grid")
    # Once a trial's training loop writes its logs, its workers' placement group is known to the
    # sweep's janitor, which gives it back when Tune stops the trial.
    interrupt_when(lambda: len(glob.glob(os.path.join(sweep_dir, "*", "logs"))) >= 2)
    result = run(load_sweep(overrides))
    published = [name for name in PUBLISHED if os.path.exists(os.path.join(result.output_dir, name))]
    return overrides, result, published, unfinished_trials(os.path.join(sweep_dir, "tune"))


@pytest.fixture(scope="module")
def sweep_run(interrupted_sweep):
    """The interrupted sweep resumed to its end by running the same command again."""
    from framework.tune.runner import run
    from framework.tune.sweep import load_sweep

    overrides = interrupted_sweep[0]
    sweep = load_sweep(overrides)
    return overrides, sweep, run(sweep)


def test_an_interrupted_sweep_is_not_published_as_finished(interrupted_sweep):
    """Ctrl-C makes Tuner.fit return normally; the sweep must say so, and write and promote nothing."""
    _, result, published, unfinished = interrupted_sweep
    table = result.table
    assert result.interrupted and result.best is None
    assert published == []
    # The first trial ran to the end (ASHA has no other trial to compare it with); the rest are to resume.
    assert list(table[table["status"] != "unfinished"]["status"]) == ["completed"]
    assert (table[table["status"] == "unfinished"]["steps"] < MAX_STEPS).all() and not table["stopped_early"].any()
    # What a resume runs again, though Tune's own ResultGrid calls the trial it was running TERMINATED.
    assert sorted(unfinished) == sorted(table[table["status"] == "unfinished"]["trial"]) and unfinished


def test_asha_sweep_stops_a_trailing_trial_early(sweep_run):
    _, _, result = sweep_run
    assert result.resumed and not result.interrupted  # it finished after the interrupt, resumed
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


def test_promoted_model_gives_the_trial_checkpoints_logits(sweep_run, prepared_data):
    """The HF folder, loaded by transformers, matches the weights in the best trial's own DeepSpeed
    checkpoint, and scores best.json's validation loss on the evaluation set the trial was measured on."""
    import pyarrow.parquet as pq
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoConfig, AutoModelForCausalLM

    from framework.data.shards import COLUMN, read_manifest, shard_uris
    from framework.train.checkpoint import DEEPSPEED_TAG, HF_CONFIG_DIR

    _, sweep, result = sweep_run
    best = result.best
    checkpoint = result.table.set_index("trial").loc[best["trial"], "checkpoint"]
    own = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(os.path.join(checkpoint, HF_CONFIG_DIR)))
    own.load_state_dict(get_fp32_state_dict_from_zero_checkpoint(checkpoint, tag=DEEPSPEED_TAG), strict=True)
    exported = AutoModelForCausalLM.from_pretrained(best["path"]).eval()
    ids = torch.randint(0, own.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = own.eval()(ids).logits, exported(ids).logits
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()

    # The loop evaluates the first eval_batches × micro_batch_size × num_workers validation rows, all of one length.
    run = sweep.job.run
    rows = run.eval_batches * run.micro_batch_size * run.num_workers
    validation = [pq.read_table(uri).column(COLUMN).to_pylist() for uri in shard_uris(prepared_data, read_manifest(prepared_data), "validation")]
    batch = torch.tensor([row for shard in validation for row in shard][:rows])
    with torch.no_grad():
        loss = exported(input_ids=batch, labels=batch).loss.item()
    assert loss == pytest.approx(best["value"], rel=1e-4)


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


@pytest.mark.parametrize(
    "change, message",
    [
        ('+tune.space.run.global_batch_size="choice(8,100000)"', "tune.space.run.global_batch_size: choice(8,100000) gives 100000: run.global_batch_size=100000: the train split has only"),
        ("data.seq_len=128", "data.seq_len=128: the shards in"),
    ],
)
def test_a_sweep_that_does_not_fit_the_shards_fails_before_any_trial(prepared_data, tmp_path, change, message):
    from framework.tune.runner import run
    from framework.tune.sweep import load_sweep

    sweep = load_sweep(sweep_overrides(prepared_data, str(tmp_path), "misfit") + [change])  # the last value of a key wins
    with pytest.raises(ConfigError) as error:
        run(sweep)
    assert str(error.value).startswith(message), error.value
    assert not os.path.exists(os.path.join(str(tmp_path), "misfit"))


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
    "overrides, message",
    [
        (['+tune.space.optim.lr="lognormal(1e-4,3e-3)"'], "tune.space.optim.lr=lognormal(1e-4,3e-3): unknown distribution"),
        (['+tune.space.optim.lr="loguniform(0,3e-3)"'], "tune.space.optim.lr=loguniform(0,3e-3): a log-scale range needs low > 0"),
        (['+tune.space.run.micro_batch_size="choice(3,4)"'], "tune.space.run.micro_batch_size: choice(3,4) gives 3: run.global_batch_size=16"),
        (['+tune.space.deepspeed="choice(zero1,zero9)"'], "tune.space.deepspeed: choice(zero1,zero9) gives zero9: 'zero9' is not an option"),
        # A config group's option is composed for real: hf-local needs model.pretrained_path.
        (['+tune.space.model="choice(tiny,hf-local)"'], "tune.space.model: choice(tiny,hf-local) gives hf-local: model.pretrained_path=None: expected a local"),
        (['+tune.space.data.seq_len="choice(64,128)"'], "tune.space.data.seq_len: set by the sweep itself"),
        (["tune.metric=accuracy"], "tune.metric=accuracy: expected a metric the training loop reports"),
        (["tune.asha.grace_period=300"], "tune.asha.grace_period=300: expected fewer steps than run.max_steps=300"),
        # A PBT clone resumes the donor's optimizer settings (weight_decay) and must match its ZeRO layout.
        (["tune=pbt", '+tune.space.optim.weight_decay="uniform(0.0,0.2)"'], "tune.space.optim.weight_decay=uniform(0.0,0.2): PBT cannot explore it"),
        (["tune=pbt", '+tune.space.deepspeed="choice(zero1,zero2)"'], "tune.space.deepspeed=choice(zero1,zero2): PBT cannot explore it"),
        (["tune=pbt", "tune.pbt.perturbation_interval=30"], "tune.pbt.perturbation_interval=30: expected a multiple of run.checkpoint_interval=100"),
    ],
)
def test_sweep_checks_name_the_bad_key(overrides, message):
    from framework.tune.sweep import load_sweep

    with pytest.raises(ConfigError) as error:
        load_sweep(overrides)
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


# ---------------------------------------------------------------------------------------------
# Without Ray: presets, the space, the docs' commands, the results table, a PBT clone's optimizer

PRESETS = sorted(p.stem for p in (CONF_DIR / "tune").glob("*.yaml"))


@pytest.mark.parametrize("preset", PRESETS)
def test_every_tune_preset_passes_its_checks_and_builds_its_search_and_scheduler(preset):
    """Alone (the defaults: 300 steps, checkpoints every 100) and with experiment=smoke (40 steps, every 20)."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining
    from ray.tune.search import BasicVariantGenerator
    from ray.tune.search.optuna import OptunaSearch

    from framework.tune.runner import scheduler, search_algorithm
    from framework.tune.sweep import load_sweep

    schedulers = {"asha": ASHAScheduler, "pbt": PopulationBasedTraining, "fifo": FIFOScheduler}
    searches = {"random": BasicVariantGenerator, "grid": BasicVariantGenerator, "optuna": OptunaSearch}
    for extra in ([], ["experiment=smoke"]):
        sweep = load_sweep([f"tune={preset}", *extra])
        assert isinstance(scheduler(sweep), schedulers[sweep.config.scheduler])
        search = search_algorithm(sweep)
        assert isinstance(getattr(search, "searcher", search), searches[sweep.config.search])
        if sweep.config.scheduler == "pbt":
            assert sweep.config.pbt.perturbation_interval == sweep.job.run.checkpoint_interval == (20 if extra else 100)


def test_grid_search_tries_every_choice_value_as_it_does_grid_values():
    from ray.tune.search.variant_generator import generate_variants

    from framework.tune.runner import param_space
    from framework.tune.sweep import load_sweep

    # conf/tune/space/grid.yaml: 3 learning rates × 2 ZeRO stages; choice(2, 4) doubles it, num_samples repeats it.
    sweep = load_sweep(["tune=grid", '+tune.space.run.micro_batch_size="choice(2,4)"', "tune.num_samples=2"])
    variants = {tuple(spec[k] for k in sweep.params) for _, spec in generate_variants(param_space(sweep))}
    assert len(variants) == 3 * 2 * 2
    assert {v[list(sweep.params).index("run.micro_batch_size")] for v in variants} == {2, 4}
    assert sweep.trial_count == 2 * len(variants)


def test_pbt_keeps_explored_values_inside_the_space():
    """PBT scales a value by 0.8 or 1.2 past its range's end; a ratio above 1 would fail the trial."""
    from framework.tune.runner import KeepInRanges
    from framework.tune.sweep import load_sweep

    sweep = load_sweep(["tune=pbt", '+tune.space.optim.min_lr_ratio="uniform(0.5,0.95)"', '+tune.space.optim.warmup_steps="randint(2,20)"'])
    explored = {"optim.lr": 1.2e-2, "optim.grad_clip": 0.08, "optim.min_lr_ratio": 1.14, "optim.warmup_steps": 23}
    assert KeepInRanges(sweep)(explored) == {"optim.lr": 1e-2, "optim.grad_clip": 0.1, "optim.min_lr_ratio": 0.95, "optim.warmup_steps": 19}
    assert KeepInRanges(sweep)({"optim.lr": 5e-3, "optim.warmup_steps": 7})["optim.lr"] == 5e-3


def tuning_docs_commands() -> list:
    """The arguments of every `python launch/tune.py` command in docs/tuning.md's first code block."""
    block = (ROOT / "docs" / "tuning.md").read_text().split("```bash", 1)[1].split("```", 1)[0]
    commands = [shlex.split(line, comments=True) for line in block.replace("\\\n", " ").splitlines()]
    return [c[2:] for c in commands if c[:2] == ["python", "launch/tune.py"]]


def test_the_tuning_docs_commands_compose_and_their_errors_are_what_the_checks_say():
    from framework.tune.sweep import load_sweep

    text = (ROOT / "docs" / "tuning.md").read_text()
    commands = tuning_docs_commands()
    commands += [ast.literal_eval(args) for args in re.findall(r"load_sweep\((\[.*?\])\)", text)]
    assert len(commands) >= 6
    names = [load_sweep(args).config.name for args in commands]
    assert len(set(names)) == len(names), f"two commands run the same sweep (tune.name): {names}"
    shown = re.findall(r"^\$ python launch/tune.py (.*)\nConfigError: (.*)$", text, flags=re.M)
    assert len(shown) >= 2
    for args, message in shown:
        with pytest.raises(ConfigError) as error:
            load_sweep(shlex.split(args))
        assert str(error.value) == message


def test_results_table_tells_unfinished_trials_from_stopped_ones_and_plots_mark_the_promoted_trial():
    from framework.tune.results import TrialOutcome, best_trial, results_table
    from framework.tune.sweep import load_sweep

    sweep = load_sweep(["tune=grid", "~tune/space", '+tune.space.optim.lr="grid(1e-3,3e-3,1e-2,3e-2)"', "run.max_steps=30"])

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
    table = results_table(trials, sweep, "/c")
    status = dict(zip(table["trial"], table["status"]))
    assert status == {"done": "completed", "cut": "stopped", "running": "unfinished", "failed": "error"}
    assert list(table[table["stopped_early"]]["trial"]) == ["cut"]
    assert table["trial"].iloc[0] == "cut"
    assert best_trial(table, sweep) == "done"


def clone_optimizer_after_exploiting(donor, clone) -> dict:
    """In a fresh process: a donor DeepSpeed engine (the training loop's optimizer, schedule and DeepSpeed
    config) trains 5 steps and checkpoints; a clone built from another config retargets and loads it."""
    import dataclasses
    import socket
    import tempfile

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    import deepspeed
    import torch
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    from framework.train.checkpoint import DEEPSPEED_TAG, TRAIN_STATE, TrainState
    from framework.train.loop import build_optimizer, deepspeed_config
    from framework.tune.trial import retarget_checkpoint, scheduled_lr

    deepspeed.init_distributed(dist_backend="gloo")

    def engine(job):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 1))
        optimizer = build_optimizer(model, job, fused=False)
        schedule = get_cosine_with_min_lr_schedule_with_warmup(optimizer, job.optim.warmup_steps, job.run.max_steps, min_lr_rate=job.optim.min_lr_ratio)
        return deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule, config=deepspeed_config(job, 1, False))[0]

    def step(engine):
        lr = engine.optimizer.param_groups[0]["lr"]
        engine.backward(engine(torch.randn(4, 8)).pow(2).mean())
        engine.step()
        return lr

    trained = engine(donor)
    for _ in range(5):
        step(trained)
    directory = tempfile.mkdtemp()
    trained.save_checkpoint(directory, tag=DEEPSPEED_TAG)
    with open(os.path.join(directory, TRAIN_STATE), "w") as f:
        json.dump(dataclasses.asdict(TrainState(step=5)), f)
    retarget_checkpoint(directory, clone)
    cloned = engine(clone)
    cloned.load_checkpoint(directory, tag=DEEPSPEED_TAG)
    return {
        "lrs": [step(cloned) for _ in range(3)],
        "scheduled": [scheduled_lr(clone, k) for k in (5, 6, 7)],
        "clip": cloned.optimizer.clip_grad,
        "weight_decay": cloned.optimizer.param_groups[0]["weight_decay"],
    }


def test_a_pbt_clone_trains_with_its_own_explored_values():
    """ZeRO-1 restores the donor's clipping norm and LRs from the checkpoint unless retargeted; the
    schedule's warm-up and minimum ratio are the clone's own. weight_decay stays the donor's, which is
    why PBT may not explore it."""
    from framework.config import load_job_config

    common = ["deepspeed=zero1", "run.num_workers=1", "run.global_batch_size=4", "run.micro_batch_size=4", "run.max_steps=20"]
    donor = load_job_config(common + ["optim.lr=1e-3", "optim.warmup_steps=2", "optim.min_lr_ratio=0.1", "optim.grad_clip=1.0", "optim.weight_decay=0.1"])
    clone = load_job_config(common + ["optim.lr=5e-3", "optim.warmup_steps=10", "optim.min_lr_ratio=0.5", "optim.grad_clip=0.25", "optim.weight_decay=0.0"])
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        seen = pool.submit(clone_optimizer_after_exploiting, donor, clone).result(timeout=300)
    assert seen["lrs"] == pytest.approx(seen["scheduled"])  # 5e-3 × the clone's warm-up (10 steps) from step 5 on
    assert seen["lrs"][0] == pytest.approx(2.5e-3)
    assert seen["clip"] == 0.25
    assert seen["weight_decay"] == 0.1
