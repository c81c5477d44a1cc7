"""LoRA adapters served on one base through Ray Serve LLM's multiplexing: `serve.adapters` maps a model id to an
adapter folder, and a request for that id runs the base with the adapter (vLLM's LoRA), on whichever replica
Serve routes it to; the replica loads an adapter the first time it is asked for.

An adapter folder is a PEFT folder (`adapter_config.json` + weights), or an export of a LoRA run made with
`export.adapter=true`, which holds one as `adapter/`. `serve.adapters_from` names a LoRA sweep's results folder
instead: every trial the sweep exported (`trials/<trial>/adapter`, tune.export_trials=true) is served by its trial's
name, once each is shown to have trained on the served base. Ray Serve LLM's own loader fetches adapters from
object storage (`dynamic_lora_loading_path`); these are on the replicas' disk (a shared volume on a
cluster), so `LocalAdapterLoader` hands their folders to the engine as they are.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict

from framework.config import require
from framework.hf_folder import ADAPTER_DIR, TRIALS_DIR

# The replicas' environment variable holding serve.adapters as resolved folders (JSON: id → folder).
ADAPTERS_ENV = "FRAMEWORK_SERVE_ADAPTERS"
ADAPTER_CONFIG = "adapter_config.json"


def adapter_folder(path: str, model_id: str) -> Path:
    """The PEFT folder `path` names (itself, or an export's `adapter/`); ConfigError naming serve.adapters.<id> otherwise."""
    folder = Path(path).expanduser().resolve()
    if not (folder / ADAPTER_CONFIG).is_file() and (folder / ADAPTER_DIR / ADAPTER_CONFIG).is_file():
        folder = folder / ADAPTER_DIR
    require((folder / ADAPTER_CONFIG).is_file(), f"serve.adapters.{model_id}", path,
            f"expected a PEFT adapter folder ({ADAPTER_CONFIG}), or an export made with export.adapter=true")
    return folder


def check_adapters(adapters: Dict[str, str], base_id: str) -> Dict[str, Path]:
    """serve.adapters resolved: each id distinct from the base's, each folder an adapter."""
    folders = {}
    for model_id, path in adapters.items():
        require(model_id != base_id, f"serve.adapters.{model_id}", path, f"an adapter cannot take the base model's id '{base_id}'")
        folders[model_id] = adapter_folder(str(path), model_id)
    return folders


def sweep_adapters(path: str, base: Path) -> Dict[str, Path]:
    """serve.adapters_from resolved: trial name → the PEFT folder of every trial a LoRA sweep exported under
    `<tune.output_dir>/trials/` (`path` is that folder, or a best.json in it). Each adapter must have trained on `base`
    (its adapter_config.json names the base folder the run loaded); ConfigError naming serve.adapters_from otherwise."""
    root = Path(path).expanduser().resolve()
    if root.suffix == ".json":
        root = root.parent
    trials = root / TRIALS_DIR
    require(trials.is_dir(), "serve.adapters_from", path,
            f"expected a sweep's tune.output_dir holding {TRIALS_DIR}/ (a sweep run with tune.export_trials=true)")
    found = {}
    for folder in sorted(p for p in trials.iterdir() if p.is_dir() and not p.name.startswith(".")):  # not an export's staging
        config = folder / ADAPTER_DIR / ADAPTER_CONFIG
        require(config.is_file(), "serve.adapters_from", path,
                f"trial {folder.name} has no {ADAPTER_DIR}/{ADAPTER_CONFIG}: a sweep of LoRA runs exports one per trial")
        trained_on = json.loads(config.read_text()).get("base_model_name_or_path")
        require(bool(trained_on) and Path(trained_on).expanduser().resolve() == base.resolve(), "serve.adapters_from", path,
                f"trial {folder.name}'s adapter trained on {trained_on} (its {ADAPTER_CONFIG}), not on the served base {base}")
        found[folder.name] = folder / ADAPTER_DIR
    require(bool(found), "serve.adapters_from", path, f"no trial exported under {trials}")
    return found


def lora_settings(folders: Dict[str, Path]) -> Dict[str, Any]:
    """vLLM's LoRA limits for these adapters (the largest rank, every adapter resident) and Ray Serve LLM's lora_config."""
    ranks = [int(json.loads((folder / ADAPTER_CONFIG).read_text())["r"]) for folder in folders.values()]
    return {"max_rank": max(ranks), "max_loras": len(folders),
            "config": {"max_num_adapters_per_replica": len(folders)},
            "env": {ADAPTERS_ENV: json.dumps({k: str(v) for k, v in folders.items()})}}


def local_adapter_loader() -> type:
    """Ray Serve LLM's LoRA loader for adapters already on disk (imported in the engine's replica only)."""
    from ray.llm._internal.serve.core.configs.llm_config import DiskMultiplexConfig
    from ray.llm._internal.serve.utils.lora_serve_utils import LoraModelLoader

    class LocalAdapterLoader(LoraModelLoader):
        async def load_model_from_config(self, lora_model_id: str, llm_config: Any) -> DiskMultiplexConfig:
            folders = json.loads(os.environ.get(ADAPTERS_ENV, "{}"))
            if lora_model_id not in folders:
                raise ValueError(f"no adapter '{lora_model_id}' on this server (serve.adapters: {sorted(folders)})")
            return DiskMultiplexConfig(model_id=lora_model_id, max_total_tokens=llm_config.max_request_context_length,
                                       local_path=folders[lora_model_id],
                                       lora_assigned_int_id=sorted(folders).index(lora_model_id) + 1)

    return LocalAdapterLoader
