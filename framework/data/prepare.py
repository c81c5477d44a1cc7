"""Data preparation: source files → tokenizer → packed Parquet token shards + manifest, in Ray tasks.

Text is tokenised and stream-packed; chat and prompt_completion sources are rendered into ids and loss
masks (framework/data/chat.py), packed whole, and their bad records counted per reason in the manifest.

Determinism: a document's split and its place in its shard come from the hash of its normalised
content (`sources.document_key`), never from timing, paths or slicing, so duplicates land in one split
and the same input always gives byte-identical shards. The tokenizer is trained on the train split only.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
import tempfile
import time
from typing import Any, Dict, List, Optional

import numpy as np
import pyarrow.fs as pafs
import ray
from tqdm import tqdm

from framework import storage
from framework.cluster import connect
from framework.config import ConfigError, absolute
from framework.data.chat import BAD_REASONS, BadRecord, ChatRenderer, bad_summary, chat_template, conversation_contents, conversation_text
from framework.data.config import DataConfig, is_chat, is_preference, is_prompts
from framework.data.prompts import prompt_text, prompts_table
from framework.data.shards import (
    COLUMN, MANIFEST, MANIFEST_FORMAT, MASK_COLUMN, PAIRS_COLUMN, PREP_MARKER, PROMPT_COLUMNS, ROW_GROUP_ROWS, SEGMENTS_COLUMN, SPLITS,
    TOKENIZER_DIR, check_prep_dir, directory_sha256, fingerprint, pack_conversations, pack_sequences, rows_to_table,
    stream_segment_starts, write_shard,
)
from framework.data.sources import (
    SourceFile, SourcePart, document_key, list_source_files, read_conversations, read_documents, split_source,
)
from framework.data.tokenizer import load_tokenizer, train_bpe_tokenizer
from framework.model import pad_token_id
from framework.tracking import TrackingConfig

SHARD_PATTERN = "part-*.parquet"


def split_of(key: bytes, val_fraction: float) -> str:
    """The split of a document with content key `key`: the first 8 bytes as a uniform number in [0, 1)."""
    return "validation" if int.from_bytes(key[:8], "big") / 2**64 < val_fraction else "train"


@ray.remote
def tokenize_and_pack(task_index: int, parts: List[SourcePart], tokenizer: Any, data: DataConfig, output_dir: str) -> Dict[str, Any]:
    """Tokenise one group of source slices and write one shard per split; returns the counts per split."""
    if is_chat(data):
        return _pack_chat(task_index, parts, tokenizer, data, output_dir)
    if is_prompts(data):
        return _pack_prompts(task_index, parts, tokenizer, data, output_dir)
    documents: Dict[str, List[tuple[bytes, str]]] = {split: [] for split in SPLITS}
    empty = 0
    for part in parts:
        for _, text in read_documents(part):
            if not text.strip():
                empty += 1
                continue
            key = document_key(text)
            documents[split_of(key, data.val_fraction)].append((key, text))
    counts: Dict[str, Any] = {}
    for split, docs in documents.items():
        docs.sort(key=lambda d: d[0])  # a content-keyed shuffle of documents
        ids = tokenizer([text for _, text in docs], add_special_tokens=False)["input_ids"] if docs else []
        rows, dropped = pack_sequences(ids, data.seq_len, tokenizer.eos_token_id)
        starts = stream_segment_starts(ids, len(rows), data.seq_len) if data.packing == "documents" else None
        counts[split] = _write(task_index, split, rows, None, starts, data, output_dir)
        counts[split].update(documents=len(docs), dropped_tokens=dropped)
    counts["empty_documents"] = empty
    return counts


def _write(task_index: int, split: str, rows: np.ndarray, mask: Any, starts: Any, data: DataConfig, output_dir: str) -> Dict[str, Any]:
    """Write one split's rows (shuffled: neighbouring rows of a row group come from different documents) as one shard."""
    order = np.random.default_rng([data.seed, task_index]).permutation(len(rows))
    rows = rows[order]
    mask = mask[order] if mask is not None else None
    starts = [starts[i] for i in order] if starts is not None else None
    file = f"{split}/part-{task_index:05d}.parquet"
    table = rows_to_table(rows, mask, starts, mask_column=PAIRS_COLUMN if is_preference(data) else MASK_COLUMN)
    sha = write_shard(table, storage.join(output_dir, file)) if len(rows) else None
    return {"file": file, "rows": len(rows), "sha256": sha}


