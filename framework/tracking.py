"""Experiment tracking in MLflow (`tracking=mlflow`; off by default: `tracking=none`).

Every job that makes something (a training run, each sweep trial, an export, an evaluation) is an MLflow run
with its composed config as params; training logs its per-step metrics from rank 0 only, evaluation its scores.
Runs link to what they came from by tags (`framework.parent_run`: the training run of an export, the export of
an evaluation), and the ids of each run are kept beside what it made (`tracking.json` in a run directory, the
`mlflow` entry of export.json and eval.json), so lineage reads from the files as from the server. An export is
registered as a version of `tracking.registered_model` (its files logged as the run's artifacts: MLflow accepts
a model version only from a run's artifacts or a remote URI), tagged with the folder it was written to; the
version promoted into service carries the alias `champion` (launch/promote.py).

The client is MLflow's own `MlflowClient` with explicit run ids: no process-global active run, so the driver and
a Train worker can log to the same run. Start a local server in one command: `python launch/tracking.py`.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Mapping, Optional

from omegaconf import MISSING

from framework.config import ConfigError, Job, register, require

BACKENDS = ("none", "mlflow")
TRACKING_FILE = "tracking.json"
CHAMPION_ALIAS = "champion"
FOLDER_TAG = "framework.folder"
PARENT_TAG = "framework.parent_run"
KIND_TAG = "framework.kind"


@dataclass
class TrackingConfig:
    """The `tracking.*` keys: types here, values in conf/tracking/<none|mlflow>.yaml."""

    backend: str = MISSING  # none | mlflow
    uri: Optional[str] = MISSING  # null: MLFLOW_TRACKING_URI
    experiment: str = MISSING  # the MLflow experiment every run of this tree goes to
    registered_model: Optional[str] = MISSING  # exports register as versions of this model; null: don't register


def check_tracking(t: TrackingConfig) -> None:
    require(t.backend in BACKENDS, "tracking.backend", t.backend, f"expected one of {BACKENDS}")
    if t.backend == "mlflow":
        require(bool(t.uri or os.environ.get("MLFLOW_TRACKING_URI")), "tracking.uri", t.uri,
                "missing; name the MLflow server (tracking.uri=http://127.0.0.1:5000) or set MLFLOW_TRACKING_URI "
                "(`python launch/tracking.py` starts one on this machine)")
        require(bool(t.experiment.strip()), "tracking.experiment", t.experiment, "expected a name")
        try:
            import mlflow  # noqa: F401
        except ImportError:
            raise ConfigError("tracking=mlflow: the mlflow package is not installed (pip install -e '.[tracking]')") from None
        check_reachable(_uri(t))


def check_reachable(uri: str) -> None:
    """An http(s) tracking server answers its health check (MLflow's client would otherwise retry for minutes)."""
    if not uri.startswith(("http://", "https://")):
        return
    import requests

    try:
        ok = requests.get(f"{uri.rstrip('/')}/health", timeout=10).status_code == 200
    except requests.RequestException as exc:
        raise ConfigError(f"tracking.uri={uri}: no MLflow server answers there ({type(exc).__name__}); start one with "
                          "`python launch/tracking.py`, or name the right one") from None
    require(ok, "tracking.uri", uri, "the server there does not answer MLflow's /health with 200")


@dataclass(frozen=True)
class RunRef:
    """An MLflow run as the files record it: the server and the run id."""

    uri: str
    run_id: str
    experiment_id: str

    def as_dict(self) -> Dict[str, str]:
        return {"uri": self.uri, "run_id": self.run_id, "experiment_id": self.experiment_id}

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> "RunRef":
        return RunRef(d["uri"], d["run_id"], d["experiment_id"])


def client(uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _uri(t: TrackingConfig) -> str:
    return t.uri or os.environ["MLFLOW_TRACKING_URI"]


def flat_params(tree: Mapping[str, Any], prefix: str = "") -> Dict[str, str]:
    """A nested config as MLflow params: dotted keys, values as strings (MLflow keeps at most 6000 characters)."""
    out: Dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flat_params(value, f"{name}."))
        else:
            out[name] = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return {k: v[:6000] for k, v in out.items()}


def start_run(t: Optional[TrackingConfig], kind: str, name: str, params: Mapping[str, Any],
              parent: Optional[RunRef] = None, tags: Optional[Mapping[str, str]] = None) -> Optional[RunRef]:
    """A new run in `tracking.experiment` (None when tracking is off, or `t` is None), its params logged."""
    if t is None or t.backend != "mlflow":
        return None
    from mlflow.entities import Param

    uri = _uri(t)
    mlflow_client = client(uri)
    experiment = mlflow_client.get_experiment_by_name(t.experiment)
    experiment_id = experiment.experiment_id if experiment else mlflow_client.create_experiment(t.experiment)
    all_tags = {KIND_TAG: kind, "mlflow.runName": name, **(tags or {})}
    if parent is not None:
        all_tags[PARENT_TAG] = parent.run_id
    run = mlflow_client.create_run(experiment_id, run_name=name, tags=all_tags)
    ref = RunRef(uri, run.info.run_id, experiment_id)
    items = [Param(k, v) for k, v in flat_params(params).items()]
    for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
        mlflow_client.log_batch(ref.run_id, params=items[i:i + 100])
    return ref


def log_metrics(ref: Optional[RunRef], records: Iterable[Mapping[str, Any]]) -> None:
    """Per-step records ({"step": n, name: value, ...}) as MLflow metrics at their steps."""
    if ref is None:
        return
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [Metric(k, float(v), now, int(r.get("step", 0))) for r in records for k, v in r.items()
               if k != "step" and isinstance(v, (int, float))]
    for i in range(0, len(metrics), 1000):
        client(ref.uri).log_batch(ref.run_id, metrics=metrics[i:i + 1000])


def champion_version(t: TrackingConfig) -> Any:
    """The registered version that carries the alias `champion`; None if none does (or the model is not registered yet)."""
    from mlflow.exceptions import MlflowException

    try:
        return client(_uri(t)).get_model_version_by_alias(t.registered_model, CHAMPION_ALIAS)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def set_champion(t: TrackingConfig, version: str) -> None:
    client(_uri(t)).set_registered_model_alias(t.registered_model, CHAMPION_ALIAS, version)


def resume_run(ref: RunRef) -> None:
    """A run resumed from its checkpoint goes on in the MLflow run it started (steps after the checkpoint are logged again)."""
    client(ref.uri).update_run(ref.run_id, status="RUNNING")


def end_run(ref: Optional[RunRef], ok: bool) -> None:
    if ref is not None:
        client(ref.uri).set_terminated(ref.run_id, "FINISHED" if ok else "FAILED")


def record_run(t: Optional[TrackingConfig], kind: str, name: str, params: Mapping[str, Any], metrics: Mapping[str, Any],
               parent: Optional[RunRef] = None, tags: Optional[Mapping[str, str]] = None) -> Optional[RunRef]:
    """A finished job as one run: its params, its numeric figures as metrics (step 0); None when tracking is off."""
    ref = start_run(t, kind, name, params, parent=parent, tags=tags)
    ok = False
    try:
        log_metrics(ref, [{"step": 0, **numbers(metrics)}])
        ok = True
    finally:
        end_run(ref, ok)
    return ref


def numbers(tree: Mapping[str, Any], prefix: str = "") -> Dict[str, float]:
    """The finite numbers of a nested dict, under dotted names (a report's figures as metrics)."""
    import math

    out: Dict[str, float] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(numbers(value, f"{name}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[name] = float(value)
    return out


def parent_of(marker: str) -> Optional[RunRef]:
    """The run a tracking.json (or a file's `mlflow` entry) names, if that file is there."""
    from framework import storage

    if not storage.exists(marker):
        return None
    record = storage.read_json(marker)
    record = record.get("mlflow", record) if isinstance(record, dict) else None
    try:
        return RunRef.from_dict(record) if record else None
    except (KeyError, TypeError):
        return None


def register_folder(t: TrackingConfig, ref: Optional[RunRef], folder: str) -> Optional[Dict[str, Any]]:
    """The folder's files as the run's `model` artifacts, registered as a new version of tracking.registered_model."""
    if ref is None or not t.registered_model:
        return None
    mlflow_client = client(ref.uri)
    mlflow_client.log_artifacts(ref.run_id, folder, "model")
    from mlflow.exceptions import MlflowException

    try:
        mlflow_client.create_registered_model(t.registered_model)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version = mlflow_client.create_model_version(t.registered_model, f"runs:/{ref.run_id}/model", run_id=ref.run_id,
                                                 tags={FOLDER_TAG: os.path.abspath(folder) if "://" not in folder else folder})
    return {"name": t.registered_model, "version": str(version.version)}


@dataclass
class ServerConfig:
    """The `mlflow_server.*` keys of conf/mlflow_server.yaml (launch/tracking.py)."""

    host: str = MISSING
    port: int = MISSING
    root: str = MISSING
    workers: int = MISSING


@dataclass
class ServerRoot:
    mlflow_server: ServerConfig = field(default_factory=ServerConfig)


def load_server(cfg: Any) -> ServerConfig:
    from framework.config import typed

    s: ServerConfig = typed(ServerConfig, cfg["mlflow_server"], "mlflow_server")
    require(1 <= s.port <= 65535, "mlflow_server.port", s.port, "expected a TCP port")
    require(s.workers >= 1, "mlflow_server.workers", s.workers, "expected at least 1")
    try:
        import mlflow  # noqa: F401
    except ImportError:
        raise ConfigError("launch/tracking.py: the mlflow package is not installed (pip install -e '.[tracking]')") from None
    return s


def server_command(s: ServerConfig) -> list:
    """`mlflow server` on SQLite with its artifacts proxied (clients upload through the server, no shared disk needed)."""
    import sys

    root = os.path.abspath(s.root)
    return [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
            "--artifacts-destination", os.path.join(root, "artifacts"), "--serve-artifacts",
            "--host", s.host, "--port", str(s.port), "--workers", str(s.workers)]


register("mlflow_server_schema", ServerRoot)
MLFLOW_SERVER = Job("mlflow_server", load=load_server)
