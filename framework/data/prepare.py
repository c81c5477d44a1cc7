"""Data preparation: source files → tokenizer → packed Parquet token shards + manifest, in Ray tasks.

Determinism: a document's split and its place in its shard come from the hash of its normalised
content (`sources.document_key`), never from timing, paths or slicing, so duplicates land in one split
and the same input always gives byte-identical shards. The tokenizer is trained on the train split only.
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any, Dict, List

import numpy as np
import ray
from tqdm import tqdm

from framework import storage
from framework.cluster import connect
from framework.config import ConfigError, absolute
from framework.data.config import DataConfig
from framework.data.shards import (
    COLUMN, MANIFEST, MANIFEST_FORMAT, ROW_GROUP_ROWS, SPLITS, TOKENIZER_DIR, directory_sha256, fingerprint, pack_sequences,
    rows_to_table, write_shard,
)
from framework.data.sources import SourceFile, SourcePart, document_key, list_source_files, read_documents, split_source
from framework.data.tokenizer import load_tokenizer, train_bpe_tokenizer
from framework.schema import Config


def split_of(key: bytes, val_fraction: float) -> str:
    """The split of a document with content key `key`: the first 8 bytes as a uniform number in [0, 1)."""
    return "validation" if int.from_bytes(key[:8], "big") / 2**64 < val_fraction else "train"


@ray.remote
def tokenize_and_pack(task_index: int, parts: List[SourcePart], tokenizer: Any, data: DataConfig, output_dir: str) -> Dict[str, Dict[str, Any]]:
    """Tokenise one group of source slices and write one shard per split; returns the counts per split."""
    documents: Dict[str, List[tuple[bytes, str]]] = {split: [] for split in SPLITS}
    empty = 0
    for part in parts:
        for _, text in read_documents(part):
            if not text.strip():
                empty += 1
                continue
            key = document_key(text)
            documents[split_of(key, data.val_fraction)].append((key, text))
    counts: Dict[str, Dict[str, Any]] = {}
    for split, docs in documents.items():
        docs.sort(key=lambda d: d[0])  # a content-keyed shuffle of documents
        ids = tokenizer([text for _, text in docs], add_special_tokens=False)["input_ids"] if docs else []
        rows, dropped = pack_sequences(ids, data.seq_len, tokenizer.eos_token_id)
        # Neighbouring rows of a row group come from different documents.
        rows = rows[np.random.default_rng([data.seed, task_index]).permutation(len(rows))]
        file = f"{split}/part-{task_index:05d}.parquet"
        sha = write_shard(rows_to_table(rows), storage.join(output_dir, file)) if len(rows) else None
        counts[split] = {"file": file, "rows": len(rows), "documents": len(docs), "dropped_tokens": dropped, "sha256": sha}
    counts["empty_documents"] = empty
    return counts


def plan_tasks(files: List[SourceFile], data: DataConfig) -> List[List[SourcePart]]:
    """Slices of the sources, grouped into Ray tasks of at most data.files_per_task slices and about
    data.mb_per_task megabytes: many small files share a task, one large file is cut into many."""
    part_bytes = int(data.mb_per_task * 2**20)
    tasks: List[List[SourcePart]] = []
    current: List[SourcePart] = []
    size = 0
    for source in files:
        for part in split_source(source, part_bytes):
            if current and (len(current) >= data.files_per_task or size + part.size > part_bytes):
                tasks.append(current)
                current, size = [], 0
            current.append(part)
            size += part.size
    return tasks + [current] if current else tasks


def train_texts(files: List[SourceFile], data: DataConfig):  # noqa: ANN201 - a generator of strings
    """The train split's documents, for training the tokenizer (validation text must not shape it)."""
    for source in files:
        for part in split_source(source, 2**62):
            for _, text in read_documents(part):
                if text.strip() and split_of(document_key(text), data.val_fraction) == "train":
                    yield text


def clear_previous(output_dir: str) -> None:
    """Remove an earlier prep's manifest and shards from `output_dir`, so a failed prep leaves nothing a run could train on."""
    if not storage.exists(storage.join(output_dir, MANIFEST)):
        return
    fs, path = storage.resolve(output_dir)
    fs.delete_file(f"{path}/{MANIFEST}")
    for name in (*SPLITS, TOKENIZER_DIR):
        if storage.exists(storage.join(output_dir, name)):
            fs.delete_dir(f"{path}/{name}")


