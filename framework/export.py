"""Training checkpoint → Hugging Face model folder (safetensors, config, tokenizer, generation config), verified.

Any checkpoint that training writes (`framework/train/checkpoint.py`) exports, whatever its ZeRO stage
and number of workers:
    ZeRO-1/2/3   DeepSpeed's own `zero_to_fp32` joins the ranks' fp32 master-weight shards; for ZeRO-3
                 it hands out one parameter at a time (lazy mode), so only one copy of the model is
                 ever held in memory.
    ZeRO-0       the full weights are in `deepspeed/mp_rank_00_model_states.pt` under `module`.
The weights go into the model the framework trains (`framework.model.build_model` from the
checkpoint's `hf_config/`), whose logits on a fixed input are the reference: the folder is written
beside `output_dir`, loaded back with `AutoModelForCausalLM.from_pretrained`, and only moved into
place when its logits match. A mismatch raises ExportError and leaves `output_dir` as it was.
"""

from __future__ import annotations

import contextlib
import glob
import io
import os
import re
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Tuple

import torch
from omegaconf import MISSING, DictConfig, OmegaConf

from framework.config import absolute, register, require, typed
from framework.train.checkpoint import CONFIG, DEEPSPEED_TAG, HF_CONFIG_DIR, TOKENIZER_DIR, TRAIN_STATE, latest_checkpoint

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Stage 0 keeps the whole model in rank 0's model states; ZeRO-1/2/3 shard it over every rank's optimizer states.
MODULE_STATES = "mp_rank_00_model_states.pt"
ZERO_SHARDS = "*_optim_states.pt"
_RANK = re.compile(r"zero_pp_rank_(\d+)_")
# The fixed input whose logits must match: a line of code (the tokenizer at work) and seeded random ids.
PROBE_TEXT = 'def fibonacci(n):\n    """The n-th Fibonacci number."""\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n'
PROBE_LEN = 32
# Reference and export run the same arithmetic on the same weights; anything past rounding is a bug.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-3}


class ExportError(RuntimeError):
    """The exported folder does not reproduce the checkpoint (weights missing, logits differ)."""


@dataclass
class ExportConfig:
    # A checkpoint directory, a run directory (its latest checkpoint), or a run name under `runs_dir`.
    checkpoint: str = MISSING
    # The Hugging Face folder to write (replaced if it holds an earlier export); null: outputs/export/<run>.
    output_dir: Optional[str] = MISSING
    runs_dir: Optional[str] = MISSING
    dtype: str = MISSING  # fp32 | bf16 | fp16: the weights' dtype in the folder
    # Largest safetensors file; bigger models are split into shards with an index.
    max_shard_size: str = MISSING


@dataclass
class ExportJobConfig:
    export: ExportConfig = field(default_factory=ExportConfig)


# Registered on import (`conf/export.yaml` names it) so that `compose(..., "export")` finds it from any entry point.
register("export_schema", ExportJobConfig)


# ---------------------------------------------------------------------------------------------
# Config: typing, checks, and finding the checkpoint

def to_export_config(cfg: DictConfig | Dict[str, Any]) -> ExportConfig:
    """Type the `export` node of a composed config as ExportConfig."""
    return typed(ExportConfig, cfg["export"] if "export" in cfg else cfg, "export", example="outputs/runs/RUN")


