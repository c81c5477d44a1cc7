"""Packed token shards: fixed-length sequences in Parquet, and the manifest that describes them."""

from __future__ import annotations

from typing import Any, Dict, List

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from framework import storage
from framework.config import ConfigError

MANIFEST = "manifest.json"
TOKENIZER_DIR = "tokenizer"
SPLITS = ("train", "validation")
COLUMN = "input_ids"


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


def rows_to_table(rows: np.ndarray) -> pa.Table:
    """A one-column table of fixed-size int32 lists, which Ray Data and pyarrow read without copying."""
    seq_len = rows.shape[1]
    values = pa.array(rows.reshape(-1), type=pa.int32())
    return pa.table({COLUMN: pa.FixedSizeListArray.from_arrays(values, seq_len)})


def table_to_rows(table: pa.Table) -> np.ndarray:
    """The inverse of rows_to_table: a [rows, seq_len] int32 array."""
    column = table.column(COLUMN).combine_chunks()
    return column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), column.type.list_size)


def write_shard(rows: np.ndarray, uri: str) -> None:
    """Write one shard; fixed writer options keep identical input byte-identical on disk."""
    fs, path = storage.resolve(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    pq.write_table(rows_to_table(rows), path, filesystem=fs, compression="zstd", row_group_size=1024)


def read_manifest(data_dir: str) -> Dict[str, Any]:
    """The manifest prep wrote to `data_dir`; a clear error when prep has not run there."""
    uri = storage.join(data_dir, MANIFEST)
    if not storage.exists(uri):
        raise ConfigError(f"data.output_dir={data_dir}: no {MANIFEST} there; run `python launch/prep.py` first")
    return storage.read_json(uri)


def shard_uris(data_dir: str, manifest: Dict[str, Any], split: str) -> List[str]:
    return [storage.join(data_dir, shard["file"]) for shard in manifest["splits"][split]["shards"]]
