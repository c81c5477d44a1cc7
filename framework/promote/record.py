"""The promotion record: which model is serving (`path`, so serving reads the record as it reads a best.json), and
every model promoted before it, for rollback. Written whole or not at all."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Optional

from framework.config import ConfigError

RECORD_KIND = "framework.promotion"


def read_record(path: str) -> Optional[Dict[str, Any]]:
    """The record at `path`; None if there is none yet. A file there that is not one is refused."""
    if not os.path.exists(path):
        return None
    try:
        record = json.loads(Path(path).read_text())
    except ValueError as exc:
        raise ConfigError(f"promote.record={path}: not JSON ({exc})") from None
    if not isinstance(record, dict) or record.get("kind") != RECORD_KIND:
        raise ConfigError(f"promote.record={path}: exists and is not a promotion record; choose another promote.record")
    return record


def write_record(path: str, record: Dict[str, Any]) -> None:
    from framework import storage

    storage.write_json(os.path.abspath(path), {"kind": RECORD_KIND, **record})
