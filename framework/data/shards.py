"""Packed token shards: fixed-length sequences in Parquet, and the manifest that describes them.

A shard holds `input_ids` (seq_len tokens per row) and, for data with targets (chat), `loss_mask`
(1 where a token is a target). Rows are written in row groups of ROW_GROUP_ROWS, the unit the sample
order shuffles and workers read (framework/data/sampler.py, stream.py). The manifest lists every shard
with its row count and sha256, and a fingerprint of the whole data set (tokenizer and shards, no paths)
that a resumed run must match.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from typing import Any, Dict, List

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from framework import storage
from framework.config import ConfigError

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 2
TOKENIZER_DIR = "tokenizer"
SPLITS = ("train", "validation")
COLUMN = "input_ids"
MASK_COLUMN = "loss_mask"
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


def _fixed_lists(rows: np.ndarray, type_: pa.DataType) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(rows.reshape(-1), type=type_), rows.shape[1])


def rows_to_table(rows: np.ndarray, loss_mask: np.ndarray | None = None) -> pa.Table:
    """A table of fixed-size lists (int32 ids, uint8 mask), which pyarrow reads back without copying."""
    columns = {COLUMN: _fixed_lists(rows, pa.int32())}
    if loss_mask is not None:
        columns[MASK_COLUMN] = _fixed_lists(loss_mask, pa.uint8())
    return pa.table(columns)


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
