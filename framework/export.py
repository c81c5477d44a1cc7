"""Training checkpoint → Hugging Face model folder (safetensors, config, tokenizer, generation config), verified.

Any complete checkpoint that training writes (`framework/train/checkpoint.py`), local or on object
storage, exports whatever its ZeRO stage and number of workers:
    ZeRO-1/2/3   DeepSpeed's own `zero_to_fp32` joins the ranks' fp32 master-weight shards; for ZeRO-3
                 it hands out one parameter at a time (lazy mode), so only one copy of the model is
                 ever held in memory.
    ZeRO-0       the full weights are in `deepspeed/mp_rank_00_model_states.pt` under `module`
                 (read with torch.load(weights_only=True)).
Before any weight is read, every file is checked against the sha256 its rank recorded when it wrote
it (`files/rank-<r>.json`): a corrupted, replaced or swapped shard fails in one line naming the file.
The reference the folder must reproduce is not the merged tensors it saves but the training engine's
own logits on a fixed input (`probe.safetensors`), computed at save time with the ZeRO-3 parameters
gathered inside DeepSpeed: a merge that joins the shards wrongly cannot match them. The folder is
written beside `output_dir`, loaded back with `AutoModelForCausalLM.from_pretrained`, and moved into
place only when it matches. An existing `output_dir` is replaced only when it holds an earlier export
(its `export.json`): any other folder is refused, so nothing of the user's is ever deleted.

A LoRA checkpoint (model.lora in its config.yaml) holds the adapters alone: the base is loaded again from
the `model.pretrained_path` its config.yaml records (or, for a model built from config, rebuilt from its
seed), the adapters are put on it with peft and merged into its weights, and the merged folder is verified
like any other. With `export.adapter=true` the PEFT adapter folder is written too, as `adapter/` inside the
export (`PeftModel.from_pretrained(base, "<output_dir>/adapter")`), and verified the same way: loaded onto
the base with peft, its logits must be the training engine's.
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, Iterator, Mapping, Optional, Tuple

import pyarrow.fs as pafs
import torch
from omegaconf import MISSING, DictConfig

from framework import storage
from framework.config import Job, RunError, absolute, register, require, typed
from framework.hf_folder import ADAPTER_DIR, DTYPE_NAMES, check_output_dir, quiet_progress_bars, replace_dir, share_permissions
from framework.hf_folder import max_positions
from framework.model import PROBE_TEXT, dtype_named, pad_token_id
from framework.tracking import TrackingConfig
from framework.train import checkpoint as ckpt

# Stage 0 keeps the whole model in rank 0's model states; ZeRO-1/2/3 shard it over every rank's optimizer states.
MODULE_STATES = "mp_rank_00_model_states.pt"
ZERO_SHARDS = "*_optim_states.pt"
# What an export writes into its folder beside the weights: where it came from. An output_dir holding it
# may be replaced by a new export; one without it is not ours to delete.
EXPORT_MARKER = "export.json"
# Training engine and exported model run the same arithmetic on the same weights: a difference past
# the rounding of the coarser of the two dtypes is a bug.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-3}


class ExportError(RunError):
    """The checkpoint or the folder written from it is not what training saved (a file differs, logits differ)."""


@dataclass
class ExportConfig:
    # A checkpoint directory, a run directory (its latest complete checkpoint), a run name under
    # `runs_dir`, or the same on object storage (s3://...).
    checkpoint: str = MISSING
    # The Hugging Face folder to write (replaced only if it holds an earlier export); null: outputs/export/<run>.
    output_dir: Optional[str] = MISSING
    runs_dir: Optional[str] = MISSING
    dtype: str = MISSING  # fp32 | bf16 | fp16: the weights' dtype in the folder
    # Largest safetensors file; bigger models are split into shards with an index.
    max_shard_size: str = MISSING
    # LoRA checkpoints: also write the PEFT adapter folder (`adapter/` in the export) beside the merged model.
    adapter: bool = MISSING


@dataclass
class ExportRoot:
    """The root of conf/export.yaml."""

    export: ExportConfig = field(default_factory=ExportConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


# Registered on import (`conf/export.yaml` names it) so that `compose(..., "export")` finds it from any entry point.
register("export_schema", ExportRoot)


# ---------------------------------------------------------------------------------------------
# Config: typing, checks, and finding the checkpoint

def to_export_config(cfg: DictConfig | Dict[str, Any]) -> ExportConfig:
    """Type the `export` node of a composed config as ExportConfig."""
    return typed(ExportConfig, cfg["export"] if "export" in cfg else cfg, "export", example="outputs/runs/RUN")


def resolve_checkpoint(value: str, runs_dir: Optional[str] = None) -> str:
    """The complete checkpoint `value` names (a local path or a URI): itself, a run directory's latest, or a run name's."""
    key = "export.checkpoint"
    by_name = runs_dir is not None and "://" not in value and not (os.path.isabs(value) or os.path.isdir(value))
    candidates = [value, storage.join(runs_dir, value)] if by_name else [value]
    path = next((c for c in candidates if storage.exists(c)), None)
    nor_run = "" if len(candidates) == 1 else f", nor a run of that name in export.runs_dir={runs_dir}"
    require(path is not None, key, value, f"no such directory{nor_run}")
    if not storage.exists(storage.join(path, ckpt.TRAIN_STATE)):
        latest = ckpt.latest_checkpoint(path)
        incomplete = ckpt.checkpoint_names(path)
        require(
            latest is not None, key, value,
            f"no complete checkpoint in this run ({', '.join(incomplete)} never completed)" if incomplete
            else f"not a training checkpoint (no {ckpt.TRAIN_STATE}) nor a run directory with checkpoint_* directories",
        )
        path = latest
    path = absolute(path)
    require(
        ckpt.is_complete(path), key, value,
        f"incomplete checkpoint {path}: no {ckpt.COMPLETE} marker (a save that did not finish); export the run's latest complete one",
    )
    for part in (storage.join(ckpt.HF_CONFIG_DIR, "config.json"), ckpt.TOKENIZER_DIR, ckpt.DEEPSPEED_TAG, ckpt.PROBE):
        require(storage.exists(storage.join(path, part)), key, value, f"checkpoint {path} has no {part} (written by an older version?)")
    return path


def default_export_dir(checkpoint: str) -> str:
    """outputs/export/<run name>, the run being the checkpoint's parent directory."""
    path = checkpoint.split("?", 1)[0].rstrip("/")  # a URI's query (an endpoint) is no part of the name
    return os.path.join("outputs", "export", path.rsplit("/", 2)[-2])


