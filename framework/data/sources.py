"""Input documents: which files a source names, how a file is cut into slices for prep tasks, and the documents in a slice.

A text source is cut into documents by `split_on`: the whole file, blank lines, one per line, or
before every line that `split_regex` matches (WikiText's ` = Title = ` headings). A chat or
prompt_completion source is JSONL whose records are conversations (`read_conversations`). Every large file —
text, JSONL or Parquet — is cut into slices of about `data.mb_per_task` MB so that many tasks read it,
and every document belongs to exactly one slice: the one its first byte (or row) falls in.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import unicodedata
import sysconfig
from pathlib import Path
from dataclasses import dataclass
from typing import Any, BinaryIO, Iterator, List, Optional, Tuple

import pyarrow.parquet as pq

from framework.config import ConfigError
from framework.data.config import SourceConfig


@dataclass(frozen=True)
class SourceFile:
    path: str
    format: str
    field: str
    split_on: str = "file"
    split_regex: Optional[str] = None
    prompt: str = "prompt"
    completion: str = "completion"
    chosen: str = "chosen"
    rejected: str = "rejected"


def list_source_files(sources: List[SourceConfig]) -> List[SourceFile]:
    """Expand each source's file, directory or glob into a sorted, de-duplicated file list."""
    files: dict[str, SourceFile] = {}
    for i, source in enumerate(sources):
        if os.path.isdir(source.path):
            matches = [p for p in glob.glob(os.path.join(source.path, "**", "*"), recursive=True) if os.path.isfile(p)]
        else:
            matches = [p for p in glob.glob(source.path, recursive=True) if os.path.isfile(p)]
        if not matches:
            raise ConfigError(f"data.sources.{i}.path={source.path}: no files match")
        for path in matches:
            path = os.path.abspath(path)
            files.setdefault(
                path, SourceFile(path, source.format, source.field, source.split_on, source.split_regex, source.prompt, source.completion,
                           source.chosen, source.rejected)
            )
    return [files[p] for p in sorted(files)]


@dataclass(frozen=True)
class SourcePart:
    """The slice of a source file that one prep task reads.

    Text and JSONL: the documents (records) that start in bytes [start, stop); Parquet: row groups
    [start, stop). `size` is the slice's size in bytes, for sizing tasks.
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
    if source.format == "text" and source.split_on == "file":
        return [SourcePart(source, 0, total, total)]
    return [SourcePart(source, a, min(a + part_bytes, total), min(part_bytes, total - a)) for a in range(0, total, part_bytes)] or [
        SourcePart(source, 0, 0, 0)
    ]


def read_documents(part: SourcePart) -> Iterator[Tuple[int, str]]:
    """Yield (position, document) in one slice of a file; the position (a byte offset for text and JSONL,
    a row for Parquet) names the document within its file whatever the slicing."""
    source = part.file
    if source.format == "text":
        if source.split_on == "file":
            with open(source.path, encoding="utf-8", errors="replace") as f:
                yield 0, f.read()
        else:
            yield from _text_documents(part)
    elif source.format == "jsonl":
        yield from _jsonl_documents(part)
    elif source.format in ("chat", "prompt_completion"):
        raise ValueError(f"{source.path}: {source.format} records are conversations: read them with read_conversations")
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


def _lines(f: BinaryIO, start: int) -> Iterator[Tuple[int, bytes]]:
    """(offset, line) of the lines that start at or after byte `start`."""
    f.seek(max(0, start - 1))
    if start > 0:
        f.readline()  # the rest of a line that began before `start` (or just its newline)
    while True:
        offset = f.tell()
        line = f.readline()
        if not line:
            return
        yield offset, line


def _previous_line_blank(f: BinaryIO, offset: int) -> bool:
    """Whether the line that ends just before `offset` (a line start) is blank; the start of the file counts as blank."""
    if offset == 0:
        return True
    back = min(offset, 1 << 16)
    f.seek(offset - back)
    chunk = f.read(back)[:-1]  # drop the newline that ends the previous line
    return not chunk[chunk.rfind(b"\n") + 1 :].strip()


def _text_documents(part: SourcePart) -> Iterator[Tuple[int, str]]:
    """The documents of a text file that start inside [start, stop), cut by the source's split_on."""
    source = part.file
    pattern = re.compile(source.split_regex) if source.split_regex else None

    with open(source.path, "rb") as f:
        first = None
        for offset, _ in _lines(f, part.start):
            first = offset
            break
        if first is None:
            return
        previous_blank = _previous_line_blank(f, first)
        doc_start, doc = None, []
        for offset, raw in _lines(f, first):
            line = raw.decode("utf-8", errors="replace")
            blank = not line.strip()
            if source.split_on == "lines":
                starts = not blank
            elif source.split_on == "blank_lines":
                starts = not blank and previous_blank
            else:
                starts = bool(pattern.search(line.rstrip("\r\n"))) or offset == 0
            previous_blank = blank
            if starts:
                if doc_start is not None:
                    yield doc_start, "".join(doc)
                if offset >= part.stop:
                    return
                doc_start, doc = offset, []
            if doc_start is not None and not (blank and source.split_on in ("lines", "blank_lines")):
                doc.append(line)
        if doc_start is not None:
            yield doc_start, "".join(doc)


