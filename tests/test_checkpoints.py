"""Checkpoints a user can trust: the lifecycle on a real S3-protocol server (a killed worker and an interrupted driver
resumed on the uninterrupted run's curve), resume that honours changed optimizer
settings, complete-or-ignored checkpoints, an export that checks what it reads, nothing unpickled, timeouts."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import (
    ROOT, SMALL_CORPUS, VAL_FRACTION, Interruptible, another_ray_instance, copy_run_until, launch,
    run_overrides, train_bare,
)
from framework.config import ConfigError
from framework.train.config import TRAIN

pytestmark = pytest.mark.slow
BUCKET = "lab"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A real S3-protocol HTTP server on loopback (moto) with one bucket; its endpoint and credentials as
    environment variables, which pyarrow's S3 client (in every process of ours and Ray's) reads."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ACCESS_KEY_ID": "lifecycle-key",
        "AWS_SECRET_ACCESS_KEY": f"lifecycle-secret-{secrets.token_hex(8)}",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
    }
    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                 aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1").create_bucket(Bucket=BUCKET)
    yield env
    server.stop()


def _bucket(env):
    import pyarrow.fs as pafs

    return pafs.S3FileSystem(access_key=env["AWS_ACCESS_KEY_ID"], secret_key=env["AWS_SECRET_ACCESS_KEY"],
                             endpoint_override=env["AWS_ENDPOINT_URL"], region="us-east-1")


def _read(env, path: str) -> str:
    with _bucket(env).open_input_stream(f"{BUCKET}/{path}") as f:
        return f.read().decode()


@pytest.fixture(scope="module")
def s3_data(s3):
    """The small corpus prepared into the bucket by launch/prep.py; (URI, prep's output)."""
    data = f"s3://{BUCKET}/data/small"
    prep = subprocess.run(
        [sys.executable, str(ROOT / "launch" / "prep.py"), f"data.sources.0.path='{SMALL_CORPUS}'", "data.tokenizer.vocab_size=1024",
         "data.seq_len=64", "data.files_per_task=8", f"data.val_fraction={VAL_FRACTION}", f"data.output_dir={data}"],
        cwd=ROOT, env={**os.environ, **s3}, capture_output=True, text=True, timeout=600,
    )
    assert prep.returncode == 0, prep.stderr[-3000:]
    return data, prep


def _past_first_checkpoint(s3, output) -> bool:
    """Whether Ray Train has registered the run's step-10 checkpoint, it is complete in the bucket, and training has
    gone past it."""
    import pyarrow.fs as pafs

    fs = _bucket(s3)
    if fs.get_file_info(f"{BUCKET}/runs/s3-run/checkpoint_00000010/COMPLETE").type != pafs.FileType.File:
        return False
    snapshot = f"{BUCKET}/runs/s3-run/checkpoint_manager_snapshot.json"
    registered = fs.get_file_info(snapshot).type == pafs.FileType.File and "checkpoint_00000010" in _read(s3, snapshot[len(BUCKET) + 1:])
    return registered and any(re.search(r"step 1[3-9]/20", line) for line in list(output))


def _trained_on_after_resuming(output) -> bool:
    """Whether the run's output shows a resume from step 10 followed by a progress line past step 10."""
    lines = list(output)
    resumed = next((i for i, line in enumerate(lines) if "resumed from" in line and "at step 10" in line), None)
    return resumed is not None and any(re.search(r"step 1[1-9]/20", line) for line in lines[resumed:])


def test_the_lifecycle_on_object_storage(s3, s3_data, tmp_path, trained_runs, ray_session):
    """prep → train (checkpoint, a worker killed, interrupted, resumed) → metrics and TensorBoard events in the bucket →
    export from the bucket. The credentials come from the environment alone. (Serving an exported folder is
    test_serve.py's: the folder export writes from a bucket's checkpoint is the one it writes from a local one.)

    One run, two failures past its step-10 checkpoint: a Train worker killed is restarted from the checkpoint by Ray
    Train (run.max_failures=1) and trains on; the driver, then interrupted like a Ctrl-C, is started again with the same
    command and resumes from it, beside a second Ray instance on the host. The run ends on the loss curve and the weights of the same run never interrupted
    (the session's ZeRO-2 run on local storage: the bucket's shards are the same corpus prepared the same way)."""
    import pyarrow.fs as pafs

    from framework.train.checkpoint import latest_checkpoint

    env = {**os.environ, **s3}
    (data, prep), runs = s3_data, f"s3://{BUCKET}/runs"
    manifest = json.loads(_read(s3, "data/small/manifest.json"))
    assert manifest["splits"]["validation"]["rows"] > 0

    args = [sys.executable, str(ROOT / "launch" / "train.py"), *run_overrides(data, runs, "s3-run", deepspeed="zero2", **{"run.max_failures": 1})]
    fs = _bucket(s3)
    with Interruptible("train.py", *args[2:], env=s3) as first:
        first.wait_until(lambda: _past_first_checkpoint(s3, first.output), timeout_s=400)
        # Every worker names its process as it starts (`rank 1 of 2: pid N`): the handle to kill rank 1 by.
        pids = [int(m.group(1)) for line in list(first.output) if (m := re.search(r"rank 1 of 2: pid (\d+)", line))]
        assert len(pids) == 1, first.text()[-3000:]
        os.kill(pids[0], signal.SIGKILL)
        # The restarted worker group resumes from checkpoint 10 (read from the bucket) and trains past it again.
        first.wait_until(lambda: _trained_on_after_resuming(first.output), timeout_s=300)
        first.interrupt()
    # Resumed beside a second Ray instance on the host: Ray's own helpers of the run (Ray Train's
    # PlacementGroupCleaner) address the run's cluster, not "the" local one.
    with another_ray_instance():
        second = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resuming checkpoint_00000010 (step 10)" in second.stdout, second.stdout[-2000:]
    output = second.stdout + second.stderr
    assert "at step 10" in output and "resumed from" in output, output[-3000:]
    assert "Found multiple active Ray instances" not in output, output[-3000:]

    # Metrics and TensorBoard events live beside the checkpoints in the bucket, every step once.
    records = [json.loads(line) for line in _read(s3, "runs/s3-run/logs/metrics.jsonl").splitlines()]
    assert [r["step"] for r in records] == list(range(1, 21))
    logs = fs.get_file_info(pafs.FileSelector(f"{BUCKET}/runs/s3-run/logs"))
    assert any("tfevents" in info.base_name and info.size > 0 for info in logs)
    # The same loss curve and weights as the run never interrupted.
    with open(os.path.join(trained_runs[2], "logs", "metrics.jsonl")) as f:
        reference = {r["step"]: r["train/loss"] for r in map(json.loads, f)}
    np.testing.assert_allclose([r["train/loss"] for r in records], [reference[s] for s in range(1, 21)], rtol=1e-4)
    local = tmp_path / "checkpoint_00000020"
    pafs.copy_files(f"{BUCKET}/runs/s3-run/checkpoint_00000020", str(local), source_filesystem=fs)
    resumed, uninterrupted = _weights(str(local)), _weights(latest_checkpoint(trained_runs[2]))
    assert resumed.keys() == uninterrupted.keys()
    for key in uninterrupted:
        torch.testing.assert_close(resumed[key], uninterrupted[key], rtol=1e-4, atol=1e-5, msg=key)

    out = tmp_path / "exported"
    export = launch("export.py", f"export.checkpoint={runs}/s3-run", f"export.output_dir={out}", env=s3)
    assert export.returncode == 0, export.stderr[-3000:]
    assert json.loads((out / "export.json").read_text())["checkpoint"] == f"{runs}/s3-run/checkpoint_00000020"
    # The secret was never written into a config, a manifest, a checkpoint or a log line.
    secret = s3["AWS_SECRET_ACCESS_KEY"]
    assert secret not in prep.stdout + prep.stderr + first.text() + second.stdout + second.stderr + export.stdout + export.stderr
    for info in fs.get_file_info(pafs.FileSelector(BUCKET, recursive=True)):
        if info.type == pafs.FileType.File and info.base_name.endswith((".json", ".yaml", ".jsonl")):
            assert secret not in _read(s3, info.path[len(BUCKET) + 1:]), info.path


def _weights(checkpoint_dir):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag="deepspeed")


