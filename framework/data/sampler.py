"""The global sample order: which rows of a split every step trains on, a function of the seed and the step alone.

The train split's rows, over all its shards, form one sequence per epoch:
    1. its blocks (Parquet row groups, `Blocks`) in a seeded random order, new every epoch;
    2. the rows of every `window` consecutive blocks of that order shuffled together.
That keeps reads local (a step touches about `window` row groups, not one per row) while every row is
visited exactly once per epoch and the order changes from epoch to epoch. Epochs follow each other
without a gap: the rows of global step s are positions [s·G, (s+1)·G) of that endless sequence, so no
tail is ever dropped and a step may span two epochs. Nothing here depends on the number of workers:
each worker takes its slice of the step's rows (`worker_slice`), so 1, 2 or 4 workers train on the same
rows at every step, a resumed run needs only its step to find its place (nothing is re-read), and an
elastic run continues the same sequence on another worker count (MosaicML Streaming's idea, here over
our own shards).

The evaluation set (`evaluation_rows`) is drawn once, from the whole validation split, with the
shards' own seed: the same rows whatever the worker count, micro-batch or trial.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np

# Keeps the evaluation draw's random stream apart from the training order's.
EVAL_STREAM = 2**31 - 1


@dataclass(frozen=True)
class Blocks:
    """A split's rows cut into blocks (row groups), in shard order: block b holds rows [starts[b], starts[b] + sizes[b])."""

    starts: np.ndarray
    sizes: np.ndarray

    @classmethod
    def from_sizes(cls, sizes: List[int]) -> "Blocks":
        sizes_ = np.asarray(sizes, dtype=np.int64)
        return cls(np.concatenate([[0], np.cumsum(sizes_)[:-1]]).astype(np.int64), sizes_)

    @property
    def rows(self) -> int:
        return int(self.sizes.sum())

    def block_of(self, rows: np.ndarray) -> np.ndarray:
        """The block index of each global row."""
        return np.searchsorted(self.starts, rows, side="right") - 1


class SampleOrder:
    """The rows of a split in training order: seeded, new every epoch, shuffled within windows of blocks."""

    def __init__(self, blocks: Blocks, seed: int, window: int) -> None:
        if blocks.rows == 0:
            raise ValueError("an empty split has no sample order")
        self.blocks, self.seed, self.window = blocks, seed, window
        self._epochs: Dict[int, np.ndarray] = {}

    @property
    def epoch_rows(self) -> int:
        return self.blocks.rows

    def epoch(self, epoch: int) -> np.ndarray:
        """Every row of the split once, in epoch `epoch`'s order (computed, not read: O(rows) arithmetic)."""
        if epoch not in self._epochs:
            if len(self._epochs) >= 2:  # a step spans at most two epochs
                self._epochs.pop(min(self._epochs))
            self._epochs[epoch] = self._order(epoch)
        return self._epochs[epoch]

    def _order(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.blocks.sizes))
        sizes = self.blocks.sizes[order]
        # The rows of the blocks in `order`: each block's start repeated over its size, plus 0..size-1.
        firsts = np.repeat(self.blocks.starts[order], sizes)
        offsets = np.arange(sizes.sum()) - np.repeat(np.cumsum(sizes) - sizes, sizes)
        rows = firsts + offsets
        ends = np.cumsum(sizes)
        for first in range(0, len(order), self.window):
            lo = ends[first - 1] if first else 0
            hi = ends[min(first + self.window, len(order)) - 1]
            rows[lo:hi] = rows[lo:hi][rng.permutation(hi - lo)]
        return rows

    def positions(self, start: int, count: int) -> np.ndarray:
        """The rows at positions [start, start + count) of the endless sequence of epochs."""
        n = self.epoch_rows
        out = np.empty(count, dtype=np.int64)
        done = 0
        while done < count:
            epoch, offset = divmod(start + done, n)
            take = min(count - done, n - offset)
            out[done : done + take] = self.epoch(epoch)[offset : offset + take]
            done += take
        return out

    def step_rows(self, step: int, global_batch: int) -> np.ndarray:
        """The rows global step `step` (0-based) trains on, ascending (their order within a step changes no gradient)."""
        return np.sort(self.positions(step * global_batch, global_batch))

    def epoch_of(self, step: int, global_batch: int) -> float:
        """Epochs completed by the start of `step` (fractional)."""
        return step * global_batch / self.epoch_rows


def worker_slice(rows: np.ndarray, rank: int, world: int) -> np.ndarray:
    """Worker `rank`'s contiguous share of `rows`: the first len % world shares one row longer, every row in exactly one.

    Rows are ascending, so a contiguous share reads few row groups: about 1/world of those the rows touch.
    """
    size, extra = divmod(len(rows), world)
    start = rank * size + min(rank, extra)
    return rows[start : start + size + (1 if rank < extra else 0)]


def evaluation_rows(split_rows: int, eval_rows: Optional[int], seed: int) -> np.ndarray:
    """The validation rows evaluated, ascending: all of them (`eval_rows` null), else `eval_rows` drawn once with `seed`."""
    if eval_rows is None or eval_rows >= split_rows:
        return np.arange(split_rows, dtype=np.int64)
    rng = np.random.default_rng([seed, EVAL_STREAM])
    return np.sort(rng.choice(split_rows, size=eval_rows, replace=False)).astype(np.int64)
