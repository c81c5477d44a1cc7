"""Hugging Face model folders: find one (a folder, or a sweep's best.json naming one), check it is whole, write one safely.

The check is cheap (config, tokenizer, safetensors headers; no weights are read) so that a missing or
corrupt folder fails in one line before any Ray or Serve work starts. A quantised folder
(launch/compress.py: torchao through transformers' TorchAoConfig) is the same safetensors folder, its
quantised tensors flattened into plain ones and described in the files' metadata; the check also holds
its config.json and its weights to one another: a `quantization_config` of torchao's needs torchao
installed and weights that carry torchao's tensors, and a folder without one must carry none.

Export and compress write folders by one set of rules (`check_output_dir`, `replace_dir`): written
beside the target, moved into place when verified, and only over a folder that the same job wrote
before (its marker file). No torch import here: serving's config check composes without it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Dict, Iterator, Optional

from framework.config import ConfigError, require

# The dtype names every job's config takes (export.dtype, compress.dtype, serve.dtype); framework/model.py maps them to torch's.
DTYPE_NAMES = ("fp32", "bf16", "fp16")

WEIGHTS_INDEX = "model.safetensors.index.json"
# The quantisation this project writes (framework/compress/) and loads: config.json's quant_method.
TORCHAO = "torchao"
# The PEFT adapter folder inside an export of a LoRA checkpoint (export.adapter=true, and every LoRA trial a sweep
# exports), and the folder under tune.output_dir where a sweep exports each finished trial (trials/<trial>): the
# layout export and tune write and serving reads (serve.adapters, serve.adapters_from).
ADAPTER_DIR = "adapter"
TRIALS_DIR = "trials"


def resolve_model_path(model_path: str, key: str = "serve.model_path") -> Path:
    """The Hugging Face folder to serve: `model_path` itself, or the `path` a best.json names.

    best.json is what a sweep promotes: {"trial", "metric", "value", "overrides", "path"}, where `path`
    is absolute or relative to the JSON file. `key` is the config key errors name.
    """
    path = Path(model_path).expanduser()
    if path.suffix != ".json":
        return path.resolve()
    try:
        best = json.loads(path.read_text())
        target = best["path"]
    except FileNotFoundError:
        raise ConfigError(f"{key}={model_path}: no such file") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(
            f"{key}={model_path}: expected a best.json with a \"path\" key ({type(exc).__name__}: {exc})"
        ) from None
    if not isinstance(target, str) or not target:
        raise ConfigError(f"{key}={model_path}: \"path\" must be a non-empty string, got {target!r}")
    return (path.resolve().parent / target).resolve()


def default_model_id(model_path: str) -> str:
    """The model id when serve.model_name is null: the folder's name, or for a best.json the name of the
    folder holding it (a sweep writes outputs/sweeps/<tune.name>/best.json, so: the sweep's name)."""
    path = Path(model_path).expanduser().resolve()
    return path.parent.name if path.suffix == ".json" else path.name


def model_context(folder: Path) -> int:
    """The model's context length in tokens (its position embeddings), from the folder's config.json."""
    from transformers import AutoConfig

    return context_length(AutoConfig.from_pretrained(folder, local_files_only=True))


def max_positions(config: object) -> Optional[int]:
    """A transformers config's context length (Llama-style max_position_embeddings, GPT-2's n_positions), if it has one."""
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def context_length(config: object) -> int:
    """A transformers config's context length (`max_positions`), else 2048."""
    return int(max_positions(config) or 2048)


def _weight_files(folder: Path) -> list[Path]:
    index = folder / WEIGHTS_INDEX
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ConfigError(f"{index}: unreadable weight index ({type(exc).__name__}: {exc})") from None
        return [folder / name for name in shards]
    return sorted(folder.glob("*.safetensors"))


def check_model_folder(folder: Path, key: str = "serve.model_path") -> None:
    """Raise ConfigError (one line, naming `key`) unless `folder` holds a loadable config, tokenizer and safetensors weights."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoTokenizer

    if not folder.is_dir():
        raise ConfigError(f"{key}: {folder} is not a directory (expected an exported Hugging Face model folder)")
    if not (folder / "config.json").is_file():
        raise ConfigError(f"{key}: {folder} has no config.json (expected an exported Hugging Face model folder)")
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure here means the folder cannot be served
        raise ConfigError(f"{folder / 'config.json'}: unreadable model config ({type(exc).__name__}: {_first_line(exc)})") from None
    quantised = _quant_method(config)
    if quantised is not None and quantised != TORCHAO:
        raise ConfigError(f"{key}: {folder} is quantised with {quantised}; expected a full-precision folder or a torchao one "
                          f"(launch/compress.py)")
    if quantised == TORCHAO and importlib.util.find_spec("torchao") is None:
        raise ConfigError(f"{key}: {folder} is quantised with torchao, which is not installed here "
                          f"(pip install -c constraints.txt torchao)")
    weights = _weight_files(folder)
    if not weights:
        raise ConfigError(f"{key}: {folder} has no *.safetensors weights")
    torchao_tensors = 0
    for file in weights:
        try:
            # Reading the header checks the file is safetensors and long enough for every tensor it lists.
            with safe_open(str(file), framework="pt") as handle:
                handle.keys()
                torchao_tensors += quantised_tensors(handle.metadata())
        except Exception as exc:  # noqa: BLE001
            raise ConfigError(f"{file}: corrupt or missing weights ({type(exc).__name__}: {_first_line(exc)})") from None
    if quantised == TORCHAO and not torchao_tensors:
        raise ConfigError(f"{key}: {folder}/config.json says torchao-quantised, but its weights hold no torchao tensors "
                          f"(replaced by full-precision ones?)")
    if quantised is None and torchao_tensors:
        raise ConfigError(f"{key}: {folder} holds {torchao_tensors} torchao-quantised tensors, but its config.json has no "
                          f"quantization_config to load them with")
    try:
        AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"{key}: {folder}: no loadable tokenizer ({type(exc).__name__}: {_first_line(exc)})") from None


def _quant_method(config: object) -> Optional[str]:
    """config.json's quantization_config.quant_method, or None for a full-precision model."""
    quantization = getattr(config, "quantization_config", None)
    if quantization is None:
        return None
    method = quantization.get("quant_method") if isinstance(quantization, dict) else getattr(quantization, "quant_method", None)
    return str(getattr(method, "value", method))


def quantised_tensors(metadata: Optional[Dict[str, str]]) -> int:
    """How many tensors of a safetensors file torchao's serialisation describes as quantised (its metadata: one JSON
    entry per original tensor, `{"_type": "Int8Tensor", ...}`; plain ones say "Tensor"). No torchao import needed."""
    count = 0
    for value in (metadata or {}).values():
        try:
            entry = json.loads(value)
        except (TypeError, ValueError):
            continue
        if isinstance(entry, dict) and entry.get("_type") not in (None, "Tensor"):
            count += 1
    return count


def _first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else ""


# ---------------------------------------------------------------------------------------------
# Writing a folder

def check_output_dir(output_dir: str, checkpoint: str, key: str, marker: str, made_by: str, source: str) -> None:
    """`output_dir` must be new, empty, or an earlier `made_by` (its `marker`), and outside `checkpoint` (`source`).

    Export and compress write their folders by these rules, each with its own key and marker: nothing
    of the user's is ever replaced."""
    require("://" not in output_dir, key, output_dir, "expected a local directory")
    require(not os.path.isfile(output_dir), key, output_dir, "is a file; expected a directory to write the model folder to")
    if "://" not in checkpoint:
        out, inside = os.path.abspath(output_dir), os.path.abspath(checkpoint)
        require(os.path.commonpath([out, inside]) not in (out, inside), key, output_dir, f"overlaps {source} {checkpoint}; choose a directory outside it")
    if os.path.isdir(output_dir) and os.listdir(output_dir):
        require(
            os.path.isfile(os.path.join(output_dir, marker)), key, output_dir,
            f"exists and holds something other than an earlier {made_by} (no {marker}); nothing there is replaced: choose a new or empty directory",
        )


def share_permissions(folder: str) -> None:
    """Ordinary permissions (as the umask allows) for the folder, its subfolders and files: mkdtemp and safetensors make them private."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~umask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~umask)


@contextlib.contextmanager
def quiet_progress_bars() -> Iterator[None]:
    """transformers' per-shard progress bars add nothing to a job's one line; restored afterwards."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def replace_dir(staged: str, output_dir: str) -> None:
    """Move the verified folder into place: renames on one filesystem; the folder it replaces is deleted only after the move."""
    old = None
    if os.path.exists(output_dir):
        old = f"{output_dir}.old-{uuid.uuid4().hex[:8]}"
        os.rename(output_dir, old)
    os.rename(staged, output_dir)
    if old:
        shutil.rmtree(old, ignore_errors=True)