def resolve_checkpoint(value: str, runs_dir: Optional[str] = None) -> str:
    """The checkpoint directory `value` names: itself, a run directory's latest checkpoint, or (with `runs_dir`) a run name's."""
    key = "export.checkpoint"
    require("://" not in value, key, value, "expected a local directory; copy the checkpoint from storage first")
    by_name = runs_dir is not None and not (os.path.isabs(value) or os.path.isdir(value))
    candidates = [value, os.path.join(runs_dir, value)] if by_name else [value]
    path = next((c for c in candidates if os.path.isdir(c)), None)
    nor_run = "" if len(candidates) == 1 else f", nor a run of that name in export.runs_dir={runs_dir}"
    require(path is not None, key, value, f"no such directory{nor_run}")
    if not os.path.isfile(os.path.join(path, TRAIN_STATE)):
        latest = latest_checkpoint(path)
        require(
            latest is not None, key, value,
            f"not a training checkpoint (no {TRAIN_STATE}) nor a run directory with checkpoint_* directories",
        )
        path = latest
    path = absolute(path)
    for part in (os.path.join(HF_CONFIG_DIR, "config.json"), TOKENIZER_DIR, DEEPSPEED_TAG):
        require(os.path.exists(os.path.join(path, part)), key, value, f"incomplete checkpoint {path}: no {part}")
    ds_dir = os.path.join(path, DEEPSPEED_TAG)
    shards = glob.glob(os.path.join(ds_dir, ZERO_SHARDS))
    require(
        bool(shards) or os.path.isfile(os.path.join(ds_dir, MODULE_STATES)),
        key, value, f"incomplete checkpoint {path}: {DEEPSPEED_TAG}/ holds neither ZeRO shards nor {MODULE_STATES}",
    )
    if shards:
        # Every rank writes one shard; a run killed mid-save or a partial copy leaves some out.
        ranks = sorted(int(m.group(1)) for m in (_RANK.search(os.path.basename(f)) for f in shards) if m)
        workers = _num_workers(path) or len(ranks)
        require(
            ranks == list(range(workers)), key, value,
            f"incomplete checkpoint {path}: ZeRO shards for ranks {ranks} of {workers} workers",
        )
    return path


def _num_workers(checkpoint_dir: str) -> Optional[int]:
    """run.num_workers of the job that wrote the checkpoint, or None if its config.yaml does not say."""
    try:
        return int(OmegaConf.load(os.path.join(checkpoint_dir, CONFIG)).run.num_workers)
    except Exception:  # noqa: BLE001 - the shards alone are checked then
        return None


def default_output_dir(checkpoint_dir: str) -> str:
    """outputs/export/<run name>, the run being the checkpoint's parent directory."""
    return os.path.join("outputs", "export", os.path.basename(os.path.dirname(os.path.abspath(checkpoint_dir))))


def check_output_dir(output_dir: str, checkpoint_dir: str) -> None:
    """An existing `output_dir` is replaced only when it is a model folder (an earlier export)."""
    key = "export.output_dir"
    require("://" not in output_dir, key, output_dir, "expected a local directory")
    require(not os.path.isfile(output_dir), key, output_dir, "is a file; expected a directory to write the model folder to")
    out, ckpt = os.path.abspath(output_dir), os.path.abspath(checkpoint_dir)
    require(
        os.path.commonpath([out, ckpt]) not in (out, ckpt), key, output_dir,
        f"overlaps the checkpoint {checkpoint_dir}; choose a directory outside it",
    )
    if os.path.isdir(output_dir) and os.listdir(output_dir):
        require(
            os.path.isfile(os.path.join(output_dir, "config.json")), key, output_dir,
            "exists and is not a model folder; choose a new or empty directory",
        )


def validate_export(export: ExportConfig) -> Tuple[str, str]:
    """Check the export config; gives (checkpoint directory, output directory)."""
    require(export.dtype in DTYPES, "export.dtype", export.dtype, f"expected one of {tuple(DTYPES)}")
    require(_shard_size_ok(export.max_shard_size), "export.max_shard_size", export.max_shard_size, "expected a size such as 5GB or 500MB")
    checkpoint_dir = resolve_checkpoint(export.checkpoint, export.runs_dir)
    output_dir = export.output_dir or default_output_dir(checkpoint_dir)
    check_output_dir(output_dir, checkpoint_dir)
    return checkpoint_dir, output_dir


def _shard_size_ok(size: str) -> bool:
    from transformers.utils.hub import convert_file_size_to_int

    try:
        return convert_file_size_to_int(size) > 0
    except (ValueError, TypeError):
        return False


def check_export(cfg: DictConfig) -> None:
    """The check for `launch/export.py`: schema, values, and the checkpoint itself (before any weights are read)."""
    validate_export(to_export_config(cfg))


# ---------------------------------------------------------------------------------------------
# Weights: consolidation and the reference model

