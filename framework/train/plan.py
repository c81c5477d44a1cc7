"""Config → one plan, made once in the driver before any cluster work: everything a training run reads.

`make_plan` validates the config, reads the manifest, builds the transformers config from the shards'
tokenizer, draws the evaluation rows and finds the checkpoint to resume (checking it against the
config and the shards), each exactly once; the TorchTrainer, every worker and a sweep's trials read
the plan and nothing else. `size_workers` places the workers on the cluster's nodes once connected.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, replace
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from framework import storage
from framework.config import ConfigError, absolute
from framework.data.sampler import evaluation_rows
from framework.data.shards import PAIRS_COLUMN, PROMPT_IDS, read_manifest
from framework.tracking import RunRef
from framework.train.config import TrainRoot, validate
from framework.train import checkpoint
from framework.train.checkpoint import TrainState
from framework.train.config import RunConfig


@dataclass
class TrainPlan:
    config: TrainRoot  # validated, local paths absolute
    manifest: Dict[str, Any]
    # The transformers config sized to the shards' tokenizer, as its dict: Ray Train's controller unpickles the plan
    # it hands the workers, and a config object would make it import transformers (2 s of CPU per run) for nothing.
    model_config_dict: Dict[str, Any]
    eval_rows: np.ndarray  # validation rows every evaluation measures (framework/data/sampler.py)
    probe: Any  # the fixed input whose logits every checkpoint stores (framework/model.py: probe_ids)
    run_dir: str  # <run.storage_path>/<run.name>: checkpoints, and logs/ when storage is local
    log_dir: str  # TensorBoard events and metrics.jsonl
    resume_from: Optional[str]  # the latest complete checkpoint, resumed by a re-run of the same name
    resume_state: Optional[TrainState]
    tracking: Optional[RunRef] = None  # the MLflow run this run logs to (tracking=mlflow), set when it starts

    @property
    def model_config(self) -> Any:
        """The transformers config (a new object at each call, from `model_config_dict`)."""
        from transformers import AutoConfig

        fields = dict(self.model_config_dict)
        return AutoConfig.for_model(fields.pop("model_type"), **fields)

    @property
    def data_dir(self) -> str:
        return self.config.data.output_dir

    @property
    def tokenizer_uri(self) -> str:
        return storage.join(self.data_dir, self.manifest["tokenizer"])


def resolve_paths(cfg: TrainRoot) -> TrainRoot:
    """Absolute local paths: Ray workers do not run in the driver's directory."""
    run = replace(cfg.run, storage_path=absolute(cfg.run.storage_path))
    data = replace(cfg.data, output_dir=absolute(cfg.data.output_dir))
    model = replace(cfg.model, pretrained_path=absolute(cfg.model.pretrained_path) if cfg.model.pretrained_path else None)
    return replace(cfg, run=run, data=data, model=model)


def check_shards(cfg: TrainRoot, manifest: Dict[str, Any]) -> None:
    """The shards must match the config, hold a global batch, and hold the evaluation set asked for."""
    run, data = cfg.run, cfg.data
    if manifest["seq_len"] != data.seq_len:
        raise ConfigError(
            f"data.seq_len={data.seq_len}: the shards in {data.output_dir} were packed with "
            f"seq_len={manifest['seq_len']}; re-run prep or set data.seq_len={manifest['seq_len']}"
        )
    prompts = PROMPT_IDS in manifest["columns"]
    if prompts != (cfg.rl is not None):
        raise ConfigError(
            f"rl={None if cfg.rl is None else cfg.rl.algorithm}: the shards in {data.output_dir} hold "
            + ("prompts with answers (data=prompts), which train by reinforcement learning: experiment=grpo" if prompts else
               "no prompts; reinforcement learning samples completions of shards prepared with data=prompts")
        )
    pairs = PAIRS_COLUMN in manifest["columns"]
    if pairs != (cfg.post is not None):
        raise ConfigError(
            f"post={None if cfg.post is None else cfg.post.loss}: the shards in {data.output_dir} hold "
            + ("preference pairs, which train with a preference loss: experiment=dpo or post=dpo" if pairs else
               "no preference pairs; a preference loss trains on shards prepared with data=preference")
        )
    train_rows, val_rows = (manifest["splits"][s]["rows"] for s in ("train", "validation"))
    if train_rows < run.global_batch_size:
        raise ConfigError(f"run.global_batch_size={run.global_batch_size}: the train split of {data.output_dir} has only {train_rows} rows")
    if run.eval_rows is not None and run.eval_rows > val_rows:
        raise ConfigError(
            f"run.eval_rows={run.eval_rows}: the validation split of {data.output_dir} holds {val_rows} rows; "
            f"ask for at most {val_rows}, or null for all of them"
        )