def validate_export(export: ExportConfig) -> Tuple[str, str]:
    """Check the export config; gives (checkpoint, output directory)."""
    require(export.dtype in DTYPE_NAMES, "export.dtype", export.dtype, f"expected one of {DTYPE_NAMES}")
    require(_shard_size_ok(export.max_shard_size), "export.max_shard_size", export.max_shard_size, "expected a size such as 5GB or 500MB")
    checkpoint = resolve_checkpoint(export.checkpoint, export.runs_dir)
    output_dir = export.output_dir or default_export_dir(checkpoint)
    check_output_dir(output_dir, checkpoint, "export.output_dir", EXPORT_MARKER, "export", "the checkpoint")
    check_not_a_base(output_dir, checkpoint, export.runs_dir)
    check_base(checkpoint, export.adapter)
    return checkpoint, output_dir


def recorded_bases(runs_dir: str) -> Iterator[Tuple[str, str]]:
    """(checkpoint, its model.pretrained_path) for every checkpoint of every run under `runs_dir` built from a model folder."""
    from omegaconf import OmegaConf

    fs, path = storage.resolve(runs_dir)
    for run in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)):
        if run.type != pafs.FileType.Directory:
            continue
        run_dir = storage.join(runs_dir, run.base_name)
        for name in ckpt.checkpoint_names(run_dir):
            config = storage.join(run_dir, name, ckpt.CONFIG)
            if storage.exists(config):
                base = OmegaConf.select(OmegaConf.create(storage.read_text(config)), "model.pretrained_path")
                if base:
                    yield storage.join(run_dir, name), base


