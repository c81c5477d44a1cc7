"""Prep: shards decode back to the source, counts match the manifest, the same input gives the same bytes."""

import glob
import json
import os

import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from conftest import SMALL_CORPUS
from framework.config import load_job_config
from framework.data.prepare import run
from framework.data.shards import read_manifest, table_to_rows


def _shards(data_dir, split):
    return sorted(glob.glob(os.path.join(data_dir, split, "*.parquet")))


def test_rows_decode_back_to_source_text(prepared_data):
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(prepared_data, "tokenizer"))
    sources = [open(p, encoding="utf-8", errors="replace").read() for p in sorted(glob.glob(SMALL_CORPUS))]
    corpus = "\x00".join(sources)
    checked = 0
    for path in _shards(prepared_data, "train")[:2] + _shards(prepared_data, "validation")[:1]:
        for row in table_to_rows(pq.read_table(path))[:50]:
            text = tokenizer.decode(row)
            if "\ufffd" in text:  # a multi-byte character cut at the row edge
                continue
            # A row is a contiguous run of the packed stream: documents joined by the EOS token.
            for piece in text.split(tokenizer.eos_token):
                assert piece in corpus, f"row text not found in the source: {piece[:80]!r}"
            checked += 1
    assert checked > 50


def test_counts_match_manifest(prepared_data):
    manifest = read_manifest(prepared_data)
    for split in ("train", "validation"):
        entry = manifest["splits"][split]
        rows = [pq.ParquetFile(p).metadata.num_rows for p in _shards(prepared_data, split)]
        assert sorted(rows) == sorted(s["rows"] for s in entry["shards"])
        assert sum(rows) == entry["rows"] > 0
        assert entry["tokens"] == entry["rows"] * manifest["seq_len"] == entry["rows"] * 64
    assert manifest["splits"]["train"]["documents"] + manifest["splits"]["validation"]["documents"] == len(glob.glob(SMALL_CORPUS))
    assert {s["path"] for s in manifest["sources"]} == {os.path.abspath(p) for p in glob.glob(SMALL_CORPUS)}
    assert all(len(s["sha256"]) == 64 for s in manifest["sources"])


def test_same_input_gives_byte_identical_shards(prepared_data, tmp_path, ray_session):
    again = str(tmp_path / "again")
    run(load_job_config([
        f"data.sources.0.path='{SMALL_CORPUS}'", "data.tokenizer.vocab_size=1024", "data.seq_len=64",
        "data.files_per_task=8", f"data.output_dir={again}",
    ]))
    first = _shards(prepared_data, "train") + _shards(prepared_data, "validation")
    second = _shards(again, "train") + _shards(again, "validation")
    assert [os.path.relpath(p, prepared_data) for p in first] == [os.path.relpath(p, again) for p in second]
    for a, b in zip(first, second):
        assert open(a, "rb").read() == open(b, "rb").read(), a
    assert open(os.path.join(prepared_data, "tokenizer", "tokenizer.json")).read() == open(os.path.join(again, "tokenizer", "tokenizer.json")).read()


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_jsonl_and_parquet_sources_read_the_named_field(tmp_path, ray_session, fmt):
    import pyarrow as pa

    docs = [open(p).read() for p in sorted(glob.glob(SMALL_CORPUS))[:6]]
    if fmt == "jsonl":
        source = tmp_path / "docs.jsonl"
        source.write_text("".join(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    else:
        source = tmp_path / "docs.parquet"
        pq.write_table(pa.table({"body": docs, "id": list(range(len(docs)))}), source, row_group_size=1)
    out = tmp_path / "out"
    # 50 kB per task: the one file (~250 kB) is cut into several slices, tokenised by several tasks.
    manifest = run(load_job_config([
        f"data={fmt}", f"data.sources.0.path='{source}'", "data.sources.0.field=body", "data.tokenizer.vocab_size=512",
        "data.seq_len=32", "data.val_fraction=0", "data.mb_per_task=0.05", f"data.output_dir={out}",
    ]))
    assert manifest["splits"]["train"]["documents"] == len(docs)
    assert len(manifest["splits"]["train"]["shards"]) >= 3
    tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer")
    text = tokenizer.decode(table_to_rows(pq.read_table(_shards(str(out), "train")[0]))[0])
    assert any(piece in d for d in docs for piece in text.split(tokenizer.eos_token) if piece)


def test_missing_field_is_a_clear_error(tmp_path, ray_session):
    source = tmp_path / "docs.jsonl"
    source.write_text(json.dumps({"text": "x"}) + "\n")
    with pytest.raises(Exception, match="data.sources.field=body"):
        run(load_job_config(["data=jsonl", f"data.sources.0.path='{source}'", "data.sources.0.field=body", f"data.output_dir={tmp_path / 'o'}"]))


@pytest.mark.parametrize("part_bytes", [1, 7, 100, 10_000, 10**9])
def test_every_jsonl_line_is_read_by_exactly_one_slice(tmp_path, part_bytes):
    from framework.data.sources import SourceFile, read_documents, split_source

    lines = [{"text": f"document {i} " + "x" * (i * 37 % 200)} for i in range(60)]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps(line) + ("\n\n" if i % 7 == 0 else "\n") for i, line in enumerate(lines)))
    source = SourceFile(str(path), "jsonl", "text")
    read = [doc for part in split_source(source, part_bytes) for doc in read_documents(part)]
    assert [text for _, text in read] == [line["text"] for line in lines]
    assert len({position for position, _ in read}) == len(lines)
