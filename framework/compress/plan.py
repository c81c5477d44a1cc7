"""A compression planned before any weights are read: the source folder, the output folder, the shards."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import List, Optional, Tuple

import torch
from omegaconf import DictConfig

from framework.compress.config import CompressConfig, check_values, to_compress_config
from framework.config import Job, require
from framework.tracking import TrackingConfig

# What a compression writes into its folder: where the folder came from and what it costs; an output_dir
# holding it may be replaced by a new compression, one without it is not ours to delete.
COMPRESS_MARKER = "compress_report.json"


@dataclass
class CompressPlan:
    """Everything a compression needs, checked before any weights are read."""

    compress: CompressConfig
    source: Path
    output_dir: str
    data_dir: Optional[str]  # None only for a benchmark's random-weight model, whose perplexity means nothing
    linear_layers: int  # the layers torchao will quantise
    tracking: Optional[TrackingConfig] = None  # launch/compress.py's tracking.*; None: not tracked


def quantisable_layers(source: Path) -> List[Tuple[str, int]]:
    """(name, input features) of every layer torchao would quantise: the model's `torch.nn.Linear` modules but its
    output embedding (transformers keeps that in full precision), found on the meta device (no weights read)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(source, local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    output = model.get_output_embeddings()
    return [(name, m.in_features) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not output]


def check_layers(c: CompressConfig, source: Path) -> int:
    """The method must find layers it can take in the source's architecture; gives their number."""
    layers = quantisable_layers(source)
    require(bool(layers), "compress.method", c.method,
            f"{source} ({_architecture(source)}) has no torch.nn.Linear layers for torchao to quantise (GPT-2's blocks, say, "
            f"are transformers' Conv1D)")
    for name, inputs in layers if c.group_size is not None else []:
        require(inputs % c.group_size == 0, "compress.group_size", c.group_size,
                f"does not divide the {inputs} inputs of {name} in {source}")
    return len(layers)


def _architecture(source: Path) -> str:
    config = json.loads((source / "config.json").read_text())
    return ", ".join(config.get("architectures") or [config.get("model_type", "unknown")])


def default_compress_dir(model_path: str, name: str) -> str:
    """outputs/compressed/<the source folder's name (a best.json: its sweep's)>-<preset name>."""
    from framework.hf_folder import default_model_id

    return os.path.join("outputs", "compressed", f"{default_model_id(model_path)}-{name}")


def plan_compression(c: CompressConfig, scored: bool = True) -> CompressPlan:
    """Check everything a compression can check before reading weights; raises ConfigError naming the first bad key.

    `scored=False` (a benchmark's random-weight model) leaves out the shards and so the perplexity."""
    from framework.export import scoring_shards
    from framework.hf_folder import (
        TORCHAO,
        check_model_folder,
        check_output_dir,
        resolve_model_path,
    )

    check_values(c)
    key = "compress.model_path"
    source = resolve_model_path(c.model_path, key)
    check_model_folder(source, key)
    quantised = json.loads((source / "config.json").read_text()).get("quantization_config")
    require(quantised is None, key, c.model_path,
            f"is quantised already ({(quantised or {}).get('quant_method', TORCHAO)}); compress its full-precision source")
    layers = check_layers(c, source)
    output_dir = c.output_dir or default_compress_dir(c.model_path, c.name)
    check_output_dir(output_dir, str(source), "compress.output_dir", COMPRESS_MARKER, "compression", "the source folder")
    data_dir = scoring_shards(c.data_dir, source, "compress.data_dir") if scored else None
    return CompressPlan(c, source, os.path.abspath(output_dir), data_dir, layers)


def load_compress(cfg: DictConfig) -> CompressPlan:
    """`launch/compress.py`'s plan: schema, values, the machine, the source, the shards (no weights read)."""
    from framework.config import typed
    from framework.tracking import check_tracking

    tracking = typed(TrackingConfig, cfg["tracking"], "tracking")
    check_tracking(tracking)
    return replace(plan_compression(to_compress_config(cfg)), tracking=tracking)


COMPRESS = Job("compress", load=load_compress)