def check_not_a_base(output_dir: str, checkpoint: str, runs_dir: Optional[str]) -> None:
    """`output_dir` must not hold the base (model.pretrained_path) of a run beside the checkpoint or under `runs_dir`:
    an earlier export there would be replaced, and a LoRA run on it would resume and export on another base."""
    path, _, query = checkpoint.partition("?")
    beside = path.rstrip("/").rsplit("/", 2)[0] + (f"?{query}" if query else "")  # the runs directory holding the checkpoint's run
    out = os.path.realpath(output_dir)
    for root in dict.fromkeys([beside, *([absolute(runs_dir)] if runs_dir else [])]):
        for recorded, base in recorded_bases(root):
            require(
                os.path.commonpath([out, os.path.realpath(base)]) != out, "export.output_dir", output_dir,
                f"holds model.pretrained_path={base}, the base of checkpoint {recorded}: replaced, that run would resume and "
                f"export on another base; choose another directory",
            )


def check_base(checkpoint: str, adapter: bool) -> None:
    """A LoRA checkpoint needs its base folder here; export.adapter=true needs a LoRA checkpoint."""
    model = ckpt.read_config(checkpoint).model
    require(
        not adapter or model.lora is not None, "export.adapter", adapter,
        f"checkpoint {checkpoint} trained every weight (model.lora=null): it has no adapter to write",
    )
    if model.lora is not None and model.pretrained_path is not None:
        require(
            os.path.isfile(os.path.join(model.pretrained_path, "config.json")), "export.checkpoint", checkpoint,
            f"a LoRA checkpoint holds its adapters alone, and its base model.pretrained_path={model.pretrained_path} (its "
            f"config.yaml) is not a model folder here: make the base available at that path",
        )


def _shard_size_ok(size: str) -> bool:
    from transformers.utils.hub import convert_file_size_to_int

    try:
        return convert_file_size_to_int(size) > 0
    except (ValueError, TypeError):
        return False


def load_export(cfg: DictConfig) -> ExportRoot:
    """`launch/export.py`'s root: the `export` node typed and checked with the checkpoint itself (before any weights are
    read), its checkpoint resolved to one complete checkpoint and its output_dir to the folder to write; the tracking."""
    from framework.tracking import check_tracking

    export = to_export_config(cfg)
    checkpoint, output_dir = validate_export(export)
    tracking = typed(TrackingConfig, cfg["tracking"], "tracking")
    check_tracking(tracking)
    return ExportRoot(replace(export, checkpoint=checkpoint, output_dir=output_dir), tracking)


EXPORT = Job("export", load=load_export)


@contextlib.contextmanager
def local_checkpoint(checkpoint: str) -> Iterator[str]:
    """The checkpoint as a local directory: itself, or a temporary copy of one on object storage."""
    if "://" not in checkpoint:
        yield checkpoint
        return
    with tempfile.TemporaryDirectory(prefix="export-") as tmp:
        storage.download_dir(checkpoint, tmp)
        yield tmp


# ---------------------------------------------------------------------------------------------
# Weights: consolidation into the model

def consolidated_weights(checkpoint_dir: str) -> Mapping[str, Any]:
    """Every parameter of the checkpoint by name, full size; values are tensors or lazy tensors (`.contiguous()`)."""
    ds_dir = os.path.join(checkpoint_dir, ckpt.DEEPSPEED_TAG)
    if not glob.glob(os.path.join(ds_dir, ZERO_SHARDS)):
        # ZeRO-0: memory-mapped, so tensors are read from disk as they are copied into the model.
        return torch.load(os.path.join(ds_dir, MODULE_STATES), map_location="cpu", mmap=True, weights_only=True)["module"]
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    # DeepSpeed narrates each file and bar; a failure still raises with its own message.
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag=ckpt.DEEPSPEED_TAG, lazy_mode=True)


def load_weights(model: torch.nn.Module, weights: Mapping[str, Any], dtype: torch.dtype, trainable_only: bool = False) -> None:
    """Fill `model` with `weights` one tensor at a time, cast to `dtype`; every parameter must be there, none extra.

    `trainable_only` (LoRA): the weights are those of the parameters that train; the frozen ones keep their values.
    """
    expected = model.state_dict(keep_vars=True)
    if trainable_only:
        expected = {name: p for name, p in expected.items() if isinstance(p, torch.nn.Parameter) and p.requires_grad}
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


