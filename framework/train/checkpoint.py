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
from typing import Any, Optional

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
    """The job config a checkpoint was trained with, typed."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(JobConfig), OmegaConf.load(os.path.join(directory, CONFIG))))


def checkpoint_dir_name(step: int) -> str:
    return f"checkpoint_{step:08d}"


def latest_checkpoint(run_dir: str) -> Optional[str]:
    """The newest local checkpoint directory of a run (for export and tests), or None."""
    if not os.path.isdir(run_dir):
        return None
    names = sorted(n for n in os.listdir(run_dir) if n.startswith("checkpoint_") and os.path.isfile(os.path.join(run_dir, n, TRAIN_STATE)))
    return os.path.join(run_dir, names[-1]) if names else None
