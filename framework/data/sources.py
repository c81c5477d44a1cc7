"""Input documents: which files a source names, and the texts inside them."""

from __future__ import annotations

import glob
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Iterator, List, Tuple

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


@dataclass(frozen=True)
class SourcePart:
    """The slice of a source file that one prep task reads.

    JSONL: the lines that start in bytes [start, stop); Parquet: row groups [start, stop); a text file
    is one document, read whole. `size` is the slice's size in bytes, for sizing tasks.
    """

    file: SourceFile
    start: int
    stop: int
    size: int


def split_source(source: SourceFile, part_bytes: int) -> List[SourcePart]:
    """Cut a file into slices of about `part_bytes`, so that one large file is read by many tasks."""
    if source.format == "parquet":
        metadata = pq.ParquetFile(source.path).metadata
        groups = [metadata.row_group(i).total_byte_size for i in range(metadata.num_row_groups)]
        parts, first, size = [], 0, 0
        for i, group_size in enumerate(groups):
            size += group_size
            if size >= part_bytes or i == len(groups) - 1:
                parts.append(SourcePart(source, first, i + 1, size))
                first, size = i + 1, 0
        return parts or [SourcePart(source, 0, 0, 0)]
    total = os.path.getsize(source.path)
    if source.format == "jsonl":
        return [SourcePart(source, a, min(a + part_bytes, total), min(part_bytes, total - a)) for a in range(0, total, part_bytes)] or [
            SourcePart(source, 0, 0, 0)
        ]
    return [SourcePart(source, 0, total, total)]


def read_documents(part: SourcePart) -> Iterator[Tuple[int, str]]:
    """Yield (position, document) in one slice of a file; the position (a byte offset for JSONL, a row
    for Parquet, 0 for a text file) names the document within its file whatever the slicing."""
    source = part.file
    if source.format == "text":
        with open(source.path, encoding="utf-8", errors="replace") as f:
            yield 0, f.read()
    elif source.format == "jsonl":
        yield from _jsonl_documents(part)
    elif source.format == "parquet":
        parquet = pq.ParquetFile(source.path)
        if source.field not in parquet.schema_arrow.names:
            raise ConfigError(
                f"data.sources.field={source.field}: no such column in {source.path} "
                f"(columns: {', '.join(parquet.schema_arrow.names)})"
            )
        row = sum(parquet.metadata.row_group(i).num_rows for i in range(part.start))
        groups = list(range(part.start, part.stop))
        for batch in parquet.iter_batches(columns=[source.field], row_groups=groups) if groups else ():
            for text in batch.column(0).to_pylist():
                if text is not None:
                    yield row, text
                row += 1
    else:
        raise ConfigError(f"data.sources.format={source.format}: expected text, jsonl or parquet")


def _jsonl_documents(part: SourcePart) -> Iterator[Tuple[int, str]]:
    """The records of the lines that start inside [start, stop): each line belongs to exactly one slice."""
    source = part.file
    with open(source.path, "rb") as f:
        if part.start > 0:
            f.seek(part.start - 1)
            f.readline()  # the rest of a line that began before this slice (or just its newline)
        while (offset := f.tell()) < part.stop:
            line = f.readline()
            if not line:
                break
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as exc:
                raise ConfigError(f"data.sources.format=jsonl: {source.path} at byte {offset}: not a JSON line ({exc})") from None
            if not isinstance(record, dict) or source.field not in record:
                raise ConfigError(f"data.sources.field={source.field}: missing in {source.path} at byte {offset}")
            yield offset, str(record[source.field])


def file_sha256(path: str) -> str:
    """Content hash of a source file, recorded in the manifest."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
