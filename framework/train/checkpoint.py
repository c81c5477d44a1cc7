"""Training checkpoints: what one holds, how ranks write it, how a run reads it back (on any worker count).

Layout of a checkpoint directory (each rank writes its own files; Ray Train merges them):
    latest, deepspeed/        DeepSpeed's checkpoint of every rank (ZeRO shards included); a LoRA run's holds the
                              adapters and their optimizer state only, not the frozen base (model.pretrained_path
                              in config.yaml names it: resume and export load it from there)
    zero_to_fp32.py           DeepSpeed's own consolidation script (ZeRO stages 1-3 only)
    files/rank-<r>.json       the sha256 of every file rank r wrote: export checks them before reading any
    probe.safetensors         the training engine's logits on a fixed input (framework/model.py: probe_ids),
                              with the ZeRO-3 parameters gathered inside the engine: what an export must reproduce
    train_state.json          step, rows consumed, tokens seen, the worker count and the data fingerprint
    config.yaml               the resolved config
    hf_config/config.json     the transformers model config
    tokenizer/                the tokenizer the shards were made with
    COMPLETE                  written last, once Ray Train has registered every rank's part (`MarkComplete`):
                              only checkpoints with it are resumed, exported or counted; others are removed
                              when the next one completes

Everything here is JSON, YAML or safetensors except DeepSpeed's own `*.pt` files, which DeepSpeed
reads with pickle: checkpoint storage must be writable by the job alone (docs/cluster.md).

A run resumed on another worker count (same global batch) loads the checkpoint through DeepSpeed's
universal checkpoint: `ds_to_universal` turns the ranks' ZeRO partitions into one folder per
parameter (fp32 weights and Adam moments), which any partitioning loads (docs/benchmarks.md
measures what the conversion costs).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import pyarrow.fs as pafs
import torch
from omegaconf import OmegaConf

from framework import storage
from framework.train.config import TrainRoot

DEEPSPEED_TAG = "deepspeed"
TRAIN_STATE = "train_state.json"
COMPLETE = "COMPLETE"
FILES_DIR = "files"
PROBE = "probe.safetensors"
CONFIG = "config.yaml"
HF_CONFIG_DIR = "hf_config"
TOKENIZER_DIR = "tokenizer"


@dataclass
class TrainState:
    """Where a run is: everything the sample order and the metrics need to go on from here."""

    step: int = 0
    rows: int = 0  # rows of the train split consumed: step × run.global_batch_size
    tokens: int = 0
    world_size: int = 0  # the workers that wrote the checkpoint
    data_fingerprint: str = ""  # the shards trained on (framework/data/shards.py: fingerprint)


def save(engine: Any, directory: str, state: TrainState, cfg: TrainRoot, tokenizer_uri: str, probe: torch.Tensor, rank: int) -> None:
    """Write this rank's part of a checkpoint into a local `directory` (all ranks must call it: the probe is a collective under ZeRO-3)."""
    from safetensors.torch import save_file

    if cfg.model.lora is not None:
        with _without_frozen(engine.module):
            engine.save_checkpoint(directory, tag=DEEPSPEED_TAG, exclude_frozen_parameters=True)
    else:
        engine.save_checkpoint(directory, tag=DEEPSPEED_TAG)
    logits = probe_logits(engine, probe)
    if rank == 0:
        with open(os.path.join(directory, TRAIN_STATE), "w") as f:
            json.dump(dataclasses.asdict(state), f, indent=2)
        OmegaConf.save(OmegaConf.structured(cfg), os.path.join(directory, CONFIG))
        engine.module.config.save_pretrained(os.path.join(directory, HF_CONFIG_DIR))
        storage.download_dir(tokenizer_uri, os.path.join(directory, TOKENIZER_DIR))
        save_file({"ids": probe.contiguous(), "logits": logits.contiguous()}, os.path.join(directory, PROBE))
    write_file_hashes(directory, rank)


