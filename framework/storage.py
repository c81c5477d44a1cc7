"""Paths that may be local directories or object-store URIs, read and written through pyarrow.fs."""

from __future__ import annotations

import json
import os
from typing import Any, Tuple

import pyarrow.fs as pafs


def resolve(uri: str) -> Tuple[pafs.FileSystem, str]:
    """The filesystem and in-filesystem path for a local path or a URI such as s3://bucket/key."""
    if "://" not in uri:
        return pafs.LocalFileSystem(), os.path.abspath(uri)
    return pafs.FileSystem.from_uri(uri)


def join(base: str, *parts: str) -> str:
    """`base/part/...`; a URI's query (s3://b/p?endpoint_override=...) stays at the end."""
    path, query = base.split("?", 1) if "?" in base else (base, None)
    joined = "/".join([path.rstrip("/"), *parts])
    return f"{joined}?{query}" if query else joined


def file_sha256(path: str) -> str:
    """The sha256 of a local file's content."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def delete_dir(uri: str) -> None:
    fs, path = resolve(uri)
    fs.delete_dir(path)


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def write_json(uri: str, obj: Any) -> None:
    """Write JSON whole or not at all: a local file is written beside its place and renamed into it (an object
    store's PUT is all-or-nothing already), so a reader never sees half a file."""
    text = (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()
    fs, path = resolve(uri)
    fs.create_dir(os.path.dirname(path), recursive=True)
    if "://" in uri:
        with fs.open_output_stream(path) as f:
            f.write(text)
        return
    staged = f"{path}.tmp-{os.getpid()}"
    with open(staged, "wb") as f:
        f.write(text)
    os.replace(staged, path)


def read_text(uri: str) -> str:
    fs, path = resolve(uri)
    with fs.open_input_stream(path) as f:
        return f.read().decode()


def read_json(uri: str) -> Any:
    return json.loads(read_text(uri))


def upload_dir(local_dir: str, uri: str) -> None:
    """Copy a local directory to `uri` (a no-op copy when both are the same local place)."""
    fs, path = resolve(uri)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(local_dir, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def download_dir(uri: str, local_dir: str) -> None:
    """Copy the directory at `uri` into a local directory (created if missing)."""
    fs, path = resolve(uri)
    os.makedirs(local_dir, exist_ok=True)
    pafs.copy_files(path, local_dir, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