def model_config_for(cfg: TrainRoot, manifest: Dict[str, Any]) -> tuple:
    """The transformers config of the model, sized to the shards' tokenizer (vocabulary, special tokens), and the probe ids."""
    from transformers import AutoTokenizer

    from framework.model import hf_config, probe_ids, special_token_ids

    with tempfile.TemporaryDirectory() as tmp:
        storage.download_dir(storage.join(cfg.data.output_dir, manifest["tokenizer"]), tmp)
        tokenizer = AutoTokenizer.from_pretrained(tmp, local_files_only=True)
    config = hf_config(cfg.model, manifest["vocab_size"], special_token_ids(tokenizer))
    if config.vocab_size < manifest["vocab_size"]:
        # A pretrained model keeps its own embeddings: token ids past them would fail inside the workers.
        raise ConfigError(
            f"model.pretrained_path={cfg.model.pretrained_path}: the model embeds {config.vocab_size} tokens but the "
            f"shards in {cfg.data.output_dir} use a {manifest['vocab_size']}-token tokenizer; prepare them with "
            f"data.tokenizer.path={cfg.model.pretrained_path}"
        )
    return config, probe_ids(tokenizer, config)


def check_resume(cfg: TrainRoot, manifest: Dict[str, Any], run_dir: str) -> tuple[Optional[str], Optional[TrainState]]:
    """The checkpoint a run of this name resumes, and its state; refuses one trained with other settings or other shards."""
    latest = checkpoint.latest_checkpoint(run_dir)
    if latest is None:
        return None, None
    name = latest.rsplit("/", 1)[-1]
    conflicts = checkpoint.resume_conflicts(checkpoint.read_config(latest), cfg)
    if conflicts:
        key, saved, now = conflicts[0]
        raise ConfigError(
            f"{key}={now}: run {cfg.run.name} resumes {name}, trained with {key}={saved}; keep the run's settings or start a new run.name"
        )
    state = checkpoint.read_state(latest)
    if state.data_fingerprint != manifest["fingerprint"]:
        raise ConfigError(
            f"data.output_dir={cfg.data.output_dir}: run {cfg.run.name} resumes {name}, trained on other shards "
            f"(fingerprint {state.data_fingerprint[:12]}, these are {manifest['fingerprint'][:12]}: prep ran again, or other "
            f"sources or tokenizer); point data.output_dir at the shards it trained on, or start a new run.name"
        )
    return latest, state


def log_dir(cfg: TrainRoot) -> str:
    """TensorBoard events and metrics.jsonl: `logs/` beside the run's checkpoints, on local or object storage."""
    return storage.join(cfg.run.storage_path, cfg.run.name, "logs")


def make_plan(cfg: TrainRoot) -> TrainPlan:
    """Everything a training run of `cfg` needs, read and checked once; raises ConfigError before any cluster work."""
    cfg = resolve_paths(validate(cfg))
    manifest = read_manifest(cfg.data.output_dir)
    check_shards(cfg, manifest)
    model_config, probe = model_config_for(cfg, manifest)
    run_dir = storage.join(cfg.run.storage_path, cfg.run.name)
    resume_from, resume_state = check_resume(cfg, manifest, run_dir)
    rows = evaluation_rows(manifest["splits"]["validation"]["rows"], cfg.run.eval_rows, manifest["seed"])
    return TrainPlan(cfg, manifest, model_config.to_dict(), rows, probe, run_dir, log_dir(cfg), resume_from, resume_state)


# ---------------------------------------------------------------------------------------------
# Placing the workers

def node_resources() -> List[Dict[str, float]]:
    """CPUs and GPUs of every alive node of the connected cluster."""
    import ray

    return [
        {"CPU": float(n["Resources"].get("CPU", 0.0)), "GPU": float(n["Resources"].get("GPU", 0.0)), "name": n.get("NodeManagerAddress", "?")}
        for n in ray.nodes() if n.get("Alive")
    ]