def consolidated_weights(checkpoint_dir: str) -> Mapping[str, Any]:
    """Every parameter of the checkpoint by name, full size; values are tensors or lazy tensors (`.contiguous()`)."""
    ds_dir = os.path.join(checkpoint_dir, DEEPSPEED_TAG)
    if not glob.glob(os.path.join(ds_dir, ZERO_SHARDS)):
        # ZeRO-0: memory-mapped, so tensors are read from disk as they are copied into the model.
        return torch.load(os.path.join(ds_dir, MODULE_STATES), map_location="cpu", mmap=True, weights_only=False)["module"]
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    # DeepSpeed narrates each file and bar; a failure still raises with its own message.
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag=DEEPSPEED_TAG, lazy_mode=True)


def load_weights(model: torch.nn.Module, weights: Mapping[str, Any], dtype: torch.dtype) -> None:
    """Fill `model` with `weights` one tensor at a time, cast to `dtype`; every parameter must be there, none extra."""
    expected = model.state_dict(keep_vars=True)
    unexpected = sorted(set(weights) - set(expected))
    if unexpected:
        raise ExportError(f"checkpoint weights the model does not have: {', '.join(unexpected[:5])}")
    filled, missing = set(), []
    for name, target in expected.items():
        if id(target) in filled:
            continue  # tied to a parameter filled already (lm_head ↔ embed_tokens)
        if name not in weights:
            missing.append(name)
            continue
        source = weights[name].contiguous()
        if tuple(source.shape) != tuple(target.shape):
            raise ExportError(f"{name}: checkpoint shape {tuple(source.shape)} != model shape {tuple(target.shape)}")
        # A copy of its own: DeepSpeed's tensors are views into flat buffers or a memory-mapped file.
        target.data = source.to(dtype if source.is_floating_point() else source.dtype, copy=True)
        filled.add(id(target))
    if missing:
        raise ExportError(f"the checkpoint has no weights for: {', '.join(missing[:5])}")


def reference_model(checkpoint_dir: str, dtype: torch.dtype) -> Any:
    """The framework's model from the checkpoint's `hf_config/`, holding the checkpoint's consolidated weights."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    config = AutoConfig.from_pretrained(os.path.join(checkpoint_dir, HF_CONFIG_DIR), local_files_only=True)
    # No random init: every weight is overwritten, and untouched empty tensors cost no memory.
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    load_weights(model, consolidated_weights(checkpoint_dir), dtype)
    model.tie_weights()
    model.config.use_cache = True  # training turned the KV cache off; generation wants it
    return model.eval()


# ---------------------------------------------------------------------------------------------
# The folder and its verification

def probe_ids(tokenizer: Any, config: Any) -> torch.Tensor:
    """Two rows of PROBE_LEN ids: the tokenized PROBE_TEXT (repeated to length) and seeded random ids."""
    from framework.model import max_positions

    length = min(PROBE_LEN, max_positions(config) or PROBE_LEN)
    text = tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"] or [0]
    row = (text * (length // len(text) + 1))[:length]
    random = torch.randint(config.vocab_size, (length,), generator=torch.Generator().manual_seed(0))
    return torch.stack([torch.tensor(row), random])


@torch.no_grad()
def logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits.float()


def prepare_tokenizer(checkpoint_dir: str, config: Any) -> Any:
    """The checkpoint's tokenizer, with a pad token (eos) and the model's context length."""
    from transformers import AutoTokenizer

    from framework.model import max_positions

    tokenizer = AutoTokenizer.from_pretrained(os.path.join(checkpoint_dir, TOKENIZER_DIR), local_files_only=True)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # batched generation pads with it
    if max_positions(config):
        tokenizer.model_max_length = max_positions(config)
    return tokenizer


def generation_config(tokenizer: Any) -> Any:
    """bos/eos/pad from the tokenizer, so that `generate` stops at the end of a document and can batch."""
    from transformers import GenerationConfig

    return GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )


def verify(folder: str, ids: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, tokenizer: Any) -> float:
    """Load `folder` as a user would and check its logits, dtype, tokenizer; gives the largest logit difference."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype="auto")
    if model.dtype != dtype:
        raise ExportError(f"{folder} loads as {model.dtype}, expected {dtype}")
    got = logits(model.eval(), ids)
    del model
    if got.shape != expected.shape:
        raise ExportError(f"{folder}: logits of shape {tuple(got.shape)}, the checkpoint's are {tuple(expected.shape)}")
    diff = (got - expected).abs().max().item()
    tolerance = TOLERANCE[dtype] * max(1.0, expected.abs().max().item())
    if not diff <= tolerance:  # also catches NaN
        raise ExportError(
            f"{folder}: logits differ from the checkpoint's by up to {diff:.3g} (tolerance {tolerance:.3g}) on the fixed input"
        )
    reloaded = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if reloaded(PROBE_TEXT, add_special_tokens=False)["input_ids"] != tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]:
        raise ExportError(f"{folder}: the saved tokenizer encodes differently from the checkpoint's")
    generation = GenerationConfig.from_pretrained(folder, local_files_only=True)
    if (generation.eos_token_id, generation.pad_token_id) != (tokenizer.eos_token_id, tokenizer.pad_token_id):
        raise ExportError(f"{folder}: generation_config.json eos/pad do not match the tokenizer's")
    return diff


