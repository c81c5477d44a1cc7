"""Streaming token shards through Ray Data: datasets built in the driver, micro-batches in each worker."""

from __future__ import annotations

from typing import Any, Dict, Iterator, Tuple

import numpy as np
import pyarrow as pa
import ray.data
import torch
from ray.data.collate_fn import ArrowBatchCollateFn

from framework.data.shards import COLUMN, shard_uris


def build_datasets(data_dir: str, manifest: Dict[str, Any], eval_rows: int) -> Dict[str, ray.data.Dataset]:
    """The train split, and the first `eval_rows` rows of the validation split (a fixed evaluation set)."""
    train = ray.data.read_parquet(shard_uris(data_dir, manifest, "train")).select_columns([COLUMN])
    validation = ray.data.read_parquet(shard_uris(data_dir, manifest, "validation")).select_columns([COLUMN]).limit(eval_rows)
    return {"train": train, "validation": validation}


def quiet_data_logs() -> None:
    """No Ray Data progress bars or execution-plan banners in this process's datasets: the training
    progress line is what a person watches, and Ray Data's own output would drown it."""
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False


def data_config() -> "ray.train.DataConfig":
    """Split every dataset across workers in a fixed order, so that a run sees the same batches every time."""
    import ray.train
    from ray.data import ExecutionOptions

    # preserve_order makes Ray Data's splitter deterministic (it ignores locality hints then);
    # equal splits keep every worker on the same number of micro-batches per epoch.
    return ray.train.DataConfig(execution_options=ExecutionOptions(preserve_order=True))


class TokenCollate(ArrowBatchCollateFn):
    """An Arrow batch of fixed-size token lists → a [batch, seq_len] int64 tensor, without a Python loop."""

    def __call__(self, batch: pa.Table) -> torch.Tensor:
        column = batch.column(COLUMN).combine_chunks()
        # Arrow's buffers are read-only; the int64 copy the model needs anyway is the tensor's own memory.
        values = column.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
        return torch.from_numpy(values.reshape(len(column), column.type.list_size))


def micro_batches(shard: Any, batch_size: int, start_epoch: int, skip: int) -> Iterator[Tuple[int, int, torch.Tensor]]:
    """Endless (epoch, batches done in that epoch, batch) over a worker's shard, resuming at a position.

    Each pass over the shard is one epoch; resuming re-reads the current epoch up to `skip`
    batches without training on them, which puts a restarted run on exactly the batches it left.
    """
    epoch = start_epoch
    while True:
        seen = 0
        for seen, batch in enumerate(
            shard.iter_torch_batches(batch_size=batch_size, collate_fn=TokenCollate(), drop_last=True), 1
        ):
            if epoch == start_epoch and seen <= skip:
                continue
            yield epoch, seen, batch
        if seen == 0:
            raise RuntimeError("the train split gave this worker no full micro-batch; prepare more data")
        epoch += 1


def eval_batches(shard: Any, batch_size: int) -> Iterator[torch.Tensor]:
    """One full pass over a worker's share of the evaluation set."""
    yield from shard.iter_torch_batches(batch_size=batch_size, collate_fn=TokenCollate(), drop_last=True)
