"""The sample order and a worker's reads, on real Parquet shards written by prep's own writer (no Ray).

Each row of these shards holds its own global index in every token, so what a reader hands out says
exactly which rows it read.
"""

from __future__ import annotations

import glob
import os

import numpy as np
import pytest

from framework.data.sampler import Blocks, SampleOrder, evaluation_rows, worker_slice
from framework.data.shards import COLUMN, MANIFEST_FORMAT, ROW_GROUP_ROWS, rows_to_table, write_shard
from framework.data.stream import ShardReader, TrainBatches, eval_batches, split_blocks

SEQ = 8
# Three shards of uneven size (as prep tasks write them): 2.5k, 1.2k and 0.3k rows.
SHARD_ROWS = (2500, 1200, 300)
GLOBAL_BATCH = 48


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """(data_dir, manifest) of a train split whose row r holds the token r everywhere."""
    out = tmp_path_factory.mktemp("rows")
    shards, first = [], 0
    for i, rows in enumerate(SHARD_ROWS):
        ids = np.repeat(np.arange(first, first + rows, dtype=np.int32)[:, None], SEQ, axis=1)
        file = f"train/part-{i:05d}.parquet"
        sha = write_shard(rows_to_table(ids), str(out / file))
        shards.append({"file": file, "rows": rows, "sha256": sha})
        first += rows
    split = {"rows": first, "shards": shards}
    manifest = {
        "format": MANIFEST_FORMAT, "seq_len": SEQ, "columns": [COLUMN], "row_group_rows": ROW_GROUP_ROWS,
        "splits": {"train": split, "validation": split},
    }
    return str(out), manifest


def _order(manifest, seed=0, window=2):
    return SampleOrder(split_blocks(manifest, "train"), seed=seed, window=window)


def test_row_groups_from_the_manifest_match_the_files(shards):
    import pyarrow.parquet as pq

    data_dir, manifest = shards
    sizes = [pq.ParquetFile(p).metadata.row_group(g).num_rows
             for p in sorted(glob.glob(os.path.join(data_dir, "train", "*.parquet")))
             for g in range(pq.ParquetFile(p).metadata.num_row_groups)]
    assert split_blocks(manifest, "train").sizes.tolist() == sizes == [1024, 1024, 452, 1024, 176, 300]


