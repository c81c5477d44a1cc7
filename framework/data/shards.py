"""Packed token shards: fixed-length sequences in Parquet, and the manifest that describes them.

A shard holds `input_ids` (seq_len tokens per row) and, for data with targets (chat), `loss_mask`
(1 where a token is a target), or for preference pairs `pair_mask` (1: a target of a chosen response, 2: of a
rejected one; a pair's two conversations are adjacent segments of one row, chosen first); with `data.packing=documents`, `segment_starts`: where each segment of
the row starts (0 first). A segment is a document (a conversation), the part of a document a row holds,
or the row's padding; the model's positions restart at every segment start and attention stays inside
each segment (framework/data/stream.py turns the starts into position ids). Rows are written in row
groups of ROW_GROUP_ROWS, the unit the sample order shuffles and workers read (framework/data/sampler.py,
stream.py). The manifest lists every shard with its row count and sha256, and a fingerprint of the whole
data set (tokenizer and shards, no paths) that a resumed run must match.

Text is packed as a stream (`pack_sequences`: documents joined by EOS and cut into rows, so a long
document continues in the next row); conversations are packed whole (`pack_conversations`: best-fit
decreasing, each row filled up with padding that is not a target).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from typing import Any, Dict, List

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from framework import storage
from framework.config import ConfigError

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 2
TOKENIZER_DIR = "tokenizer"
SPLITS = ("train", "validation")
# What prep writes into data.output_dir before anything else. A folder holding it (or a manifest prep wrote,
# from before the marker) may be prepared again; any other non-empty folder is not prep's to write into.
PREP_MARKER = "prep.json"
# The names of the shards prep writes (`_write`): the only files clear_previous deletes in a split folder.
COLUMN = "input_ids"
MASK_COLUMN = "loss_mask"
# Preference pairs: 1 on the chosen response's targets, 2 on the rejected's, 0 elsewhere (in place of loss_mask).
PAIRS_COLUMN = "pair_mask"
SEGMENTS_COLUMN = "segment_starts"
# Prompts with answers (framework/data/prompts.py): a row per prompt, of its own length, in place of the columns above.
PROMPT_IDS, PROMPT, RECORD = "prompt_ids", "prompt", "record"
PROMPT_COLUMNS = (PROMPT_IDS, PROMPT, RECORD)
ROW_GROUP_ROWS = 1024


def pack_sequences(documents: List[List[int]], seq_len: int, eos_id: int) -> tuple[np.ndarray, int]:
    """Concatenate documents, each followed by EOS, into rows of `seq_len` tokens.

    Returns the rows and the number of trailing tokens that did not fill a row (dropped).
    """
    lengths = [len(doc) + 1 for doc in documents]
    stream = np.empty(sum(lengths), dtype=np.int32)
    pos = 0
    for doc in documents:
        stream[pos : pos + len(doc)] = doc
        stream[pos + len(doc)] = eos_id
        pos += len(doc) + 1
    rows = len(stream) // seq_len
    return stream[: rows * seq_len].reshape(rows, seq_len), len(stream) - rows * seq_len


def stream_segment_starts(documents: List[List[int]], rows: int, seq_len: int) -> List[np.ndarray]:
    """Where each of `rows` stream-packed rows (pack_sequences) starts a segment: 0, and every document start inside it."""
    starts = np.cumsum([0] + [len(doc) + 1 for doc in documents])[:-1]
    # The document starts strictly inside row r, in (r·seq_len, (r+1)·seq_len), lie in starts[after[r]:before[r]]
    # (starts ascend); one on a row boundary is that row's own start 0, not the previous row's position seq_len.
    bounds = np.arange(rows) * seq_len
    after, before = np.searchsorted(starts, bounds, side="right"), np.searchsorted(starts, bounds + seq_len, side="left")
    return [np.concatenate([[0], starts[after[r] : before[r]] - r * seq_len]).astype(np.int32) for r in range(rows)]


def pack_conversations(
    documents: List[tuple], seq_len: int, pad_id: int
) -> tuple[np.ndarray, np.ndarray, List[np.ndarray], int]:
    """Pack whole (ids, loss mask) documents of at most `seq_len` tokens into rows, best-fit decreasing.

    A document may carry a third item, where a second segment of it starts (a preference pair's rejected
    conversation): the two stay together in one row, each its own segment.

    Each document goes into the fullest row it fits (a new row when none has room), longest first, ties in
    the given order; the rest of a row is padding (`pad_id`, not a target, a segment of its own). Gives
    (ids [rows, seq_len], loss mask, each row's segment starts, padding tokens).
    """
    order = sorted(range(len(documents)), key=lambda i: -len(documents[i][0]))
    # Rows by free space: free[n] holds the rows with exactly n tokens of room left.
    free: List[List[int]] = [[] for _ in range(seq_len + 1)]
    has_room = np.zeros(seq_len + 1, dtype=bool)
    members: List[List[int]] = []
    for i in order:
        length = len(documents[i][0])
        roomy = np.flatnonzero(has_room[length:])
        if len(roomy):
            room = length + int(roomy[0])
            row = free[room].pop()
            has_room[room] = bool(free[room])
        else:
            room, row = seq_len, len(members)
            members.append([])
        members[row].append(i)
        if room > length:
            free[room - length].append(row)
            has_room[room - length] = True
    ids = np.full((len(members), seq_len), pad_id, dtype=np.int32)
    mask = np.zeros((len(members), seq_len), dtype=np.uint8)
    starts: List[np.ndarray] = []
    for r, row in enumerate(members):
        at, row_starts = 0, []
        for i in row:
            doc_ids, doc_mask = documents[i][:2]
            ids[r, at : at + len(doc_ids)], mask[r, at : at + len(doc_ids)] = doc_ids, doc_mask
            row_starts.append(at)
            if len(documents[i]) > 2:
                row_starts.append(at + documents[i][2])
            at += len(doc_ids)
        if at < seq_len:
            row_starts.append(at)  # the padding
        starts.append(np.asarray(row_starts, dtype=np.int32))
    padding = len(members) * seq_len - sum(len(d[0]) for d in documents)
    return ids, mask, starts, padding


def _fixed_lists(rows: np.ndarray, type_: pa.DataType) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(rows.reshape(-1), type=type_), rows.shape[1])


def rows_to_table(rows: np.ndarray, loss_mask: np.ndarray | None = None, segment_starts: List[np.ndarray] | None = None,
                  mask_column: str = MASK_COLUMN) -> pa.Table:
    """A table of fixed-size lists (int32 ids, uint8 mask under `mask_column`), which pyarrow reads back without copying,
    and each row's segment starts as a list of int32."""
    columns = {COLUMN: _fixed_lists(rows, pa.int32())}
    if loss_mask is not None:
        columns[mask_column] = _fixed_lists(loss_mask, pa.uint8())
    if segment_starts is not None:
        offsets = np.concatenate([[0], np.cumsum([len(s) for s in segment_starts])]).astype(np.int32)
        values = np.concatenate(segment_starts).astype(np.int32) if segment_starts else np.zeros(0, dtype=np.int32)
        columns[SEGMENTS_COLUMN] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=pa.int32()))
    return pa.table(columns)