def beside_engines(cfg: TrainRoot, nodes: Sequence[Dict[str, float]], runs: int = 1, key: str = "rl.engine.num_cpus") -> List[Dict[str, float]]:
    """The nodes as the Train workers find them once the rollout engines of `runs` rl runs (a sweep's concurrent
    trials) have their CPUs and GPUs: each taken from the node with the most free CPUs among those that hold it (Ray
    places an actor where it fits). Nothing is taken for other runs."""
    nodes = [dict(n) for n in nodes]
    if cfg.rl is None or cfg.rl.engine.placement == "colocated":  # a colocated engine reserves nothing
        return nodes
    engine = cfg.rl.engine
    for placed in range(runs):
        fitting = [n for n in nodes if n["CPU"] >= engine.num_cpus and n["GPU"] >= engine.num_gpus]
        if not fitting:
            layout = ", ".join(f"{n['name']}: {n['CPU']:g} CPUs/{n['GPU']:g} GPUs free" for n in nodes) or "no alive nodes"
            raise ConfigError(
                f"{key}={engine.num_cpus if key == 'rl.engine.num_cpus' else runs}: {runs} rollout engine(s) of "
                f"{engine.num_cpus:g} CPUs and {engine.num_gpus:g} GPUs do not fit the cluster ({layout} after {placed}); "
                "lower rl.engine.num_cpus" + (" or tune.max_concurrent_trials" if runs > 1 else "")
            )
        host = max(fitting, key=lambda n: n["CPU"])
        host["CPU"] -= engine.num_cpus
        host["GPU"] -= engine.num_gpus
    return nodes


def _fit(nodes: Sequence[Dict[str, float]], cpus: float, gpus: float) -> int:
    """How many workers of `cpus` CPUs and `gpus` GPUs the nodes hold, node by node (a worker cannot span nodes)."""
    total = 0
    for node in nodes:
        by_cpu = math.floor(node["CPU"] / cpus + 1e-9) if cpus > 0 else math.inf
        by_gpu = math.floor(node["GPU"] / gpus + 1e-9) if gpus > 0 else math.inf
        total += min(by_cpu, by_gpu) if not (by_cpu == by_gpu == math.inf) else 0
    return int(total)


def size_workers(run: RunConfig, nodes: Sequence[Dict[str, float]], trials: int = 1, key: str = "run.num_workers") -> Dict[str, float]:
    """Resources per Train worker so that `trials` runs of run.num_workers workers fit the nodes; else one line with the numbers.

    With run.cpus_per_worker null a CPU worker takes at most one CPU (torch threads past that buy
    little on CPU), less when that is what fits; a GPU worker takes 1 to 8 of the CPUs beside its GPU.
    Workers read their own data (framework/data/stream.py), so nothing else needs CPUs.
    """
    workers = trials * (run.min_workers if run.min_workers is not None else run.num_workers)
    gpus = float(run.gpus_per_worker)
    per_worker = run.cpus_per_worker
    if per_worker is None:
        if gpus:
            shares = [n["CPU"] / math.floor(n["GPU"] / gpus) for n in nodes if n["GPU"] >= gpus]
            per_worker = float(max(1, min(8, math.floor(min(shares))))) if shares else 1.0
        else:
            # The largest share of a CPU (at most 1, in Ray's 1e-4 steps) at which the workers fit node by node.
            options = [min(1.0, math.floor(n["CPU"] / k * 1e4) / 1e4) for n in nodes for k in range(1, workers + 1) if n["CPU"] > 0]
            fitting = [x for x in options if x > 0 and _fit(nodes, x, 0) >= workers]
            per_worker = max(fitting) if fitting else 1.0
    fits = _fit(nodes, per_worker, gpus)
    if fits < workers:
        each = f"{per_worker:g} CPUs" + (f" + {gpus:g} GPUs" if gpus else "")
        layout = ", ".join(f"{n['name']}: {n['CPU']:g} CPUs" + (f"/{n['GPU']:g} GPUs" if gpus else "") for n in nodes) or "no alive nodes"
        count = f"{trials} trials × {workers // trials}" if trials > 1 else f"{workers}"
        raise ConfigError(
            f"{key}={run.num_workers if trials == 1 else trials}: {count} workers × {each} do not fit the cluster's nodes "
            f"({layout}): at most {fits} fit; lower " + ", ".join(dict.fromkeys([key, "run.num_workers"])) + " or run.cpus_per_worker"
        )
    resources = {"CPU": per_worker}
    if gpus:
        resources["GPU"] = gpus
    return resources