def _count_bad(bad: Dict[str, Dict[str, Any]], record: BadRecord) -> None:
    """Count a bad record under its reason; the first of each reason is the manifest's example."""
    bad.setdefault(record.reason, {"count": 0, "example": record.detail})["count"] += 1


def _split_records(parts: List[SourcePart], data: DataConfig, known_by: Any) -> tuple:
    """({split: [(content key, record, where it is)], sorted by key: a content-keyed shuffle}, bad records counted):
    the records of a group of chat, preference or prompts slices, each in the split its content (`known_by`) hashes to."""
    records: Dict[str, List[tuple]] = {split: [] for split in SPLITS}
    bad: Dict[str, Dict[str, Any]] = {}
    for part in parts:
        for offset, item in read_conversations(part):
            if isinstance(item, BadRecord):
                _count_bad(bad, item)
                continue
            key = document_key(known_by(item))
            records[split_of(key, data.val_fraction)].append((key, item, f"{part.file.path} at byte {offset}"))
    for items in records.values():
        items.sort(key=lambda r: r[0])
    return records, bad


def _pack_prompts(task_index: int, parts: List[SourcePart], tokenizer: Any, data: DataConfig, output_dir: str) -> Dict[str, Any]:
    """Prompts with answers: each record one row (its rendered prompt, the prompt as given, its other fields), not packed."""
    records, bad = _split_records(parts, data, prompt_text)
    renderer = ChatRenderer(tokenizer, data)
    counts: Dict[str, Any] = {}
    for split, items in records.items():
        kept, ids = [], []
        for _, record, where in items:
            try:
                ids.append(renderer.render_prompt(record.messages))
                kept.append(record)
            except BadRecord as b:
                _count_bad(bad, BadRecord(b.reason, f"{b.detail} ({where})"))
        order = np.random.default_rng([data.seed, task_index]).permutation(len(kept))
        file = f"{split}/part-{task_index:05d}.parquet"
        table = prompts_table([ids[i] for i in order], [kept[i] for i in order])
        sha = write_shard(table, storage.join(output_dir, file)) if kept else None
        counts[split] = {"file": file, "rows": len(kept), "sha256": sha, "documents": len(kept), "dropped_tokens": 0,
                         "tokens": int(sum(len(i) for i in ids))}
    counts.update(empty_documents=0, bad_records=bad, truncated_records=0)
    return counts


def _pack_chat(task_index: int, parts: List[SourcePart], tokenizer: Any, data: DataConfig, output_dir: str) -> Dict[str, Any]:
    """The chat counterpart of tokenize_and_pack: conversations rendered with their loss masks, packed whole."""
    documents, bad = _split_records(parts, data, conversation_text)
    renderer = ChatRenderer(tokenizer, data)
    counts: Dict[str, Any] = {}
    truncated = 0
    render = renderer.render_pairs if is_preference(data) else renderer.render
    for split, docs in documents.items():
        kept = []
        for rendered, (_, _, where) in zip(render([messages for _, messages, _ in docs]), docs):
            if isinstance(rendered, BadRecord):
                _count_bad(bad, BadRecord(rendered.reason, f"{rendered.detail} ({where})"))
            else:
                # A preference pair: its rejected conversation is a second segment of the same document.
                kept.append((rendered.ids, rendered.mask) if rendered.second is None else (rendered.ids, rendered.mask, rendered.second))
                truncated += rendered.truncated
        rows, mask, starts, padding = pack_conversations(kept, data.seq_len, pad_token_id(tokenizer))
        counts[split] = _write(task_index, split, rows, mask, starts if data.packing == "documents" else None, data, output_dir)
        counts[split].update(documents=len(kept), dropped_tokens=0, target_tokens=int((mask > 0).sum()), padding_tokens=padding)
    counts.update(empty_documents=0, bad_records=bad, truncated_records=truncated)
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
            if is_chat(data):
                for _, messages in read_conversations(part):
                    if not isinstance(messages, BadRecord) and split_of(document_key(conversation_text(messages)), data.val_fraction) == "train":
                        yield conversation_contents(messages)
                continue
            for _, text in read_documents(part):
                if text.strip() and split_of(document_key(text), data.val_fraction) == "train":
                    yield text