def position_ids(starts: np.ndarray, offsets: np.ndarray, seq_len: int) -> np.ndarray:
    """Position ids [rows, seq_len] that restart at each row's segment starts (`starts[offsets[r]:offsets[r+1]]`)."""
    rows = len(offsets) - 1
    marks = np.zeros((rows, seq_len), dtype=np.int32)
    marks[np.repeat(np.arange(rows), np.diff(offsets)), starts] = starts
    # Starts ascend within a row, so the running maximum is the start of the segment each token is in.
    return (np.arange(seq_len, dtype=np.int32) - np.maximum.accumulate(marks, axis=1)).astype(np.int32)


def table_to_rows(table: pa.Table) -> np.ndarray:
    """The inverse of rows_to_table: a [rows, seq_len] int32 array."""
    column = table.column(COLUMN).combine_chunks()
    return column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), column.type.list_size)


def write_shard(table: pa.Table, uri: str) -> str:
    """Write one shard; gives its sha256. Fixed writer options keep identical input byte-identical on disk."""
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd", row_group_size=ROW_GROUP_ROWS)
    data = buffer.getvalue()
    fs, path = storage.resolve(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(data)
    return hashlib.sha256(data).hexdigest()


def directory_sha256(directory: str) -> str:
    """One hash of every file in a local directory (names and contents), e.g. a saved tokenizer."""
    digest = hashlib.sha256()
    for name in sorted(os.listdir(directory)):
        digest.update(name.encode() + b"\0")
        with open(os.path.join(directory, name), "rb") as f:
            digest.update(hashlib.sha256(f.read()).digest())
    return digest.hexdigest()


def fingerprint(manifest: Dict[str, Any]) -> str:
    """What a data set is, independent of where it is mounted: the tokenizer, row layout and every shard's content."""
    identity = {
        "tokenizer": manifest["tokenizer_sha256"],
        "seq_len": manifest["seq_len"],
        "columns": manifest["columns"],
        "splits": {split: [(s["file"], s["rows"], s["sha256"]) for s in manifest["splits"][split]["shards"]] for split in SPLITS},
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def read_manifest(data_dir: str) -> Dict[str, Any]:
    """The manifest prep wrote to `data_dir`; a clear error when prep has not run there."""
    uri = storage.join(data_dir, MANIFEST)
    if not storage.exists(uri):
        raise ConfigError(f"data.output_dir={data_dir}: no {MANIFEST} there; run `python launch/prep.py` first")
    manifest = storage.read_json(uri)
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ConfigError(
            f"data.output_dir={data_dir}: shards of manifest format {manifest.get('format')}, this version reads "
            f"format {MANIFEST_FORMAT}; run `python launch/prep.py` again with the same data settings"
        )
    return manifest


def shard_uris(data_dir: str, manifest: Dict[str, Any], split: str) -> List[str]:
    return [storage.join(data_dir, shard["file"]) for shard in manifest["splits"][split]["shards"]]


# ---------------------------------------------------------------------------------------------
# The folder prep writes into

def _is_prep_manifest(uri: str) -> bool:
    """Whether `uri` is a manifest prep wrote (a folder prepared before prep left its marker): prep's own fields."""
    try:
        manifest = storage.read_json(uri)
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and {"format", "fingerprint", "splits", "tokenizer_sha256"} <= manifest.keys()


def check_prep_dir(output_dir: str) -> None:
    """`data.output_dir` must be new, empty, or an earlier prep's (its PREP_MARKER, or a manifest prep wrote):
    a corpus a user keeps there is never written into or deleted."""
    fs, path = storage.resolve(output_dir)
    kind = fs.get_file_info(path).type
    if kind == pafs.FileType.File:
        raise ConfigError(f"data.output_dir={output_dir}: is a file; expected a directory to write the shards to")
    if kind == pafs.FileType.NotFound or not fs.get_file_info(pafs.FileSelector(path)):
        return
    if not (storage.exists(storage.join(output_dir, PREP_MARKER)) or _is_prep_manifest(storage.join(output_dir, MANIFEST))):
        raise ConfigError(
            f"data.output_dir={output_dir}: exists and holds something other than an earlier prep (no {PREP_MARKER} and no "
            f"{MANIFEST} written by prep); nothing there is replaced: choose a new or empty directory"
        )
