"""A worker's rows: read straight from the Parquet shards with pyarrow, by row group, a few steps ahead in a thread.

Each Train worker reads its own slice of every step's rows (`framework/data/sampler.py`) from the shards
it shares with the other workers: no Ray Data pipeline, no read tasks to schedule, so a worker needs
only the CPU it holds and no resource layout can leave reads without a place to run (the benchmark in
docs/benchmarks.md chose this path by measurement). Row groups are decoded once into a small cache
that holds the order's current shuffle windows; a background thread prepares the next
`run.prefetch_steps` steps as tensors while the model trains on this one (pyarrow decodes with the GIL
released).
"""

from __future__ import annotations

import queue
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import pyarrow.parquet as pq
import torch

from framework import storage
from framework.data.sampler import Blocks, SampleOrder, worker_slice
from framework.data.shards import COLUMN, MASK_COLUMN, PAIRS_COLUMN, PROMPT_COLUMNS, SEGMENTS_COLUMN, position_ids, shard_uris

# Labels the loss ignores (transformers' convention): tokens that are not targets.
IGNORE_INDEX = -100
# What a reader hands out for rows with segment starts (shards.SEGMENTS_COLUMN): a position id per token.
POSITIONS = "position_ids"
Batch = Dict[str, torch.Tensor]


def split_blocks(manifest: Dict[str, Any], split: str) -> Blocks:
    """The split's row groups over all its shards, in shard order, from the manifest alone (no file is opened)."""
    per_group = manifest["row_group_rows"]
    sizes: List[int] = []
    for shard in manifest["splits"][split]["shards"]:
        full, rest = divmod(shard["rows"], per_group)
        sizes += [per_group] * full + ([rest] if rest else [])
    return Blocks.from_sizes(sizes)


@dataclass
class ReadCounts:
    """What a reader has read: row groups decoded and the rows in them, and rows handed out."""

    groups: int = 0
    rows_decoded: int = 0
    rows_served: int = 0
    group_ids: List[int] = field(default_factory=list)  # every block decoded, in order (tests count them)