def merged_model(checkpoint_dir: str, dtype: torch.dtype, adapter_dir: Optional[str] = None) -> Any:
    """The checkpoint's model (from its `hf_config/`) holding the checkpoint's consolidated weights in `dtype`.

    A LoRA checkpoint's adapters are put on its base (`lora_base`) and merged into it; with `adapter_dir` the
    PEFT adapter folder is saved there first.
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    config = AutoConfig.from_pretrained(os.path.join(checkpoint_dir, ckpt.HF_CONFIG_DIR), local_files_only=True)
    cfg = ckpt.read_config(checkpoint_dir)
    if cfg.model.lora is not None:
        from framework.model import with_lora

        model = with_lora(lora_base(cfg, config), cfg.model.lora)
        load_weights(model, consolidated_weights(checkpoint_dir), torch.float32, trainable_only=True)
        if adapter_dir is not None:
            model.save_pretrained(adapter_dir)
        model = model.merge_and_unload().to(dtype)
    else:
        # No random init: every weight is overwritten, and untouched empty tensors cost no memory.
        with no_init_weights():
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        load_weights(model, consolidated_weights(checkpoint_dir), dtype)
    model.tie_weights()
    model.config.use_cache = True  # training turned the KV cache off; generation wants it
    return model.eval()


def lora_base(cfg: Any, config: Any) -> Any:
    """The frozen base a LoRA run trained on, as training built it: model.pretrained_path's weights, or the run's seed's."""

    from framework.model import build_model

    base = build_model(replace(cfg.model, lora=None, activation_checkpointing=False), config, cfg.run.seed)
    base.config.use_cache = True
    return base


# ---------------------------------------------------------------------------------------------
# The folder and its verification

@torch.no_grad()
def logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits.float()


def training_probe(checkpoint_dir: str) -> Tuple[torch.Tensor, torch.Tensor, torch.dtype]:
    """(ids, logits, dtype): the fixed input and the training engine's logits on it, and the dtype it trained in."""
    from safetensors.torch import load_file

    from framework.model import torch_dtype

    probe = load_file(os.path.join(checkpoint_dir, ckpt.PROBE))
    cfg = ckpt.read_config(checkpoint_dir)
    return probe["ids"], probe["logits"], torch_dtype(cfg.run.precision, cfg.run.gpus_per_worker > 0)


def prepare_tokenizer(checkpoint_dir: str, config: Any) -> Any:
    """The checkpoint's tokenizer, with a pad token (eos) and the model's context length."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(os.path.join(checkpoint_dir, ckpt.TOKENIZER_DIR), local_files_only=True)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # batched generation pads with it
    if max_positions(config):
        tokenizer.model_max_length = max_positions(config)
    return tokenizer


def generation_config(tokenizer: Any) -> Any:
    """bos/eos/pad from the tokenizer, so that `generate` stops at the end of a document and can batch."""
    from transformers import GenerationConfig

    return GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=pad_token_id(tokenizer))


def verify(folder: str, ids: torch.Tensor, expected: torch.Tensor, tolerance: float, dtype: torch.dtype, tokenizer: Any,
           lora: bool = False) -> float:
    """Load `folder` as a user would and check its logits against the training engine's, its dtype and tokenizer; gives the largest logit difference."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype="auto")
    if model.dtype != dtype:
        raise ExportError(f"{folder} loads as {model.dtype}, expected {dtype}")
    got = logits(model.eval(), ids)
    del model
    if got.shape != expected.shape:
        raise ExportError(f"{folder}: logits of shape {tuple(got.shape)}, the training engine's are {tuple(expected.shape)}")
    diff = (got - expected).abs().max().item()
    if not diff <= tolerance:  # also catches NaN
        why = ("the adapters on this base are not the model that trained (has the base at model.pretrained_path changed "
               "since?)" if lora else "the checkpoint's shards do not join into the model that trained")
        raise ExportError(
            f"{folder}: logits differ from the training engine's by up to {diff:.3g} (tolerance {tolerance:.3g}) on the fixed input: {why}"
        )
    reloaded = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if reloaded(PROBE_TEXT, add_special_tokens=False)["input_ids"] != tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]:
        raise ExportError(f"{folder}: the saved tokenizer encodes differently from the checkpoint's")
    generation = GenerationConfig.from_pretrained(folder, local_files_only=True)
    if (generation.eos_token_id, generation.pad_token_id) != (tokenizer.eos_token_id, tokenizer.pad_token_id):
        raise ExportError(f"{folder}: generation_config.json eos/pad do not match the tokenizer's")
    return diff


