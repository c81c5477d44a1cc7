"""The `compress.*` schema (conf/compress.yaml and its method presets) and the checks of its values."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import torch
from omegaconf import MISSING, DictConfig

from framework.compress.methods import DEVICES, METHODS, torchao_version
from framework.config import register, require, typed
from framework.hf_folder import DTYPE_NAMES
from framework.tracking import TrackingConfig


@dataclass
class CompressConfig:
    """The `compress.*` keys: types here, values in conf/compress.yaml and the method presets of conf/compress/."""

    name: str = MISSING  # the preset's name: the default output folder ends with it
    # An exported Hugging Face folder, or a sweep's best.json naming one.
    model_path: str = MISSING
    # The folder to write (replaced only if it holds an earlier compression); null: outputs/compressed/<source>-<name>.
    output_dir: Optional[str] = MISSING
    method: str = MISSING  # int8_weight_only | int8_dynamic | int4_weight_only
    group_size: Optional[int] = MISSING  # inputs per scale; null: one scale per output row
    dtype: str = MISSING  # fp32 | bf16 | fp16: what stays unquantised, and the activations
    device: str = MISSING  # cpu | cuda: where quantising, evaluating and timing run
    # The quality gate: compressed ÷ source validation perplexity may not exceed this.
    max_ppl_increase: float = MISSING
    # Prepared shards to score on; null: those the source was trained on (its export.json's checkpoint says).
    data_dir: Optional[str] = MISSING
    eval_rows: Optional[int] = MISSING  # validation rows, drawn with the shards' seed as training draws them; null: all
    micro_batch: int = MISSING
    # The fixed prompt set: greedy agreement with the source, and decode tokens/s through the serving engine.
    prompts: int = MISSING
    max_tokens: int = MISSING
    torch_threads: Optional[int] = MISSING  # null: torch's default


@dataclass
class CompressRoot:
    """The root of conf/compress.yaml."""

    compress: CompressConfig = field(default_factory=CompressConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


# Registered on import (`conf/compress.yaml` names it) so that `compose(..., "compress")` finds it from any entry point.
register("compress_schema", CompressRoot)


def to_compress_config(cfg: DictConfig | Dict[str, Any]) -> CompressConfig:
    """Type the `compress` node of a composed config as CompressConfig."""
    return typed(CompressConfig, cfg["compress"] if "compress" in cfg else cfg, "compress", example="outputs/export/RUN")


def check_values(c: CompressConfig) -> None:
    """Ranges, and what this machine can run."""
    method, cuda = METHODS.get(c.method), torch.cuda.is_available()
    require(c.dtype in DTYPE_NAMES, "compress.dtype", c.dtype, f"expected one of {DTYPE_NAMES}")
    require(c.device in DEVICES, "compress.device", c.device, f"expected one of {DEVICES}")
    require("cpu" in method.devices or cuda, "compress.method", c.method,
            f"torchao {torchao_version()} runs it on CUDA only, and this machine has no CUDA device (compress=int8 runs on CPU)")
    require(c.device != "cuda" or cuda, "compress.device", c.device, "no CUDA device on this machine; use compress.device=cpu")
    require(c.device in method.devices, "compress.device", c.device, f"{c.method} runs on {' or '.join(method.devices)} only")
    require(c.device == "cuda" or c.dtype == "fp32", "compress.dtype", c.dtype,
            "half precision needs a GPU (compress.device=cuda); use fp32 on CPU")
    require(c.dtype in method.dtypes, "compress.dtype", c.dtype, f"{c.method} runs in {' or '.join(method.dtypes)} only")
    if method.group_sizes is None:
        require(c.group_size is None, "compress.group_size", c.group_size, f"expected null: {c.method} scales per row")
    elif method.group_sizes:
        require(c.group_size in method.group_sizes, "compress.group_size", c.group_size,
                f"{c.method} takes groups of {', '.join(map(str, method.group_sizes))} inputs")
    else:
        require(c.group_size is None or c.group_size >= 1, "compress.group_size", c.group_size, "expected at least 1, or null (per row)")
    require(c.max_ppl_increase > 0, "compress.max_ppl_increase", c.max_ppl_increase,
            "expected a positive ratio (1.05 lets perplexity rise by 5%)")
    require(c.eval_rows is None or c.eval_rows >= 1, "compress.eval_rows", c.eval_rows, "expected at least 1, or null (every row)")
    for key in ("micro_batch", "prompts", "max_tokens"):
        require(getattr(c, key) >= 1, f"compress.{key}", getattr(c, key), "expected at least 1")
    require(c.torch_threads is None or c.torch_threads >= 1, "compress.torch_threads", c.torch_threads, "expected at least 1, or null")
