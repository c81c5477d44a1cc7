"""The served model folder: find it (a folder, or a sweep's best.json naming one) and check it is whole.

The check is cheap (config, tokenizer, safetensors headers; no weights are read) so that a missing or
corrupt export fails in one line before any Ray or Serve work starts.
"""

from __future__ import annotations

import json
from pathlib import Path

from framework.config import ConfigError

WEIGHTS_INDEX = "model.safetensors.index.json"


def resolve_model_path(model_path: str) -> Path:
    """The Hugging Face folder to serve: `model_path` itself, or the `path` a best.json names.

    best.json is what a sweep promotes: {"trial", "metric", "value", "overrides", "path"}, where `path`
    is absolute or relative to the JSON file.
    """
    path = Path(model_path).expanduser()
    if path.suffix != ".json":
        return path.resolve()
    try:
        best = json.loads(path.read_text())
        target = best["path"]
    except FileNotFoundError:
        raise ConfigError(f"serve.model_path={model_path}: no such file") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(
            f"serve.model_path={model_path}: expected a best.json with a \"path\" key ({type(exc).__name__}: {exc})"
        ) from None
    if not isinstance(target, str) or not target:
        raise ConfigError(f"serve.model_path={model_path}: \"path\" must be a non-empty string, got {target!r}")
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


def check_model_folder(folder: Path) -> None:
    """Raise ConfigError (one line) unless `folder` holds a loadable config, tokenizer and safetensors weights."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoTokenizer

    if not folder.is_dir():
        raise ConfigError(f"serve.model_path: {folder} is not a directory (expected an exported Hugging Face model folder)")
    if not (folder / "config.json").is_file():
        raise ConfigError(f"serve.model_path: {folder} has no config.json (expected an exported Hugging Face model folder)")
    try:
        AutoConfig.from_pretrained(folder, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure here means the folder cannot be served
        raise ConfigError(f"{folder / 'config.json'}: unreadable model config ({type(exc).__name__}: {_first_line(exc)})") from None
    weights = _weight_files(folder)
    if not weights:
        raise ConfigError(f"serve.model_path: {folder} has no *.safetensors weights")
    for file in weights:
        try:
            # Reading the header checks the file is safetensors and long enough for every tensor it lists.
            with safe_open(str(file), framework="pt") as handle:
                handle.keys()
        except Exception as exc:  # noqa: BLE001
            raise ConfigError(f"{file}: corrupt or missing weights ({type(exc).__name__}: {_first_line(exc)})") from None
    try:
        AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"serve.model_path: {folder}: no loadable tokenizer ({type(exc).__name__}: {_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else ""
