"""The served model folder: find it (a folder, or a sweep's best.json naming one) and check it is whole.

The check is cheap (config, tokenizer, safetensors headers; no weights are read) so that a missing or
corrupt export fails in one line before any Ray or Serve work starts. A quantised folder
(launch/compress.py: torchao through transformers' TorchAoConfig) is the same safetensors folder, its
quantised tensors flattened into plain ones and described in the files' metadata; the check also holds
its config.json and its weights to one another: a `quantization_config` of torchao's needs torchao
installed and weights that carry torchao's tensors, and a folder without one must carry none.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Dict, Optional

from framework.config import ConfigError

WEIGHTS_INDEX = "model.safetensors.index.json"
# The quantisation this project writes (framework/compress.py) and loads: config.json's quant_method.
TORCHAO = "torchao"


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


def context_length(config: object) -> int:
    """A transformers config's context length (framework/model.py: max_positions), else 2048."""
    from framework.model import max_positions

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