def _share_permissions(folder: str) -> None:
    """Ordinary permissions (as the umask allows) for the folder and its files: mkdtemp and safetensors make them private."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for name in os.listdir(folder):
        os.chmod(os.path.join(folder, name), 0o666 & ~umask)


@contextlib.contextmanager
def _quiet_progress_bars():
    """transformers' per-shard progress bars add nothing to one export line; restored afterwards."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _replace_dir(staged: str, output_dir: str) -> None:
    """Move the verified folder into place; an earlier export there is removed only after the move."""
    old = None
    if os.path.exists(output_dir):
        old = f"{output_dir}.old-{uuid.uuid4().hex[:8]}"
        os.rename(output_dir, old)
    os.rename(staged, output_dir)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def export_checkpoint(checkpoint_dir: str, output_dir: str, *, dtype: str = "fp32", max_shard_size: str = "5GB") -> str:
    """Write `checkpoint_dir` (or a run directory's latest checkpoint) as a verified Hugging Face folder; gives `output_dir`.

    Raises ConfigError (one line naming the key) for a path that is not a checkpoint, and ExportError when
    the written folder does not reproduce the checkpoint's logits; `output_dir` is then left untouched.
    """
    checkpoint_dir, output_dir = validate_export(
        ExportConfig(checkpoint=checkpoint_dir, output_dir=output_dir, runs_dir=None, dtype=dtype, max_shard_size=max_shard_size)
    )
    torch_dtype = DTYPES[dtype]
    model = reference_model(checkpoint_dir, torch_dtype)
    tokenizer = prepare_tokenizer(checkpoint_dir, model.config)
    model.generation_config = generation_config(tokenizer)
    ids = probe_ids(tokenizer, model.config)
    expected = logits(model, ids)

    output_dir = os.path.abspath(output_dir)
    parent = os.path.dirname(output_dir)
    os.makedirs(parent, exist_ok=True)
    # Written beside the target (same filesystem, so the final move is a rename) and moved only once verified.
    staged = tempfile.mkdtemp(prefix=f".{os.path.basename(output_dir)}.partial-", dir=parent)
    try:
        with _quiet_progress_bars():
            model.save_pretrained(staged, max_shard_size=max_shard_size)
            tokenizer.save_pretrained(staged)
            params = sum(p.numel() for p in model.parameters())
            del model  # one model in memory at a time: the exported one is loaded next
            diff = verify(staged, ids, expected, torch_dtype, tokenizer)
        _share_permissions(staged)
        _replace_dir(staged, output_dir)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    print(
        f"export: {checkpoint_dir} → {output_dir}: {params / 1e6:.2f}M parameters, {dtype}, "
        f"logits match the checkpoint's (max |Δ| = {diff:.2g})",
        flush=True,
    )
    return output_dir


def run(cfg: DictConfig) -> str:
    """Export the checkpoint `export.checkpoint` names to `export.output_dir`; gives the folder."""
    export = to_export_config(cfg)
    checkpoint_dir, output_dir = validate_export(export)
    return export_checkpoint(checkpoint_dir, output_dir, dtype=export.dtype, max_shard_size=export.max_shard_size)


__all__ = ["ExportConfig", "ExportError", "check_export", "export_checkpoint", "resolve_checkpoint", "run"]