@contextlib.contextmanager
def _without_frozen(module: torch.nn.Module) -> Any:
    """The module's state dict without its frozen weights, while the block runs.

    DeepSpeed's `exclude_frozen_parameters` drops the frozen parameters it finds by name, once each, so a
    tied copy (lm_head ↔ embed_tokens) would still be saved: the state dict loses every name of them here.
    """
    frozen = [n for n, p in module.named_parameters(remove_duplicate=False) if not p.requires_grad]

    def drop(_: torch.nn.Module, state: Dict[str, Any], prefix: str, __: Any) -> None:
        for name in frozen:
            state.pop(prefix + name, None)

    handle = module.register_state_dict_post_hook(drop)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def probe_logits(engine: Any, ids: torch.Tensor) -> torch.Tensor:
    """The engine's logits on `ids` (fp32 on the CPU), as the model trains them: its dtype, its gathered ZeRO-3 parameters."""
    engine.eval()
    try:
        return engine(input_ids=ids.to(engine.device), use_cache=False).logits.float().cpu()
    finally:
        engine.train()


def write_file_hashes(directory: str, rank: int) -> None:
    """files/rank-<rank>.json: the sha256 of every file this rank wrote into its part of the checkpoint."""
    hashes = {}
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            relative = os.path.relpath(path, directory)
            if not relative.startswith(FILES_DIR + os.sep):
                hashes[relative] = storage.file_sha256(path)
    os.makedirs(os.path.join(directory, FILES_DIR), exist_ok=True)
    with open(os.path.join(directory, FILES_DIR, f"rank-{rank}.json"), "w") as f:
        json.dump(hashes, f, indent=1, sort_keys=True)


def verify_files(directory: str) -> None:
    """Raise ValueError naming the first file of a local checkpoint that is missing or differs from what its rank wrote."""
    state = read_state(directory)
    listed = sorted(os.listdir(os.path.join(directory, FILES_DIR))) if os.path.isdir(os.path.join(directory, FILES_DIR)) else []
    wanted = [f"rank-{r}.json" for r in range(state.world_size)]
    if listed != sorted(wanted):
        raise ValueError(f"{directory}: file lists of ranks {listed} of {state.world_size} workers (a save that did not finish)")
    for name in wanted:
        with open(os.path.join(directory, FILES_DIR, name)) as f:
            for relative, sha in json.load(f).items():
                path = os.path.join(directory, relative)
                if not os.path.isfile(path):
                    raise ValueError(f"{path}: missing (written by {name[:-5]})")
                if storage.file_sha256(path) != sha:
                    raise ValueError(f"{path}: its content is not what {name[:-5]} wrote (sha256 differs: corrupted, replaced or swapped)")


def mark_complete(run_dir: str, name: str, step: int) -> None:
    """Write the COMPLETE marker into the run's checkpoint `name`, whose every part is stored, then remove older incomplete ones."""
    storage.write_json(storage.join(run_dir, name, COMPLETE), {"step": step})
    for other in checkpoint_names(run_dir):
        uri = storage.join(run_dir, other)
        if other < name and not storage.exists(storage.join(uri, COMPLETE)):
            storage.delete_dir(uri)


def to_universal(directory: str, output: str) -> str:
    """Convert the DeepSpeed checkpoint in `directory` to a universal one under `output`; gives the folder to load from."""
    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(
        input_folder=os.path.join(directory, DEEPSPEED_TAG), output_folder=os.path.join(output, DEEPSPEED_TAG),
        num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True,
    )
    # The converter narrates every file and bar on stdout; a failure still raises with its own message.
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        ds_to_universal.main(args)
    with open(os.path.join(output, "latest_universal"), "w") as f:
        f.write(DEEPSPEED_TAG)
    return output


