"""The driver side of training: size the job to the cluster, then assemble and run the TorchTrainer.

ScalingConfig, RunConfig, FailureConfig and CheckpointConfig are all built here, from `conf/run/*`.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import replace
from typing import Any, Dict, List, Optional

import ray
import ray.train
from ray.train.torch import TorchConfig, TorchTrainer
from transformers import AutoTokenizer

from framework import storage
from framework.cluster import cluster_cpus, cluster_gpus, connect
from framework.config import ConfigError, JobConfig, JobError, absolute, validate
from framework.data.shards import read_manifest
from framework.data.stream import build_datasets, data_config, quiet_data_logs
from framework.model import hf_config, special_token_ids
from framework.train import checkpoint
from framework.train.loop import train_loop_per_worker


def resolve_paths(job: JobConfig) -> JobConfig:
    """Absolute local paths: Ray workers do not run in the driver's directory."""
    run = replace(job.run, storage_path=absolute(job.run.storage_path))
    data = replace(job.data, output_dir=absolute(job.data.output_dir))
    model = replace(job.model, pretrained_path=absolute(job.model.pretrained_path) if job.model.pretrained_path else None)
    return replace(job, run=run, data=data, model=model)


def worker_resources(job: JobConfig) -> Dict[str, float]:
    """CPUs/GPUs per Train worker that fit the cluster and leave Ray Data CPUs to read with.

    Train workers that hold every CPU leave Ray Data's read tasks none, and the job waits forever;
    so the budget is checked here and a job that cannot fit fails with the numbers instead.
    """
    run = job.run
    cpus, gpus = cluster_cpus(), cluster_gpus()
    if run.gpus_per_worker and gpus < run.num_workers * run.gpus_per_worker:
        raise ConfigError(
            f"run.num_workers={run.num_workers}: needs {run.num_workers * run.gpus_per_worker:g} GPUs "
            f"(run.gpus_per_worker={run.gpus_per_worker}) but the cluster has {gpus:g}"
        )
    per_worker = run.cpus_per_worker
    if per_worker is None:
        # CPU workers: at most one CPU each (torch threads past that buy little here); GPU workers:
        # a share of the spare CPUs for their host-side work, between 1 and 8.
        spare = (cpus - run.data_cpus) / run.num_workers
        per_worker = min(1.0, spare) if not run.gpus_per_worker else max(1.0, min(8.0, spare))
    if per_worker <= 0 or run.num_workers * per_worker + min(run.data_cpus, 0.5) > cpus:
        raise ConfigError(
            f"run.num_workers={run.num_workers}: {run.num_workers} workers × {per_worker:g} CPUs plus "
            f"CPUs for Ray Data reads (run.data_cpus={run.data_cpus:g}) do not fit the cluster's {cpus:g} CPUs; "
            f"lower run.num_workers or run.cpus_per_worker"
        )
    resources = {"CPU": per_worker}
    if run.gpus_per_worker:
        resources["GPU"] = float(run.gpus_per_worker)
    return resources


def check_data(job: JobConfig, manifest: Dict[str, Any]) -> None:
    """The shards must match the config and hold at least one step of batches on every worker."""
    run = job.run
    if manifest["seq_len"] != job.data.seq_len:
        raise ConfigError(
            f"data.seq_len={job.data.seq_len}: the shards in {job.data.output_dir} were packed with "
            f"seq_len={manifest['seq_len']}; re-run prep or set data.seq_len={manifest['seq_len']}"
        )
    if manifest["splits"]["train"]["rows"] < run.global_batch_size:
        raise ConfigError(
            f"run.global_batch_size={run.global_batch_size}: the train split has only "
            f"{manifest['splits']['train']['rows']} sequences"
        )
    if manifest["splits"]["validation"]["rows"] < run.num_workers * run.micro_batch_size:
        raise ConfigError(
            f"data.val_fraction={job.data.val_fraction}: the validation split has "
            f"{manifest['splits']['validation']['rows']} sequences, fewer than one micro-batch per worker"
        )


def log_dir(job: JobConfig) -> str:
    """TensorBoard and metrics.jsonl live beside the run's checkpoints when storage is local."""
    if "://" in job.run.storage_path:
        return absolute(os.path.join("outputs", "logs", job.run.name))
    return os.path.join(job.run.storage_path, job.run.name, "logs")


def model_config_for(job: JobConfig, manifest: Dict[str, Any]) -> Any:
    """The transformers config of the job's model, sized to the shards' tokenizer (vocabulary, special tokens)."""
    tokenizer_uri = storage.join(job.data.output_dir, manifest["tokenizer"])
    with tempfile.TemporaryDirectory() as tmp:
        storage.download_dir(tokenizer_uri, tmp)
        tokenizer = AutoTokenizer.from_pretrained(tmp, local_files_only=True)
    config = hf_config(job.model, manifest["vocab_size"], special_token_ids(tokenizer))
    if config.vocab_size < manifest["vocab_size"]:
        # A pretrained model keeps its own embeddings: token ids past them would fail inside the workers.
        raise ConfigError(
            f"model.pretrained_path={job.model.pretrained_path}: the model embeds {config.vocab_size} tokens but the "
            f"shards in {job.data.output_dir} use a {manifest['vocab_size']}-token tokenizer; prepare them with "
            f"data.tokenizer.path={job.model.pretrained_path}"
        )
    return config