def test_every_train_row_appears_once_per_epoch_in_a_new_order_each_epoch(shards):
    _, manifest = shards
    order = _order(manifest)
    n = sum(SHARD_ROWS)
    epoch0, epoch1 = order.epoch(0), order.epoch(1)
    assert sorted(epoch0.tolist()) == sorted(epoch1.tolist()) == list(range(n))
    assert not np.array_equal(epoch0, epoch1)
    # The endless sequence drops nothing: steps that span the epoch boundary take its last rows and the next epoch's first.
    steps = -(-2 * n // GLOBAL_BATCH)
    seen = np.concatenate([order.positions(s * GLOBAL_BATCH, GLOBAL_BATCH) for s in range(steps)])[: 2 * n]
    assert np.array_equal(seen[:n], epoch0) and np.array_equal(seen[n:], epoch1)


def test_the_order_is_a_function_of_the_seed_and_the_step_alone(shards):
    _, manifest = shards
    a, b, other = _order(manifest, seed=3), _order(manifest, seed=3), _order(manifest, seed=4)
    for step in (0, 17, 250):  # step 250 is in the third epoch
        assert np.array_equal(a.step_rows(step, GLOBAL_BATCH), b.step_rows(step, GLOBAL_BATCH))
    assert not np.array_equal(a.step_rows(0, GLOBAL_BATCH), other.step_rows(0, GLOBAL_BATCH))


def test_shuffle_windows_keep_reads_local(shards):
    """A step's rows come from the few row groups of its shuffle window, not from every group."""
    _, manifest = shards
    blocks = split_blocks(manifest, "train")
    order = _order(manifest, window=2)
    touched = [len(np.unique(blocks.block_of(order.step_rows(s, GLOBAL_BATCH)))) for s in range(0, 80, 5)]
    assert max(touched) <= 4 < len(blocks.sizes)  # two windows at most (a step at a window's edge)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_workers_split_every_step_into_disjoint_shares_that_cover_it(shards, world):
    _, manifest = shards
    order = _order(manifest)
    for step in (0, 1, 83):
        rows = order.step_rows(step, GLOBAL_BATCH)
        shares = [worker_slice(rows, rank, world) for rank in range(world)]
        assert np.array_equal(np.concatenate(shares), rows)
        assert max(map(len, shares)) - min(map(len, shares)) <= 1


def _read_steps(shards, start, steps, world=2, rank=0, prefetch=2):
    data_dir, manifest = shards
    order = _order(manifest)
    reader = ShardReader(data_dir, manifest, "train", cache_groups=6)
    batches = TrainBatches(reader, order, global_batch=GLOBAL_BATCH, micro_batch=8, rank=rank, world=world,
                           start_step=start, prefetch_steps=prefetch)
    try:
        got = [np.concatenate([b["input_ids"][:, 0].numpy() for b in batches.next()]) for _ in range(steps)]
    finally:
        batches.close()
    return got, reader.counts, order


def test_a_worker_trains_on_exactly_its_share_of_each_step(shards):
    got, _, order = _read_steps(shards, start=5, steps=4, world=2, rank=1)
    for i, rows in enumerate(got):
        assert np.array_equal(rows, worker_slice(order.step_rows(5 + i, GLOBAL_BATCH), 1, 2))
        assert len(rows) == GLOBAL_BATCH // 2


def test_resuming_late_in_an_epoch_reads_no_earlier_row(shards):
    """The reads of a resume depend on where it resumes, not on how far into the epoch that is."""
    n = sum(SHARD_ROWS)
    late = n // GLOBAL_BATCH - 6  # a few steps before the end of the first epoch
    early_rows, early, order = _read_steps(shards, start=1, steps=3, prefetch=1)
    late_rows, counts, _ = _read_steps(shards, start=late, steps=3, prefetch=1)
    blocks = order.blocks
    # Rows served: this worker's share of the steps trained and the one read ahead, nothing else.
    wanted = [worker_slice(order.step_rows(s, GLOBAL_BATCH), 0, 2) for s in range(late, late + 5)]
    assert counts.rows_served in {sum(map(len, wanted[:k])) for k in (3, 4, 5)}
    # Row groups decoded: only groups holding rows of those steps, each once.
    needed = set(np.unique(blocks.block_of(np.concatenate(wanted))).tolist())
    assert set(counts.group_ids) <= needed and len(counts.group_ids) == len(set(counts.group_ids))
    assert counts.rows_decoded <= sum(blocks.sizes[list(needed)])
    assert counts.groups <= early.groups + 2


def test_evaluation_set_is_the_same_rows_for_every_worker_count_and_micro_batch(shards):
    data_dir, manifest = shards
    rows = evaluation_rows(sum(SHARD_ROWS), 1001, seed=0)
    assert np.array_equal(rows, evaluation_rows(sum(SHARD_ROWS), 1001, seed=0)) and len(set(rows.tolist())) == 1001
    reader = ShardReader(data_dir, manifest, "validation", cache_groups=8)
    for world in (1, 2, 3):
        for micro in (2, 4, 7):
            seen, batches_per_rank = [], []
            for rank in range(world):
                batches = list(eval_batches(reader, rows, rank, world, micro))
                batches_per_rank.append(len(batches))
                seen += [b["input_ids"][:, 0].numpy() for b, real in batches if real]
            # Every row once, the last partial batch included; equal pass counts on every rank (ZeRO-3).
            assert np.array_equal(np.sort(np.concatenate(seen)), rows), (world, micro)
            assert len(set(batches_per_rank)) == 1


def test_evaluation_takes_the_whole_split_when_it_is_small_or_unbounded():
    assert np.array_equal(evaluation_rows(50, None, seed=0), np.arange(50))
    assert np.array_equal(evaluation_rows(50, 50, seed=1), np.arange(50))


def test_blocks_find_the_block_of_any_row():
    blocks = Blocks.from_sizes([3, 5, 2])
    assert blocks.block_of(np.array([0, 2, 3, 7, 8, 9])).tolist() == [0, 0, 1, 1, 2, 2]