def load(engine: Any, directory: str, adapters_only: bool = False) -> None:
    """Restore the engine (weights, optimizer, LR schedule) from a checkpoint folder: DeepSpeed's own, or one `to_universal` made.

    `adapters_only` (LoRA): the checkpoint holds the weights that train and their optimizer state; the
    frozen base the engine was built with (from model.pretrained_path, or the seed) stays as it is.
    """
    engine.load_checkpoint(directory, tag=DEEPSPEED_TAG, load_module_strict=not adapters_only)
    # DeepSpeed 0.19's ZeRO-3 universal load gives every parameter group one shared `step` tensor,
    # which the optimizer then advances once per group each step (a wrong Adam bias correction from
    # the second group on); each group gets its own counter back.
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)
    for state in base.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def read_state(directory: str) -> TrainState:
    """The run's position stored in a checkpoint (a local directory or a URI)."""
    return TrainState(**json.loads(storage.read_text(storage.join(directory, TRAIN_STATE))))


# Keys the config gained after checkpoints were first written, with what they mean for a checkpoint that
# predates them: no LoRA, text packed plain, no chat settings; an rl run's (only where `rl` is set) one step per rollout.
ADDED_KEYS = {
    "model.lora": None, "data.packing": "plain", "data.chat_template": None, "data.train_on_prompt": None,
    "data.assistant_turns": None, "data.overlong": None,
}
ADDED_RL_KEYS = {"rl.iterations": 1}


def read_config(directory: str) -> TrainRoot:
    """The config a checkpoint (a local directory or a URI) was trained with, typed."""
    saved = OmegaConf.create(storage.read_text(storage.join(directory, CONFIG)))
    added = {**ADDED_KEYS, **(ADDED_RL_KEYS if OmegaConf.select(saved, "rl") is not None else {})}
    for key, value in added.items():
        if OmegaConf.select(saved, key, default="absent") == "absent":
            OmegaConf.update(saved, key, value, force_add=True)
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainRoot), saved))


def checkpoint_dir_name(step: int) -> str:
    return f"checkpoint_{step:08d}"


def checkpoint_names(run_dir: str) -> List[str]:
    """The names of a run's checkpoint folders (complete or not), oldest first."""
    fs, path = storage.resolve(run_dir)
    return sorted(
        info.base_name
        for info in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
        if info.type == pafs.FileType.Directory and info.base_name.startswith("checkpoint_")
    )


def is_complete(checkpoint_uri: str) -> bool:
    return storage.exists(storage.join(checkpoint_uri, COMPLETE))


def latest_checkpoint(run_dir: str) -> Optional[str]:
    """The newest complete checkpoint of a run (a local directory or a URI), or None; incomplete ones never count."""
    for name in reversed(checkpoint_names(run_dir)):
        if is_complete(storage.join(run_dir, name)):
            return storage.join(run_dir, name)
    return None


# What a resumed run must share with the checkpoint it resumes: the model's shape, the ZeRO stage of
# its optimizer state, what a step means (the rows of a global batch), and the sample order (the seed and
# the shuffle window decide the rows of every step; the seed also makes a LoRA run's base when the model
# is built from config; an rl run's rl.iterations, the steps that read one batch of prompts). The worker count and the micro-batch may change (the sample order and
# DeepSpeed's universal checkpoint are independent of them), as may steps, learning rate and intervals;
# the shards are compared by fingerprint.
RESUME_KEYS = (
    "model.arch", "model.hf_config", "model.pretrained_path", "model.lora", "data.seq_len", "deepspeed.stage", "run.global_batch_size",
    "run.seed", "run.shuffle_window", "rl.iterations",
)


def resume_conflicts(saved: TrainRoot, cfg: TrainRoot) -> List[Tuple[str, Any, Any]]:
    """(key, checkpoint's value, config's value) for every RESUME_KEYS value that differs."""
    def get(c: TrainRoot, key: str) -> Any:
        group, name = key.split(".")
        return getattr(getattr(c, group), name, None)  # None: a group the run does not have (rl)

    return [(key, get(saved, key), get(cfg, key)) for key in RESUME_KEYS if get(saved, key) != get(cfg, key)]
