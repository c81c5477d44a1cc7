"""Validation loss and perplexity over the evaluation set: the rows training reports on, for a training engine or any HF folder.

The evaluation set is `run.eval_rows` rows drawn once from the whole validation split
(`framework/data/sampler.py: evaluation_rows`); every row counts once, the last partial batch too,
and the loss is the mean over every target token. So the number is the same whatever the worker
count or micro-batch, and the same for the training run, its exported folder and a compressed copy
of it (`framework/compress/`).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Optional

import numpy as np
import torch

from framework.config import ConfigError
from framework.data.stream import Batch, ShardReader, eval_batches, target_tokens


@torch.no_grad()
def loss_sums(forward: Callable[..., Any], reader: ShardReader, rows: np.ndarray, rank: int, world: int, micro_batch: int,
              device: torch.device) -> torch.Tensor:
    """(summed token loss, target tokens) over this worker's share of `rows`, in float64 on `device`."""
    totals = torch.zeros(2, device=device, dtype=torch.float64)
    for batch, real in eval_batches(reader, rows, rank, world, micro_batch):
        inputs: Batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        # Reduction "sum" over the batch's target tokens. No KV cache: with one, transformers would not read packed
        # rows' restarting position ids as document boundaries (masking_utils._preprocess_mask_arguments).
        summed = forward(**inputs, use_cache=False, num_items_in_batch=1).loss
        if real:
            totals += torch.stack([summed.double(), torch.tensor(float(target_tokens(inputs)), device=device, dtype=torch.float64)])
    return totals


def token_metrics(totals: torch.Tensor) -> Dict[str, float]:
    """Mean token loss and perplexity from summed (loss, tokens)."""
    loss = (totals[0] / totals[1]).item() if totals[1] > 0 else float("nan")
    return {"val/loss": loss, "val/perplexity": math.exp(min(loss, 50.0))}


def evaluate_folder(folder: str, data_dir: str, eval_rows: Optional[int], micro_batch: int, device: str = "cpu",
                    dtype: Optional[torch.dtype] = None) -> Dict[str, float]:
    """The validation metrics of a Hugging Face model folder on the prepared shards in `data_dir`, in one process."""
    from transformers import AutoModelForCausalLM

    from framework.data.sampler import evaluation_rows
    from framework.data.shards import PAIRS_COLUMN, read_manifest

    manifest = read_manifest(data_dir)
    if PAIRS_COLUMN in manifest["columns"]:
        raise ConfigError(
            f"{data_dir}: holds preference pairs; a folder's token loss is measured on text or chat shards (a preference "
            "loss needs the run's reference: its metrics are the training run's val/rewards/*)"
        )
    rows = evaluation_rows(manifest["splits"]["validation"]["rows"], eval_rows, manifest["seed"])
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=dtype or "auto").to(device).eval()
    reader = ShardReader(data_dir, manifest, "validation", cache_groups=4)
    return token_metrics(loss_sums(model, reader, rows, 0, 1, micro_batch, torch.device(device)))