def verify_adapter(adapter_dir: str, checkpoint_dir: str, ids: torch.Tensor, expected: torch.Tensor, tolerance: float) -> float:
    """Load the adapter folder onto its base with peft as a user would; its logits must be the training engine's."""
    from peft import PeftModel
    from transformers import AutoConfig

    cfg = ckpt.read_config(checkpoint_dir)
    config = AutoConfig.from_pretrained(os.path.join(checkpoint_dir, ckpt.HF_CONFIG_DIR), local_files_only=True)
    model = PeftModel.from_pretrained(lora_base(cfg, config), adapter_dir).eval()
    got = logits(model, ids)
    del model
    diff = (got - expected).abs().max().item()
    if not diff <= tolerance:
        raise ExportError(f"{adapter_dir}: the adapter on its base gives logits up to {diff:.3g} from the training engine's (tolerance {tolerance:.3g})")
    return diff


def export_checkpoint(
    checkpoint: str, output_dir: Optional[str], *, dtype: Optional[str] = None, max_shard_size: Optional[str] = None,
    adapter: Optional[bool] = None, tracking: Optional[TrackingConfig] = None,
) -> str:
    """Write a complete checkpoint (or a run's latest) as a verified Hugging Face folder; gives the folder.

    `dtype`, `max_shard_size` and `adapter` left out take conf/export.yaml's values (what launch/export.py uses). Raises ConfigError (one line naming the key) for a path that is not a complete checkpoint or an
    output_dir that is not ours to replace, and ExportError when a file or the written folder is not
    what training saved; `output_dir` is then left untouched.
    """
    if dtype is None or max_shard_size is None or adapter is None:
        from framework.config import compose

        configured = to_export_config(compose(["export.checkpoint=unused"], "export"))
        dtype, max_shard_size = dtype or configured.dtype, max_shard_size or configured.max_shard_size
        adapter = configured.adapter if adapter is None else adapter
    checkpoint, output_dir = validate_export(
        ExportConfig(checkpoint=checkpoint, output_dir=output_dir, runs_dir=None, dtype=dtype, max_shard_size=max_shard_size, adapter=adapter)
    )
    target_dtype = dtype_named(dtype)
    output_dir = os.path.abspath(output_dir)
    parent = os.path.dirname(output_dir)
    os.makedirs(parent, exist_ok=True)
    # Written beside the target (same filesystem, so the final move is a rename) and moved only once verified.
    staged = tempfile.mkdtemp(prefix=f".{os.path.basename(output_dir)}.partial-", dir=parent)
    adapter_dir = os.path.join(staged, ADAPTER_DIR) if adapter else None
    try:
        with local_checkpoint(checkpoint) as checkpoint_dir:
            try:
                ckpt.verify_files(checkpoint_dir)
            except ValueError as exc:
                raise ExportError(str(exc)) from None
            ids, expected, trained_dtype = training_probe(checkpoint_dir)
            with quiet_progress_bars():
                model = merged_model(checkpoint_dir, target_dtype, adapter_dir)
            tokenizer = prepare_tokenizer(checkpoint_dir, model.config)
            state = ckpt.read_state(checkpoint_dir)
            lora = ckpt.read_config(checkpoint_dir).model.lora is not None
            model.generation_config = generation_config(tokenizer)
            coarser = max(TOLERANCE[target_dtype], TOLERANCE[trained_dtype])
            tolerance = coarser * max(1.0, expected.abs().max().item())
            with quiet_progress_bars():
                model.save_pretrained(staged, max_shard_size=max_shard_size)
                tokenizer.save_pretrained(staged)
                params = sum(p.numel() for p in model.parameters())
                del model  # one model in memory at a time: the exported one is loaded next
                diff = verify(staged, ids, expected, tolerance, target_dtype, tokenizer, lora)
                if adapter_dir is not None:
                    # The adapter is fp32 on an fp32 base, whatever export.dtype: the training dtype's rounding alone.
                    verify_adapter(adapter_dir, checkpoint_dir, ids, expected, TOLERANCE[trained_dtype] * max(1.0, expected.abs().max().item()))
        with open(os.path.join(staged, EXPORT_MARKER), "w") as f:
            json.dump({"checkpoint": checkpoint, "step": state.step, "dtype": dtype, "max_logit_difference": diff,
                       "adapter": ADAPTER_DIR if adapter else None}, f, indent=2)
        share_permissions(staged)
        replace_dir(staged, output_dir)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    if tracking is not None and tracking.backend != "none":
        track_export(tracking, checkpoint, output_dir, {"checkpoint": checkpoint, "output_dir": output_dir, "dtype": dtype,
                                                        "max_shard_size": max_shard_size, "adapter": adapter}, diff)
    merged = "LoRA adapters merged, " if lora else ""
    with_adapter = f"; PEFT adapter folder in {os.path.join(output_dir, ADAPTER_DIR)}" if adapter else ""
    print(
        f"export: {checkpoint} (step {state.step}) → {output_dir}: {merged}{params / 1e6:.2f}M parameters, {dtype}, "
        f"logits match the training engine's (max |Δ| = {diff:.2g}){with_adapter}",
        flush=True,
    )
    return output_dir