def run(cfg: Config) -> Dict[str, Any]:
    """Prepare `cfg.data` into `cfg.data.output_dir`; returns the manifest."""
    data = cfg.data
    output_dir = absolute(data.output_dir)
    started = time.time()
    files = list_source_files(data.sources)
    shas = [storage.file_sha256(f.path) for f in files]
    print(f"prep: {len(files)} source files → {output_dir}")
    clear_previous(output_dir)

    tokenizer = load_tokenizer(data.tokenizer.path) if data.tokenizer.path else train_bpe_tokenizer(train_texts(files, data), data.tokenizer)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        tokenizer_sha = directory_sha256(tmp)
        storage.upload_dir(tmp, storage.join(output_dir, TOKENIZER_DIR))

    connect(cfg.run.ray_address)
    tokenizer_ref = ray.put(tokenizer)
    pending = {tokenize_and_pack.remote(t, parts, tokenizer_ref, data, output_dir): t for t, parts in enumerate(plan_tasks(files, data))}
    results: Dict[int, Dict[str, Any]] = {}
    with tqdm(total=len(pending), desc="prep: tokenise + pack", unit="task") as bar:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            results[pending.pop(done[0])] = ray.get(done[0])
            bar.update(1)

    manifest = build_manifest(data, tokenizer, tokenizer_sha, files, shas, [results[t] for t in sorted(results)])
    for split in SPLITS:
        s = manifest["splits"][split]
        print(f"prep: {split}: {s['rows']} rows, {s['tokens']:,} tokens from {s['documents']} documents")
    if manifest["empty_documents"]:
        print(f"prep: {manifest['empty_documents']} empty documents skipped")
    check_splits(manifest, data)
    storage.write_json(storage.join(output_dir, MANIFEST), manifest)
    print(f"prep: done in {time.time() - started:.1f}s")
    return manifest


def check_splits(manifest: Dict[str, Any], data: DataConfig) -> None:
    """Both splits must hold at least one row; otherwise no manifest is written and prep fails in one line."""
    splits = manifest["splits"]
    for split in SPLITS:
        if splits[split]["rows"] == 0:
            counts = ", ".join(f"{s}: {splits[s]['documents']} documents, {splits[s]['rows']} rows" for s in SPLITS)
            raise ConfigError(
                f"data.val_fraction={data.val_fraction}: the {split} split is empty ({counts} of {data.seq_len} tokens); "
                f"prepare more text, split it into more documents (data.sources.N.split_on) or change data.val_fraction"
            )


def build_manifest(
    data: DataConfig, tokenizer: Any, tokenizer_sha: str, files: List[SourceFile], shas: List[str], counts: List[Dict[str, Any]]
) -> Dict[str, Any]:
    splits = {}
    for split in SPLITS:
        shards = [{"file": c[split]["file"], "rows": c[split]["rows"], "sha256": c[split]["sha256"]} for c in counts if c[split]["rows"]]
        rows = sum(s["rows"] for s in shards)
        splits[split] = {
            "rows": rows,
            "tokens": rows * data.seq_len,
            "documents": sum(c[split]["documents"] for c in counts),
            "dropped_tokens": sum(c[split]["dropped_tokens"] for c in counts),
            "shards": shards,
        }
    manifest = {
        "format": MANIFEST_FORMAT,
        "tokenizer": TOKENIZER_DIR,
        "tokenizer_sha256": tokenizer_sha,
        "vocab_size": len(tokenizer),
        "eos_token_id": tokenizer.eos_token_id,
        "seq_len": data.seq_len,
        "columns": [COLUMN],
        "row_group_rows": ROW_GROUP_ROWS,
        "val_fraction": data.val_fraction,
        "seed": data.seed,
        "empty_documents": sum(c["empty_documents"] for c in counts),
        "splits": splits,
        "sources": [
            {"path": f.path, "sha256": sha, "format": f.format, "field": f.field, "split_on": f.split_on, "bytes": os.path.getsize(f.path)}
            for f, sha in zip(files, shas)
        ],
    }
    manifest["fingerprint"] = fingerprint(manifest)
    return manifest