class ShardReader:
    """Rows of one split by global index, decoded from its shards one row group at a time and cached."""

    def __init__(self, data_dir: str, manifest: Dict[str, Any], split: str, cache_groups: int) -> None:
        self.blocks = split_blocks(manifest, split)
        self.uris = shard_uris(data_dir, manifest, split)
        self.columns = [c for c in (COLUMN, MASK_COLUMN, PAIRS_COLUMN, SEGMENTS_COLUMN, *PROMPT_COLUMNS) if c in manifest.get("columns", [COLUMN])]
        self.seq_len = manifest["seq_len"]
        per_group = manifest["row_group_rows"]
        # Block b → (shard, row group in the shard).
        self.where: List[Tuple[int, int]] = []
        for s, shard in enumerate(manifest["splits"][split]["shards"]):
            self.where += [(s, g) for g in range(-(-shard["rows"] // per_group))]
        self.cache: "OrderedDict[int, Dict[str, np.ndarray]]" = OrderedDict()
        self.cache_groups = max(1, cache_groups)
        self.files: "OrderedDict[int, pq.ParquetFile]" = OrderedDict()
        self.counts = ReadCounts()

    def _file(self, shard: int) -> pq.ParquetFile:
        if shard not in self.files:
            if len(self.files) >= 64:
                self.files.popitem(last=False)
            fs, path = storage.resolve(self.uris[shard])
            self.files[shard] = pq.ParquetFile(fs.open_input_file(path))
        self.files.move_to_end(shard)
        return self.files[shard]

    def _group(self, block: int) -> Dict[str, np.ndarray]:
        if block in self.cache:
            self.cache.move_to_end(block)
            return self.cache[block]
        shard, group = self.where[block]
        table = self._file(shard).read_row_group(group, columns=self.columns)
        arrays = {}
        for name in self.columns:
            column = table.column(name).combine_chunks()
            if name == SEGMENTS_COLUMN:  # a list per row: decoded once per row group into position ids
                offsets = column.offsets.to_numpy()
                arrays[POSITIONS] = position_ids(column.flatten().to_numpy(), offsets - offsets[0], self.seq_len)
            elif name in PROMPT_COLUMNS:  # prompts: a row of its own length, and JSON text
                values = np.empty(len(column), dtype=object)
                for i, value in enumerate(column.to_pylist()):
                    values[i] = value
                arrays[name] = values
            else:
                arrays[name] = column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), column.type.list_size)
        self.counts.groups += 1
        self.counts.rows_decoded += len(table)
        self.counts.group_ids.append(block)
        self.cache[block] = arrays
        if len(self.cache) > self.cache_groups:
            self.cache.popitem(last=False)
        return arrays

    def read(self, rows: np.ndarray) -> Dict[str, np.ndarray]:
        """The columns of `rows` (global indices), in that order."""
        blocks = self.blocks.block_of(rows)
        out: Dict[str, np.ndarray] = {}
        for block in np.unique(blocks):
            picked = np.nonzero(blocks == block)[0]
            arrays = self._group(int(block))
            local = rows[picked] - self.blocks.starts[block]
            for name, values in arrays.items():
                if name not in out:
                    out[name] = np.empty((len(rows), *values.shape[1:]), dtype=values.dtype)
                out[name][picked] = values[local]
        self.counts.rows_served += len(rows)
        return out


def to_batch(columns: Dict[str, np.ndarray]) -> Batch:
    """Model inputs of a set of rows: token ids, and labels that are the ids where a token is a target (-100 elsewhere).

    Rows with segments also get position ids that restart at every segment; with them (and no attention
    mask) transformers builds a block-diagonal causal mask, so no token attends across a segment boundary
    (`masking_utils.find_packed_sequence_indices`). A segment's first token is no target: the only context
    to predict it from would be the segment before, which it cannot see.
    """
    ids = torch.from_numpy(columns[COLUMN].astype(np.int64))
    labels = ids.clone()
    if MASK_COLUMN in columns:
        labels[torch.from_numpy(columns[MASK_COLUMN] == 0)] = IGNORE_INDEX
    batch = {"input_ids": ids, "labels": labels}
    if PAIRS_COLUMN in columns:  # preference pairs: which response each target belongs to (framework/train/objectives.py)
        labels[torch.from_numpy(columns[PAIRS_COLUMN] == 0)] = IGNORE_INDEX
        batch[PAIRS_COLUMN] = torch.from_numpy(columns[PAIRS_COLUMN].astype(np.int64))
    if POSITIONS in columns:
        positions = torch.from_numpy(columns[POSITIONS].astype(np.int64))
        labels[positions == 0] = IGNORE_INDEX
        batch[POSITIONS] = positions
    return batch


def target_tokens(batch: Batch) -> int:
    """Tokens the loss predicts in a batch: labels past each row's first position that are not ignored."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


class TrainBatches:
    """A worker's micro-batches, one list per step from `start_step`, prepared `prefetch_steps` ahead in a thread."""

    def __init__(
        self, reader: ShardReader, order: SampleOrder, *, global_batch: int, micro_batch: int, rank: int, world: int,
        start_step: int, prefetch_steps: int,
    ) -> None:
        self.reader, self.order = reader, order
        self.global_batch, self.micro_batch, self.rank, self.world = global_batch, micro_batch, rank, world
        self.step = start_step
        self.ready: "queue.Queue[Any]" = queue.Queue(maxsize=prefetch_steps)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._produce, name="train-batches", daemon=True)
        self.thread.start()

    def rows(self, step: int) -> np.ndarray:
        """This worker's rows of `step`."""
        return worker_slice(self.order.step_rows(step, self.global_batch), self.rank, self.world)

    def _produce(self) -> None:
        step = self.step
        try:
            while not self.stopping.is_set():
                columns = self.reader.read(self.rows(step))
                batch = to_batch(columns)
                micro = [{k: v[i : i + self.micro_batch] for k, v in batch.items()} for i in range(0, len(batch["input_ids"]), self.micro_batch)]
                self._put((step, micro))
                step += 1
        except BaseException as exc:  # noqa: BLE001 - handed to the training loop, which raises it
            self._put(exc)

    def _put(self, item: Any) -> None:
        while not self.stopping.is_set():
            try:
                self.ready.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def next(self) -> List[Batch]:
        """The micro-batches of the next step."""
        item = self.ready.get()
        if isinstance(item, BaseException):
            raise item
        step, micro = item
        assert step == self.step, (step, self.step)
        self.step += 1
        return micro

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=10)


def eval_batches(reader: ShardReader, rows: np.ndarray, rank: int, world: int, micro_batch: int) -> Iterator[Tuple[Batch, bool]]:
    """This worker's share of the evaluation rows in micro-batches (the last one partial), as (batch, real).

    Every worker yields the same number of batches: under ZeRO-3 every forward pass is a collective,
    so a worker with fewer rows runs its missing passes on a copy of its last batch (`real` False),
    which the evaluation leaves out of its sums.
    """
    mine = worker_slice(rows, rank, world)
    most = -(-len(worker_slice(rows, 0, world)) // micro_batch)  # share 0 is never smaller than another
    last: Optional[Batch] = None
    for i in range(most):
        part = mine[i * micro_batch : (i + 1) * micro_batch]
        if len(part):
            last = to_batch(reader.read(part))
            yield last, True
        else:
            yield (last if last is not None else to_batch(reader.read(rows[:1]))), False
