"""Training checkpoints: what one holds, how ranks write it, how a run reads it back.

Layout of a checkpoint directory (each rank writes its own files; Ray Train merges them):
    latest, deepspeed/        DeepSpeed's checkpoint of every rank (ZeRO shards included)
    zero_to_fp32.py           DeepSpeed's own consolidation script (ZeRO stages 1-3 only)
    train_state.json          step, data position (epoch, micro-batches into it), tokens seen
    config.yaml               the resolved job config
    hf_config/config.json     the transformers model config
    tokenizer/                the tokenizer the shards were made with
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

import pyarrow.fs as pafs
from omegaconf import OmegaConf

from framework import storage
from framework.config import JobConfig

DEEPSPEED_TAG = "deepspeed"
TRAIN_STATE = "train_state.json"
CONFIG = "config.yaml"
HF_CONFIG_DIR = "hf_config"
TOKENIZER_DIR = "tokenizer"


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0  # per-worker micro-batches already consumed in `epoch`
    tokens: int = 0


def save(engine: Any, directory: str, state: TrainState, job: JobConfig, tokenizer_uri: str, rank: int) -> None:
    """Write this rank's part of a checkpoint into a local `directory` (all ranks must call it)."""
    engine.save_checkpoint(directory, tag=DEEPSPEED_TAG)
    if rank == 0:
        with open(os.path.join(directory, TRAIN_STATE), "w") as f:
            json.dump(dataclasses.asdict(state), f, indent=2)
        OmegaConf.save(OmegaConf.structured(job), os.path.join(directory, CONFIG))
        engine.module.config.save_pretrained(os.path.join(directory, HF_CONFIG_DIR))
        storage.download_dir(tokenizer_uri, os.path.join(directory, TOKENIZER_DIR))


def load(engine: Any, directory: str) -> TrainState:
    """Restore the engine (weights, optimizer, LR schedule) and the position from a checkpoint."""
    engine.load_checkpoint(directory, tag=DEEPSPEED_TAG)
    with open(os.path.join(directory, TRAIN_STATE)) as f:
        return TrainState(**json.load(f))


def read_state(directory: str) -> TrainState:
    with open(os.path.join(directory, TRAIN_STATE)) as f:
        return TrainState(**json.load(f))


def read_job_config(directory: str) -> JobConfig:
    """The job config a checkpoint (a local directory or a URI) was trained with, typed."""
    saved = OmegaConf.create(storage.read_text(storage.join(directory, CONFIG)))
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(JobConfig), saved))


def checkpoint_dir_name(step: int) -> str:
    return f"checkpoint_{step:08d}"


def latest_checkpoint(run_dir: str) -> Optional[str]:
    """The newest complete checkpoint directory of a run (a local directory or a URI), or None."""
    fs, path = storage.resolve(run_dir)
    names = sorted(
        info.base_name
        for info in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
        if info.type == pafs.FileType.Directory and info.base_name.startswith("checkpoint_")
    )
    for name in reversed(names):
        # A checkpoint whose upload was cut short has no train_state.json (rank 0 writes it last).
        if storage.exists(storage.join(run_dir, name, TRAIN_STATE)):
            return storage.join(run_dir, name)
    return None


# What a resumed run must share with the checkpoint it resumes: the model's shape, the ZeRO partitioning
# of its optimizer state, and what a data position (micro-batches into an epoch, per worker) means.
# Anything else (steps, learning rate, intervals) may change between runs of the same name.
RESUME_KEYS = (
    "model.arch", "model.hf_config", "model.pretrained_path", "data.seq_len", "data.output_dir",
    "deepspeed.stage", "run.num_workers", "run.micro_batch_size", "run.global_batch_size",
)


def resume_conflicts(saved: JobConfig, job: JobConfig) -> List[Tuple[str, Any, Any]]:
    """(key, checkpoint's value, job's value) for every RESUME_KEYS value that differs."""
    def get(cfg: JobConfig, key: str) -> Any:
        group, name = key.split(".")
        return getattr(getattr(cfg, group), name)

    return [(key, get(saved, key), get(job, key)) for key in RESUME_KEYS if get(saved, key) != get(job, key)]
