"""Input documents: which files a source names, and the texts inside them."""

from __future__ import annotations

import glob
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Iterator, List

import pyarrow.parquet as pq

from framework.config import ConfigError, SourceConfig


@dataclass(frozen=True)
class SourceFile:
    path: str
    format: str
    field: str


def list_source_files(sources: List[SourceConfig]) -> List[SourceFile]:
    """Expand each source's file, directory or glob into a sorted, de-duplicated file list."""
    files: dict[str, SourceFile] = {}
    for i, source in enumerate(sources):
        if os.path.isdir(source.path):
            matches = [p for p in glob.glob(os.path.join(source.path, "**", "*"), recursive=True) if os.path.isfile(p)]
        else:
            matches = [p for p in glob.glob(source.path, recursive=True) if os.path.isfile(p)]
        if not matches:
            raise ConfigError(f"data.sources[{i}].path={source.path}: no files match")
        for path in matches:
            files.setdefault(os.path.abspath(path), SourceFile(os.path.abspath(path), source.format, source.field))
    return [files[p] for p in sorted(files)]


def read_documents(source: SourceFile) -> Iterator[str]:
    """Yield the documents in one file: the whole file for text, one per JSONL line or Parquet row."""
    if source.format == "text":
        with open(source.path, encoding="utf-8", errors="replace") as f:
            yield f.read()
    elif source.format == "jsonl":
        with open(source.path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                record = json.loads(line)
                if source.field not in record:
                    raise ConfigError(f"data.sources.field={source.field}: missing in {source.path}:{lineno}")
                yield str(record[source.field])
    elif source.format == "parquet":
        parquet = pq.ParquetFile(source.path)
        if source.field not in parquet.schema_arrow.names:
            raise ConfigError(
                f"data.sources.field={source.field}: no such column in {source.path} "
                f"(columns: {', '.join(parquet.schema_arrow.names)})"
            )
        for batch in parquet.iter_batches(columns=[source.field]):
            for text in batch.column(0).to_pylist():
                if text is not None:
                    yield text
    else:
        raise ConfigError(f"data.sources.format={source.format}: expected text, jsonl or parquet")


def file_sha256(path: str) -> str:
    """Content hash of a source file, recorded in the manifest."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