def clear_previous(output_dir: str) -> None:
    """Remove an earlier prep's manifest, shards and tokenizer from `output_dir` (its files alone, by name), so a
    failed prep leaves nothing a run could train on."""
    fs, path = storage.resolve(output_dir)
    if storage.exists(storage.join(output_dir, MANIFEST)):
        fs.delete_file(f"{path}/{MANIFEST}")
    for split in SPLITS:
        if storage.exists(storage.join(output_dir, split)):
            for shard in fs.get_file_info(pafs.FileSelector(f"{path}/{split}")):
                if fnmatch.fnmatch(shard.base_name, SHARD_PATTERN):
                    fs.delete_file(shard.path)
    if storage.exists(storage.join(output_dir, TOKENIZER_DIR)):
        fs.delete_dir(f"{path}/{TOKENIZER_DIR}")


def prepare_shards(data: DataConfig, ray_address: Optional[str] = None, tracking: Optional[TrackingConfig] = None) -> Dict[str, Any]:
    """Prepare `data` into `data.output_dir` with Ray tasks on the cluster at `ray_address` (run.ray_address); returns the manifest.

    With tracking=mlflow the preparation is a run (its config, each split's counts), whose id goes beside the shards
    (tracking.json): training finds it there and runs as its child."""
    output_dir = absolute(data.output_dir)
    started = time.time()
    check_prep_dir(output_dir)
    files = list_source_files(data.sources)
    shas = [storage.file_sha256(f.path) for f in files]
    print(f"prep: {len(files)} source files → {output_dir}")
    storage.write_json(storage.join(output_dir, PREP_MARKER), {"written_by": "launch/prep.py"})
    clear_previous(output_dir)

    tokenizer = load_tokenizer(data.tokenizer.path) if data.tokenizer.path else train_bpe_tokenizer(train_texts(files, data), data.tokenizer)
    if data.chat_template is not None:
        tokenizer.chat_template = data.chat_template  # saved with the shards' tokenizer: checkpoints, exports and serving use it
    if is_chat(data) or is_prompts(data):
        chat_template(tokenizer, data)  # a tokenizer without a template fails here, in one line, before any task
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        tokenizer_sha = directory_sha256(tmp)
        storage.upload_dir(tmp, storage.join(output_dir, TOKENIZER_DIR))

    connect(ray_address)
    tokenizer_ref = ray.put(tokenizer)
    pending = {tokenize_and_pack.remote(t, parts, tokenizer_ref, data, output_dir): t for t, parts in enumerate(plan_tasks(files, data))}
    results: Dict[int, Dict[str, Any]] = {}
    with tqdm(total=len(pending), desc="prep: tokenise + pack", unit="task") as bar:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            results[pending.pop(done[0])] = ray.get(done[0])
            bar.update(1)
            if is_chat(data) or is_prompts(data):
                bar.set_postfix_str(bad_summary(merge_bad([r["bad_records"] for r in results.values()])), refresh=True)

    manifest = build_manifest(data, tokenizer, tokenizer_sha, files, shas, [results[t] for t in sorted(results)])
    for split in SPLITS:
        s = manifest["splits"][split]
        targets = f", {s['target_tokens']:,} of them targets" if "target_tokens" in s else ""
        kind = "pairs" if is_preference(data) else "prompts" if is_prompts(data) else "documents"
        print(f"prep: {split}: {s['rows']} rows, {s['tokens']:,} tokens{targets} from {s['documents']} {kind}")
    if manifest["empty_documents"]:
        print(f"prep: {manifest['empty_documents']} empty documents skipped")
    if "bad_records" in manifest:
        print(f"prep: {bad_summary(manifest['bad_records'])} (left out; counted in the manifest's bad_records, first of each there)")
        if manifest["truncated_records"]:
            print(f"prep: {manifest['truncated_records']} conversations cut after their last assistant turn that fits (data.overlong=truncate)")
    check_splits(manifest, data)
    storage.write_json(storage.join(output_dir, MANIFEST), manifest)
    print(f"prep: done in {time.time() - started:.1f}s")
    from framework import tracking as track

    ref = track.record_run(tracking, "prep", data.name, {"data": dataclasses.asdict(data)}, {"splits": manifest["splits"]})
    if ref is not None:
        storage.write_json(storage.join(output_dir, track.TRACKING_FILE), ref.as_dict())
    return manifest