def track_export(tracking: TrackingConfig, checkpoint: str, folder: str, params: Dict[str, Any], diff: float) -> None:
    """The export as an MLflow run (a child of the training run that made the checkpoint), its folder registered as a
    model version; the run and version are added to the folder's export.json."""
    from framework import tracking as track

    parent = track.parent_of(storage.join(os.path.dirname(checkpoint.rstrip("/")), track.TRACKING_FILE))  # the run dir's
    ref = track.start_run(tracking, "export", os.path.basename(folder), {"export": params}, parent=parent)
    ok = False
    try:
        track.log_metrics(ref, [{"step": 0, "export/max_logit_difference": diff}])
        version = track.register_folder(tracking, ref, folder)
        ok = True
    finally:
        track.end_run(ref, ok)
    path = os.path.join(folder, EXPORT_MARKER)
    with open(path) as f:
        record = json.load(f)
    record["mlflow"] = {**ref.as_dict(), "model_version": version}
    storage.write_json(path, record)
    registered = f", registered as {version['name']} version {version['version']}" if version else ""
    print(f"export: MLflow run {ref.run_id}{registered}", flush=True)


__all__ = ["EXPORT", "ExportConfig", "ExportError", "export_checkpoint", "load_export", "resolve_checkpoint", "scoring_shards",
           "training_shards"]


def training_shards(folder: Path) -> Optional[str]:
    """The shards an exported folder was trained on, when its export.json names a checkpoint that is still there
    and the shards there are still those it trained on; else None."""
    from framework.data.shards import MANIFEST, fingerprint

    try:
        checkpoint = json.loads((Path(folder) / EXPORT_MARKER).read_text())["checkpoint"]
        data_dir = ckpt.read_config(checkpoint).data.output_dir
        trained_on = ckpt.read_state(checkpoint).data_fingerprint
        manifest = storage.read_json(storage.join(data_dir, MANIFEST))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    # The same path re-prepared with other data (or another tokenizer) is not what the model trained on.
    return data_dir if not trained_on or fingerprint(manifest) == trained_on else None


def scoring_shards(data_dir: Optional[str], folder: Path, key: str) -> str:
    """The prepared shards a folder's perplexity is measured on (`data_dir`, or if None those `training_shards`
    finds): there, and tokenised as the folder's own tokenizer tokenises. `key` is the config key errors name."""
    from transformers import AutoTokenizer

    from framework.data.shards import MANIFEST, TOKENIZER_DIR

    if data_dir is None:
        data_dir = training_shards(folder)
        require(data_dir is not None, key, None,
                f"{folder} does not lead to the shards it was trained on (no export.json naming a checkpoint that is "
                f"still there, with its shards unchanged); name the prepared shards to score on, e.g. {key}=data/stdlib")
    data_dir = absolute(data_dir)
    require(storage.exists(storage.join(data_dir, MANIFEST)), key, data_dir, f"no {MANIFEST} there; run `python launch/prep.py` first")
    shards = AutoTokenizer.from_pretrained(storage.join(data_dir, TOKENIZER_DIR), local_files_only=True)
    model = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    require(shards(PROBE_TEXT)["input_ids"] == model(PROBE_TEXT)["input_ids"], key, data_dir,
            f"these shards were tokenised with another tokenizer than {folder}'s: its perplexity on them means nothing")
    return data_dir