def _jsonl_records(part: SourcePart) -> Iterator[Tuple[int, Any]]:
    """(offset, parsed record, or the ValueError of a line that is not JSON) of the non-blank lines that start
    inside [start, stop): each line belongs to exactly one slice."""
    with open(part.file.path, "rb") as f:
        for offset, line in _lines(f, part.start):
            if offset >= part.stop:
                break
            if not line.strip():
                continue
            try:
                yield offset, json.loads(line)
            except ValueError as exc:
                yield offset, exc


def _jsonl_documents(part: SourcePart) -> Iterator[Tuple[int, str]]:
    """The text of each record of a slice (`field`); a line that is not JSON, or lacks the field, fails prep."""
    source = part.file
    for offset, record in _jsonl_records(part):
        if isinstance(record, ValueError):
            raise ConfigError(f"data.sources.format=jsonl: {source.path} at byte {offset}: not a JSON line ({record})")
        if not isinstance(record, dict) or source.field not in record:
            raise ConfigError(f"data.sources.field={source.field}: missing in {source.path} at byte {offset}")
        yield offset, str(record[source.field])


def read_conversations(part: SourcePart) -> Iterator[Tuple[int, Any]]:
    """Yield (byte offset, messages) for each record of a chat or prompt_completion slice (a `chat.Pair` for each of a
    preference slice, a `prompts.PromptRecord` of a prompts slice); a record that is not a
    conversation yields a `chat.BadRecord` naming its reason instead (prep counts them; none is skipped silently)."""
    from framework.data.chat import BadRecord, conversation, preference_pair
    from framework.data.prompts import prompt_record

    source = part.file
    parse = {"preference": preference_pair, "prompts": prompt_record}.get(source.format, conversation)
    for offset, record in _jsonl_records(part):
        where = f"{source.path} at byte {offset}"
        if isinstance(record, ValueError):
            yield offset, BadRecord("malformed", f"not a JSON line ({where})")
            continue
        try:
            yield offset, parse(record, source)
        except BadRecord as bad:
            yield offset, BadRecord(bad.reason, f"{bad.detail} ({where})")


def normalise(text: str) -> str:
    """The content a document is known by: Unicode NFKC, no trailing spaces on lines, no blank lines around it."""
    lines = [line.rstrip() for line in unicodedata.normalize("NFKC", text).splitlines()]
    return "\n".join(lines).strip("\n")


def document_key(text: str) -> bytes:
    """A document's identity: the sha256 of its normalised content (duplicates share it, and so their split)."""
    return hashlib.sha256(normalise(text).encode()).digest()


def stdlib_prompts(count: int) -> List[str]:
    """`count` prompts of varied length: runs of consecutive stdlib source lines (real text every machine has)."""
    lines = [line for line in (Path(sysconfig.get_paths()["stdlib"]) / "json" / "decoder.py").read_text().splitlines() if line.strip()]
    return ["\n".join(lines[i * 3 % len(lines) : i * 3 % len(lines) + 1 + i % 4]) for i in range(count)]
