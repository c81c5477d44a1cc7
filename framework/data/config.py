"""The `data` group's schema (`conf/data/*`), read by prep (`framework/data/prepare.py`), and its checks."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import List, Optional

from omegaconf import MISSING

from framework.config import require

FORMATS = ("text", "jsonl", "parquet")
# How a text file is cut into documents: whole, at blank lines, one per line, or before every line a regex matches.
SPLIT_ON = ("file", "blank_lines", "lines", "regex")


@dataclass
class SourceConfig:
    # A file, a directory (read recursively) or a glob (`**` allowed).
    # The one exception to "YAML holds every value": the items of a list. A source a user adds on the
    # command line (`+data.sources.1={path: ...}`) has no YAML to take its other keys from, so
    # these item defaults are the schema's (tests/test_config.py names this exception).
    path: str = MISSING
    format: str = "text"  # text | jsonl | parquet
    field: str = "text"  # JSONL key or Parquet column holding the document text
    # Text files only: where one document ends and the next begins (SPLIT_ON).
    split_on: str = "file"
    # With split_on=regex: a line matching it starts a new document (WikiText: '^ = [^=].* = $').
    split_regex: Optional[str] = None


@dataclass
class TokenizerConfig:
    # A local Hugging Face tokenizer folder; when null a byte-level BPE is trained on the train split.
    path: Optional[str] = MISSING
    vocab_size: int = MISSING
    min_frequency: int = MISSING


@dataclass
class DataConfig:
    name: str = MISSING
    sources: List[SourceConfig] = MISSING
    output_dir: str = MISSING
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    seq_len: int = MISSING
    # A document goes to validation when the hash of its normalised content falls below this fraction.
    val_fraction: float = MISSING
    seed: int = MISSING
    # Each Ray task tokenises up to files_per_task files, or about mb_per_task megabytes of source:
    # a larger text, JSONL or Parquet file is cut (at document starts, lines, row groups) across tasks.
    files_per_task: int = MISSING
    mb_per_task: float = MISSING


def check_data(data: DataConfig) -> None:
    """The `data` rules a schema cannot express; raises ConfigError naming the first bad key."""
    require(data.seq_len >= 8, "data.seq_len", data.seq_len, "expected at least 8 tokens")
    require(0 < data.val_fraction < 1, "data.val_fraction", data.val_fraction, "expected a fraction in (0, 1): training evaluates on the validation split")
    require(data.files_per_task >= 1, "data.files_per_task", data.files_per_task, "expected at least 1")
    require(data.mb_per_task > 0, "data.mb_per_task", data.mb_per_task, "expected a positive number of megabytes")
    require(
        data.tokenizer.path is not None or data.tokenizer.vocab_size >= 256 + 1,
        "data.tokenizer.vocab_size", data.tokenizer.vocab_size, "expected more than 256 (the byte alphabet)",
    )
    for i, source in enumerate(data.sources):
        key = f"data.sources.{i}"
        require(source.format in FORMATS, f"{key}.format", source.format, f"expected one of {FORMATS}")
        require(source.split_on in SPLIT_ON, f"{key}.split_on", source.split_on, f"expected one of {SPLIT_ON}")
        require(
            source.format == "text" or source.split_on == "file", f"{key}.split_on", source.split_on,
            f"only text sources are split; a {source.format} source has one document per record (use split_on=file)",
        )
        require(
            (source.split_on == "regex") == (source.split_regex is not None), f"{key}.split_regex", source.split_regex,
            "expected a regex with split_on=regex, and null otherwise",
        )
        if source.split_regex is not None:
            try:
                re.compile(source.split_regex)
            except re.error as exc:
                require(False, f"{key}.split_regex", source.split_regex, f"not a valid regex ({exc})")