def check_resume(job: JobConfig) -> None:
    """A run name that has checkpoints resumes the latest; the job must match it where resuming depends on it."""
    run_dir = storage.join(job.run.storage_path, job.run.name)
    latest = checkpoint.latest_checkpoint(run_dir)
    if latest is None:
        return
    conflicts = checkpoint.resume_conflicts(checkpoint.read_job_config(latest), job)
    if conflicts:
        key, saved, now = conflicts[0]
        raise ConfigError(
            f"{key}={now}: run {job.run.name} resumes {latest.rsplit('/', 1)[-1]}, trained with {key}={saved}; "
            f"keep the run's settings or start a new run.name"
        )


def failure_config(job: JobConfig) -> ray.train.FailureConfig:
    """Restarts after a worker dies (run.max_failures), and a bounded wait for the workers' resources.

    Ray Train asks for its worker group's resources in attempts of RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S
    (60 s) and by default retries forever: a run that lost a node on a fixed-size cluster would wait for
    ever. run.resource_wait_s bounds the attempts, so such a run fails with Ray's timeout error instead.
    """
    from ray.train.v2._internal.constants import DEFAULT_WORKER_GROUP_START_TIMEOUT_S, WORKER_GROUP_START_TIMEOUT_S_ENV_VAR

    attempt_s = float(os.environ.get(WORKER_GROUP_START_TIMEOUT_S_ENV_VAR, DEFAULT_WORKER_GROUP_START_TIMEOUT_S))
    attempts = max(1, math.ceil(job.run.resource_wait_s / attempt_s))
    return ray.train.FailureConfig(max_failures=job.run.max_failures, controller_failure_limit=attempts - 1)


def unplaced_workers_error(job: JobConfig, resources: Dict[str, float], error: Exception) -> Exception:
    """What a run that waited run.resource_wait_s for its workers' resources in vain tells its user
    (Ray's own message points at an environment variable); any other controller error as it is."""
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError

    if not isinstance(getattr(error, "controller_failure", None), WorkerGroupStartupTimeoutError):
        return error
    each = ", ".join(f"{v:g} {k}" for k, v in resources.items())
    return JobError(
        f"run.resource_wait_s={job.run.resource_wait_s}: the run's {job.run.num_workers} Train workers ({each} each) "
        f"could not be placed on the cluster in that time (a node lost, or not added by the autoscaler); its checkpoints "
        f"are kept in {storage.join(job.run.storage_path, job.run.name)}: run the same command again to resume"
    )


def build_trainer(job: JobConfig, callbacks: Optional[List[Any]] = None) -> TorchTrainer:
    """A TorchTrainer for `job` on the connected cluster; reruns of the same run name resume.

    `callbacks` (Ray Train callbacks) go into the RunConfig; a sweep passes Tune's TuneReportCallback.
    """
    manifest = read_manifest(job.data.output_dir)
    check_data(job, manifest)
    model_config = model_config_for(job, manifest)
    resources = worker_resources(job)
    eval_rows = job.run.eval_batches * job.run.micro_batch_size * job.run.num_workers
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "job": job,
            "manifest": manifest,
            "model_config": model_config,
            "data_dir": job.data.output_dir,
            "log_dir": log_dir(job),
        },
        torch_config=TorchConfig(backend="nccl" if job.run.gpus_per_worker else "gloo", timeout_s=job.run.init_timeout_s),
        scaling_config=ray.train.ScalingConfig(
            num_workers=job.run.num_workers,
            use_gpu=bool(job.run.gpus_per_worker),
            resources_per_worker=resources,
        ),
        run_config=ray.train.RunConfig(
            name=job.run.name,
            storage_path=job.run.storage_path,
            failure_config=failure_config(job),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=job.run.keep_checkpoints),
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            callbacks=callbacks,
        ),
        datasets=build_datasets(job.data.output_dir, manifest, eval_rows),
        dataset_config=data_config(),
    )


def run(job: JobConfig) -> ray.train.Result:
    """Train `job` to `run.max_steps` (resuming a run of the same name) and return Ray Train's Result."""
    # Everything that can be checked without a cluster is, before one is started or joined.
    job = resolve_paths(validate(job))
    manifest = read_manifest(job.data.output_dir)
    check_data(job, manifest)
    model_config_for(job, manifest)
    check_resume(job)
    connect(job.run.ray_address)
    quiet_data_logs()
    trainer = build_trainer(job)
    print(
        f"train: run {job.run.name}: {job.model.name} on {job.data.name}, ZeRO-{job.deepspeed.stage}, "
        f"{job.run.num_workers} workers, {job.run.max_steps} steps → {job.run.storage_path}/{job.run.name}",
        flush=True,
    )
    try:
        result = trainer.fit()
    except ray.train.ControllerError as exc:
        raise unplaced_workers_error(job, trainer.scaling_config.resources_per_worker, exc) from exc
    print(f"train: done. metrics: {result.metrics}", flush=True)
    if result.checkpoint:
        print(f"train: latest checkpoint: {result.checkpoint.path}", flush=True)
    return result
