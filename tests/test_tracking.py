"""Experiment tracking against a real MLflow server on loopback (`launch/tracking.py`, SQLite): a training run and its
exports appear as MLflow runs with their params and per-step metrics, linked by tags; each export is a registered
model version; an evaluation is a run under its export; the gate reads the champion from the registry's alias."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from conftest import ROOT, free_port, prep_overrides, run_overrides

pytestmark = pytest.mark.slow
MODEL = "tiny-tracked"


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory):
    """`python launch/tracking.py` on a free loopback port, stopped with SIGTERM after the module."""
    port = free_port()
    root = tmp_path_factory.mktemp("mlflow")
    log = open(root / "server.log", "w")
    server = subprocess.Popen([sys.executable, str(ROOT / "launch" / "tracking.py"), f"mlflow_server.port={port}",
                               f"mlflow_server.root={root}"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if requests.get(f"{uri}/health", timeout=2).status_code == 200:
                break
        except requests.ConnectionError:
            pass
        assert server.poll() is None and time.monotonic() < deadline, (root / "server.log").read_text()[-2000:]
        time.sleep(1)
    yield uri
    server.send_signal(signal.SIGTERM)
    server.wait(timeout=60)
    log.close()


def test_prep_train_export_eval_compress_and_promote_are_tracked_with_their_lineage(mlflow_uri, run_storage, tmp_path, ray_session):
    from mlflow.tracking import MlflowClient

    from framework.compress.job import compress
    from framework.compress.plan import COMPRESS
    from framework.data.prepare import prepare_shards
    from framework.evaluation.config import EVAL
    from framework.evaluation.job import run_eval
    from framework.export import EXPORT, export_checkpoint
    from framework.promote.config import PROMOTE
    from framework.promote.job import run_promote
    from framework.train.config import TRAIN
    from framework.train.trainer import train

    tracking = ["tracking=mlflow", f"tracking.uri={mlflow_uri}", f"tracking.registered_model={MODEL}"]
    client = MlflowClient(tracking_uri=mlflow_uri, registry_uri=mlflow_uri)

    # The preparation: a run with the split counts; its id beside the shards.
    data_dir = str(tmp_path / "data")
    prep = TRAIN.from_overrides(prep_overrides(data_dir) + tracking[:2])
    manifest = prepare_shards(prep.data, None, prep.tracking)
    prep_run = client.get_run(json.loads((Path(data_dir) / "tracking.json").read_text())["run_id"])
    assert prep_run.data.tags["framework.kind"] == "prep" and prep_run.info.status == "FINISHED"
    assert prep_run.data.metrics["splits.train.rows"] == manifest["splits"]["train"]["rows"] > 0

    overrides = run_overrides(data_dir, run_storage, "tracked", **{"run.max_steps": 10, "run.checkpoint_interval": 5,
                                                                   "run.eval_interval": 5})
    train(TRAIN.from_overrides(overrides + tracking[:2]))
    run_dir = Path(run_storage) / "tracked"

    # The training run: its composed config as params, every logged step's metrics, FINISHED.
    train_run = client.get_run(json.loads((run_dir / "tracking.json").read_text())["run_id"])
    assert train_run.info.status == "FINISHED" and train_run.data.tags["framework.kind"] == "train"
    assert train_run.data.tags["framework.parent_run"] == prep_run.info.run_id  # the shards it trained on
    assert train_run.data.params["run.max_steps"] == "10" and train_run.data.params["model.name"] == "tiny"
    with open(run_dir / "logs" / "metrics.jsonl") as f:
        logged = [r for r in map(json.loads, f) if "train/loss" in r]
    history = client.get_metric_history(train_run.info.run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(r["step"], r["train/loss"]) for r in logged]
    assert [m.step for m in client.get_metric_history(train_run.info.run_id, "val/loss")] == [5, 10]

    # Each export: a run under the training run, a model version whose files are the folder's, tagged with it.
    export_cfg = EXPORT.from_overrides([f"export.checkpoint={run_dir / 'checkpoint_00000005'}", *tracking]).tracking
    folders = [export_checkpoint(str(run_dir / f"checkpoint_{s:08d}"), str(tmp_path / f"step{s}"), tracking=export_cfg)
               for s in (5, 10)]
    versions = []
    for folder in folders:
        record = json.loads((Path(folder) / "export.json").read_text())["mlflow"]
        run = client.get_run(record["run_id"])
        assert run.data.tags["framework.parent_run"] == train_run.info.run_id and run.data.tags["framework.kind"] == "export"
        version = client.get_model_version(MODEL, record["model_version"]["version"])
        assert version.tags["framework.folder"] == folder and version.run_id == run.info.run_id
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "model")}
        assert {"model/config.json", "model/model.safetensors", "model/tokenizer.json"} <= artifacts
        versions.append(version.version)
    assert versions == ["1", "2"]

    # An evaluation: a run under the export, its scores as metrics, equal to the eval.json beside the folder.
    [scored] = run_eval(EVAL.from_overrides([f"eval.model={folders[0]}", *tracking[:2]]))
    eval_run = client.get_run(scored["mlflow"]["run_id"])
    exported = json.loads((Path(folders[0]) / "export.json").read_text())["mlflow"]["run_id"]
    assert eval_run.data.tags["framework.parent_run"] == exported
    assert eval_run.data.metrics["val/perplexity"] == scored["scores"]["val/perplexity"]["value"]

    # A compression: a run under the export it compressed, the report's figures as metrics.
    plan = COMPRESS.from_overrides([f"compress.model_path={folders[1]}", f"compress.output_dir={tmp_path / 'int8'}",
                                    "compress.prompts=2", "compress.max_tokens=8", *tracking[:2]])
    report = compress(plan)
    compress_run = client.get_run(json.loads((tmp_path / "int8" / "tracking.json").read_text())["run_id"])
    assert compress_run.data.tags["framework.parent_run"] == json.loads((Path(folders[1]) / "export.json").read_text())["mlflow"]["run_id"]
    assert compress_run.data.metrics["perplexity.ratio"] == report["perplexity"]["ratio"]

    # Promotion moves the alias `champion`; with no promotion record at all, the gate reads the champion from the registry.
    run_promote(PROMOTE.from_overrides([f"promote.candidate={folders[0]}", f"promote.record={tmp_path / 'a.json'}", *tracking]))
    assert client.get_model_version_by_alias(MODEL, "champion").version == "1"
    promoted = run_promote(PROMOTE.from_overrides([f"promote.candidate={folders[1]}", f"promote.record={tmp_path / 'b.json'}",
                                                   *tracking]))
    [check] = promoted["current"]["checks"]
    assert check["champion"] == scored["scores"]["val/perplexity"]["value"]  # step 5's, read through the registry
    assert client.get_model_version_by_alias(MODEL, "champion").version == "2"
