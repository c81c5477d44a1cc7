"""Data preparation: source files → tokenizer → packed Parquet token shards + manifest, in Ray tasks.

Determinism: a document's split and its place in the shard order come from hashes of its content
and index, never from timing or paths, so the same input always gives byte-identical shards.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from typing import Any, Dict, List

import numpy as np
import ray
from tqdm import tqdm

from framework import storage
from framework.cluster import connect
from framework.config import DataConfig, JobConfig, absolute
from framework.data.shards import MANIFEST, SPLITS, TOKENIZER_DIR, pack_sequences, write_shard
from framework.data.sources import SourceFile, SourcePart, file_sha256, list_source_files, read_documents, split_source
from framework.data.tokenizer import load_tokenizer, train_bpe_tokenizer


def _document_key(file_sha: str, index: int) -> bytes:
    return hashlib.sha256(f"{file_sha}:{index}".encode()).digest()


def _split_of(key: bytes, val_fraction: float) -> str:
    # The first 8 bytes of the hash as a uniform number in [0, 1).
    return "validation" if int.from_bytes(key[:8], "big") / 2**64 < val_fraction else "train"


@ray.remote
def tokenize_and_pack(
    task_index: int, parts: List[SourcePart], shas: Dict[str, str], tokenizer: Any, data: DataConfig, output_dir: str
) -> Dict[str, Dict[str, int]]:
    """Tokenise one group of source slices and write one shard per split; returns the counts per split."""
    documents: Dict[str, List[tuple[bytes, str]]] = {split: [] for split in SPLITS}
    for part in parts:
        for position, text in read_documents(part):
            key = _document_key(shas[part.file.path], position)
            documents[_split_of(key, data.val_fraction)].append((key, text))
    counts: Dict[str, Dict[str, int]] = {}
    for split, docs in documents.items():
        docs.sort(key=lambda d: d[0])  # a content-keyed shuffle of documents
        ids = tokenizer([text for _, text in docs], add_special_tokens=False)["input_ids"] if docs else []
        rows, dropped = pack_sequences(ids, data.seq_len, tokenizer.eos_token_id)
        # Shuffle rows so that neighbouring rows in a batch come from different documents.
        rows = rows[np.random.default_rng([data.seed, task_index]).permutation(len(rows))]
        file = f"{split}/part-{task_index:05d}.parquet"
        if len(rows):
            write_shard(rows, storage.join(output_dir, file))
        counts[split] = {"file": file, "rows": len(rows), "documents": len(docs), "dropped_tokens": dropped}
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


def run(cfg: JobConfig) -> Dict[str, Any]:
    """Prepare `cfg.data` into `cfg.data.output_dir`; returns the manifest."""
    data = cfg.data
    output_dir = absolute(data.output_dir)
    started = time.time()
    files = list_source_files(data.sources)
    shas = [file_sha256(f.path) for f in files]
    print(f"prep: {len(files)} source files → {output_dir}")

    if data.tokenizer.path:
        tokenizer = load_tokenizer(data.tokenizer.path)
    else:
        texts = (text for f in files for part in split_source(f, 2**62) for _, text in read_documents(part))
        tokenizer = train_bpe_tokenizer(texts, data.tokenizer)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        storage.upload_dir(tmp, storage.join(output_dir, TOKENIZER_DIR))

    connect(cfg.run.ray_address)
    tokenizer_ref = ray.put(tokenizer)
    by_path = dict(zip((f.path for f in files), shas))
    pending = {
        tokenize_and_pack.remote(t, parts, {p.file.path: by_path[p.file.path] for p in parts}, tokenizer_ref, data, output_dir): t
        for t, parts in enumerate(plan_tasks(files, data))
    }
    results: Dict[int, Dict[str, Dict[str, int]]] = {}
    with tqdm(total=len(pending), desc="prep: tokenise + pack", unit="task") as bar:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            results[pending.pop(done[0])] = ray.get(done[0])
            bar.update(1)

    manifest = _manifest(data, tokenizer, files, shas, [results[t] for t in sorted(results)])
    storage.write_json(storage.join(output_dir, MANIFEST), manifest)
    for split in SPLITS:
        s = manifest["splits"][split]
        print(f"prep: {split}: {s['rows']} rows, {s['tokens']:,} tokens from {s['documents']} documents")
    print(f"prep: done in {time.time() - started:.1f}s")
    return manifest


def _manifest(
    data: DataConfig, tokenizer: Any, files: List[SourceFile], shas: List[str], counts: List[Dict[str, Dict[str, int]]]
) -> Dict[str, Any]:
    splits = {}
    for split in SPLITS:
        shards = [{"file": c[split]["file"], "rows": c[split]["rows"]} for c in counts if c[split]["rows"]]
        rows = sum(s["rows"] for s in shards)
        splits[split] = {
            "rows": rows,
            "tokens": rows * data.seq_len,
            "documents": sum(c[split]["documents"] for c in counts),
            "dropped_tokens": sum(c[split]["dropped_tokens"] for c in counts),
            "shards": shards,
        }
    return {
        "format": 1,
        "tokenizer": TOKENIZER_DIR,
        "vocab_size": len(tokenizer),
        "eos_token_id": tokenizer.eos_token_id,
        "seq_len": data.seq_len,
        "val_fraction": data.val_fraction,
        "seed": data.seed,
        "splits": splits,
        "sources": [
            {"path": f.path, "sha256": sha, "format": f.format, "field": f.field, "bytes": os.path.getsize(f.path)}
            for f, sha in zip(files, shas)
        ],
    }