def check_splits(manifest: Dict[str, Any], data: DataConfig) -> None:
    """Both splits must hold at least one row; otherwise no manifest is written and prep fails in one line."""
    splits = manifest["splits"]
    for split in SPLITS:
        if splits[split]["rows"] == 0:
            counts = ", ".join(f"{s}: {splits[s]['documents']} documents, {splits[s]['rows']} rows" for s in SPLITS)
            bad = manifest.get("bad_records")
            why = f"; {bad_summary(bad)}, e.g. {next(iter(bad.values()))['example']}" if bad else ""
            raise ConfigError(
                f"data.val_fraction={data.val_fraction}: the {split} split is empty ({counts} of {data.seq_len} tokens{why}); "
                f"prepare more text, split it into more documents (data.sources.N.split_on) or change data.val_fraction"
            )


def build_manifest(
    data: DataConfig, tokenizer: Any, tokenizer_sha: str, files: List[SourceFile], shas: List[str], counts: List[Dict[str, Any]]
) -> Dict[str, Any]:
    chat, prompts = is_chat(data), is_prompts(data)
    splits = {}
    for split in SPLITS:
        shards = [{"file": c[split]["file"], "rows": c[split]["rows"], "sha256": c[split]["sha256"]} for c in counts if c[split]["rows"]]
        rows = sum(s["rows"] for s in shards)
        splits[split] = {
            "rows": rows,
            # Prompts are rows of their own length; every other row is seq_len tokens.
            "tokens": sum(c[split]["tokens"] for c in counts) if prompts else rows * data.seq_len,
            "documents": sum(c[split]["documents"] for c in counts),
            "dropped_tokens": sum(c[split]["dropped_tokens"] for c in counts),
            "shards": shards,
        }
        if chat:
            for key in ("target_tokens", "padding_tokens"):
                splits[split][key] = sum(c[split][key] for c in counts)
    manifest = {
        "format": MANIFEST_FORMAT,
        "tokenizer": TOKENIZER_DIR,
        "tokenizer_sha256": tokenizer_sha,
        "vocab_size": len(tokenizer),
        "eos_token_id": tokenizer.eos_token_id,
        "seq_len": data.seq_len,
        "columns": list(PROMPT_COLUMNS) if prompts else [COLUMN] + ([(PAIRS_COLUMN if is_preference(data) else MASK_COLUMN)] if chat else [])
                   + ([SEGMENTS_COLUMN] if data.packing == "documents" else []),
        "packing": data.packing,
        "row_group_rows": ROW_GROUP_ROWS,
        "val_fraction": data.val_fraction,
        "seed": data.seed,
        "empty_documents": sum(c["empty_documents"] for c in counts),
        "splits": splits,
        "sources": [
            {"path": f.path, "sha256": sha, "format": f.format, "field": f.field, "split_on": f.split_on, "bytes": os.path.getsize(f.path),
             **({"prompt": f.prompt, "completion": f.completion} if f.format == "prompt_completion" else {}),
             **({"prompt": f.prompt, "chosen": f.chosen, "rejected": f.rejected} if f.format == "preference" else {}),
             **({"prompt": f.prompt} if f.format == "prompts" else {})}
            for f, sha in zip(files, shas)
        ],
    }
    if chat or prompts:
        manifest["bad_records"] = merge_bad([c["bad_records"] for c in counts])
        manifest["truncated_records"] = sum(c["truncated_records"] for c in counts)
    manifest["fingerprint"] = fingerprint(manifest)
    return manifest


def merge_bad(per_task: List[Dict[str, Dict[str, Any]]]) -> Dict[str, Dict[str, Any]]:
    """Bad-record counts summed over tasks (in task order: the example of each reason is the first task's)."""
    merged: Dict[str, Dict[str, Any]] = {}
    for bad in per_task:
        for reason, entry in bad.items():
            merged.setdefault(reason, {"count": 0, "example": entry["example"]})["count"] += entry["count"]
    return {r: merged[r] for r in BAD_REASONS if r in merged}