def test_a_sweep_on_object_storage_publishes_its_results_there(s3, s3_data, tmp_path):
    """Trials' runs, the results table, plots and the promoted model with its best.json, all in the bucket."""
    data, _ = s3_data
    result = launch("tune.py", "tune=grid", "tune.scheduler=fifo", "~tune/space", '+tune.space.optim.lr="choice(3e-3)"', "tune.name=s3-sweep",
                    f"tune.storage_path=s3://{BUCKET}/sweeps", f"tune.output_dir={tmp_path / 'out'}", "tune.verbose=0",
                    *[o for o in run_overrides(data, "unused", "unused", **{"run.max_steps": 10, "run.num_workers": 1})
                      if not o.startswith(("run.name=", "run.storage_path="))],
                    env=s3, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    best = json.loads(_read(s3, "sweeps/s3-sweep/published/best.json"))
    assert best["path"] == "best" and best["step"] == 10
    for name in ("results.csv", "curves.png", "best/model.safetensors", "best/export.json"):
        assert _bucket(s3).get_file_info(f"{BUCKET}/sweeps/s3-sweep/published/{name}").size > 0, name


def test_promoting_a_trial_from_object_storage_records_its_checkpoint_uri(s3, trained_checkpoints, prepared_data, tmp_path, monkeypatch):
    """A sweep on s3:// promotes its best trial straight from the bucket: export.json names the checkpoint there,
    not a temporary download gone since, so launch/compress.py finds the shards the model was trained on."""
    import pandas as pd

    from framework import storage
    from framework.export import training_shards
    from framework.tune.plan import load_sweep
    from framework.tune.promotion import promote
    from framework.tune.results import TrialOutcome, results_table

    for key, value in s3.items():
        monkeypatch.setenv(key, value)
    uri = f"s3://{BUCKET}/sweeps/promoted/trial/checkpoint_00000020"
    storage.upload_dir(trained_checkpoints[1], uri)
    sweep = load_sweep(["tune=grid", "~tune/space", '+tune.space.optim.lr="choice(1e-3)"', "run.max_steps=20", "optim.warmup_steps=2"])
    history = pd.DataFrame({"step": [20], "val_loss": [2.0], "checkpoint_path": [uri]})
    best = promote(results_table([TrialOutcome("trial", {"optim.lr": 1e-3}, history, None)], sweep), sweep, str(tmp_path))
    assert best["checkpoint"] == uri
    exported = json.loads((tmp_path / "best" / "export.json").read_text())
    assert (exported["checkpoint"], exported["step"]) == (uri, 20)
    assert training_shards(tmp_path / "best") == prepared_data


def test_changed_optimizer_settings_take_effect_on_resume(prepared_data, run_storage, trained_runs, ray_session):
    """The run resumes zero1's step-10 checkpoint with another peak LR and weight decay: its schedule follows the new
    peak from the first step (the checkpoint's own LR would otherwise win), and the same settings from scratch agree."""
    from framework.train.optim import scheduled_lr

    name = "new-lr"
    copy_run_until(trained_runs[1], 10, os.path.join(run_storage, name))
    cfg = TRAIN.from_overrides(run_overrides(prepared_data, run_storage, name, deepspeed="zero1",
                                    **{"run.num_workers": 1, "optim.lr": 1e-3, "optim.weight_decay": 0.0, "run.log_interval": 1}))
    train_bare(ray_session, cfg)
    records = [json.loads(line) for line in open(os.path.join(run_storage, name, "logs", "metrics.jsonl"))]
    logged = {r["step"]: r["train/lr"] for r in records if "train/lr" in r and r["step"] > 10}
    assert logged, records
    for step, lr in logged.items():
        # The LR a step logs is the one the schedule moved to after it.
        assert lr == pytest.approx(scheduled_lr(cfg.optim, cfg.run.max_steps, step), rel=1e-6), step
    assert logged[20] == pytest.approx(1e-3 * cfg.optim.min_lr_ratio)


def test_a_checkpoint_cut_short_is_ignored_and_removed(prepared_data, run_storage, trained_runs, tmp_path):
    """What a worker killed in the middle of a save leaves (a checkpoint folder with some ranks' files and no COMPLETE
    marker): resume and export take the previous complete checkpoint and name it; export refuses the cut one by name;
    the next checkpoint to complete removes it."""
    from framework.export import export_checkpoint
    from framework.train.checkpoint import mark_complete
    from framework.train.plan import make_plan

    run_dir = tmp_path / "cut"
    copy_run_until(trained_runs[3], 10, str(run_dir))
    shutil.copytree(os.path.join(trained_runs[3], "checkpoint_00000020"), run_dir / "checkpoint_00000020",
                    ignore=shutil.ignore_patterns("COMPLETE", "zero_pp_rank_1_*", "rank-1.json"))
    plan = make_plan(TRAIN.from_overrides(run_overrides(prepared_data, str(tmp_path), "cut", deepspeed="zero3")))
    assert plan.resume_from == str(run_dir / "checkpoint_00000010")
    folder = export_checkpoint(str(run_dir), str(tmp_path / "export"))
    assert json.loads(open(os.path.join(folder, "export.json")).read())["step"] == 10
    with pytest.raises(ConfigError, match=r"incomplete checkpoint .*checkpoint_00000020: no COMPLETE marker"):
        export_checkpoint(str(run_dir / "checkpoint_00000020"), str(tmp_path / "export2"))
    # A later checkpoint completes: the cut one goes.
    shutil.copytree(os.path.join(trained_runs[3], "checkpoint_00000020"), run_dir / "checkpoint_00000030")
    mark_complete(str(run_dir), "checkpoint_00000030", 30)
    assert sorted(os.listdir(run_dir)) == ["checkpoint_00000010", "checkpoint_00000030", "logs"]


@pytest.fixture
def zero3_copy(trained_checkpoints, tmp_path):
    path = tmp_path / "run" / "checkpoint_00000020"
    shutil.copytree(trained_checkpoints[3], path)
    return path


@pytest.mark.parametrize("damage", ["corrupt", "swap"])
def test_export_fails_naming_a_corrupted_or_swapped_shard(zero3_copy, tmp_path, damage):
    from framework.export import ExportError, export_checkpoint

    ds = zero3_copy / "deepspeed"
    rank0, rank1 = ds / "zero_pp_rank_0_mp_rank_00_optim_states.pt", ds / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    if damage == "corrupt":
        data = bytearray(rank1.read_bytes())
        data[len(data) // 2] ^= 0xFF
        rank1.write_bytes(bytes(data))
    else:
        tmp = ds / "swap"
        rank0.rename(tmp), rank1.rename(rank0), tmp.rename(rank1)
    with pytest.raises(ExportError, match=r"zero_pp_rank_[01]_mp_rank_00_optim_states.pt: its content is not what rank-[01] wrote"):
        export_checkpoint(str(zero3_copy), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    result = launch("export.py", f"export.checkpoint={zero3_copy}", f"export.output_dir={tmp_path / 'cli'}")
    assert result.returncode == 1 and result.stderr.strip().splitlines()[-1].startswith("ExportError: ")


def test_export_checks_the_merge_against_the_training_engine_not_against_itself(zero3_copy, tmp_path, monkeypatch):
    """A consolidation that joins the shards wrongly (here: one matrix's rows out of order) writes a folder that loads
    and runs, and reproduces the tensors it was given; only the engine's own logits can tell."""
    import framework.export
    from framework.export import ExportError, export_checkpoint

    joined = framework.export.consolidated_weights

    def misjoined(directory):
        weights = dict(joined(directory))
        name = "model.layers.1.mlp.down_proj.weight"
        weights[name] = weights[name].contiguous().flip(0)
        return weights

    monkeypatch.setattr(framework.export, "consolidated_weights", misjoined)
    with pytest.raises(ExportError, match="logits differ from the training engine's"):
        export_checkpoint(str(zero3_copy), str(tmp_path / "out"))


def test_export_never_replaces_a_folder_it_did_not_write(trained_checkpoints, exports, tmp_path):
    """A user's own model folder (config.json and weights, no export.json) is refused by name and left as it was;
    an earlier export is replaced."""
    from framework.export import export_checkpoint

    base = tmp_path / "my-base-model"
    shutil.copytree(exports[1], base)
    (base / "export.json").unlink()
    before = sorted(os.listdir(base))
    result = launch("export.py", f"export.checkpoint={trained_checkpoints[1]}", f"export.output_dir={base}")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"ConfigError: export.output_dir={base}: exists and holds something other than an earlier export (no export.json); "
        "nothing there is replaced: choose a new or empty directory"
    ]
    assert sorted(os.listdir(base)) == before
    again = tmp_path / "again"
    export_checkpoint(trained_checkpoints[1], str(again))
    export_checkpoint(trained_checkpoints[3], str(again))
    assert json.loads((again / "export.json").read_text())["checkpoint"] == trained_checkpoints[3]
    assert sorted(os.listdir(tmp_path)) == ["again", "my-base-model"]  # nothing staged left behind


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['PAYLOAD_MARK']}",))


def test_our_own_files_are_never_unpickled(trained_checkpoints, tmp_path, monkeypatch):
    """A ZeRO-0 checkpoint whose model states carry a pickled payload (its file hashes rewritten to match): export
    loads them with weights_only and refuses, and the payload never runs."""
    import pickle

    from conftest import as_zero0
    from framework.export import export_checkpoint
    from framework.train.checkpoint import write_file_hashes

    mark = tmp_path / "payload-ran"
    monkeypatch.setenv("PAYLOAD_MARK", str(mark))
    zero0 = as_zero0(trained_checkpoints[1], tmp_path / "run" / "checkpoint_00000020")
    states = zero0 / "deepspeed" / "mp_rank_00_model_states.pt"
    content = torch.load(states, weights_only=True)
    content["payload"] = _Payload()
    torch.save(content, states)
    write_file_hashes(str(zero0), 0)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        export_checkpoint(str(zero0), str(tmp_path / "out"))
    assert not mark.exists()


def test_setup_and_collective_timeouts_are_separate_and_the_resource_wait_is_per_start(prepared_data, run_storage, ray_session):
    """The process group forms under run.setup_timeout_s and then runs its collectives under run.collective_timeout_s;
    each (re)start of the worker group gets one attempt of run.resource_wait_s and no retry."""
    from framework.train.plan import make_plan
    from framework.train.trainer import build_trainer, failure_config

    cfg = TRAIN.from_overrides(run_overrides(prepared_data, run_storage, "timeouts", **{
        "run.num_workers": 1, "run.setup_timeout_s": 7, "run.collective_timeout_s": 77, "run.resource_wait_s": 33, "run.max_steps": 2,
        "run.checkpoint_interval": 2, "run.eval_interval": 2, "optim.warmup_steps": 0}))
    plan = make_plan(cfg)
    trainer = build_trainer(plan, {"CPU": 1.0})
    assert trainer.backend_config.timeout_s == 7
    assert failure_config(plan).controller_failure_limit == 0

    def timeout_after_training(c):
        import torch.distributed as dist

        from framework.train.trainer import run_bare

        run_bare(c)
        return dist.distributed_c10d._get_default_group()._get_backend(torch.device("cpu")).options._timeout.total_seconds()

    assert ray_session.get(ray_session.remote(timeout_after_training).options(num_cpus=1).remote(cfg)) == 77
