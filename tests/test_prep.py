"""Prep: shards decode back to the source, counts match the manifest, the same input gives the same bytes,
documents come from content (their split too), text files are cut into documents, and empty splits fail."""

import glob
import json
import os
import sysconfig

import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from conftest import SMALL_CORPUS, launch, prep_overrides
from framework.config import ConfigError
from framework.data.prepare import prepare_shards, split_of
from framework.data.shards import read_manifest, table_to_rows
from framework.data.sources import SourceFile, document_key, read_documents, split_source
from framework.train.config import TRAIN



def _shards(data_dir, split):
    return sorted(glob.glob(os.path.join(data_dir, split, "*.parquet")))


@pytest.mark.slow
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


@pytest.mark.slow
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
    assert all(len(s["sha256"]) == 64 for split in ("train", "validation") for s in manifest["splits"][split]["shards"])
    assert len(manifest["fingerprint"]) == 64 and manifest["row_group_rows"] == 1024


@pytest.mark.slow
def test_same_input_gives_byte_identical_shards(prepared_data, tmp_path, ray_session):
    again = str(tmp_path / "again")
    assert prepare_shards(TRAIN.from_overrides(prep_overrides(again)).data)["fingerprint"] == read_manifest(prepared_data)["fingerprint"]
    first = _shards(prepared_data, "train") + _shards(prepared_data, "validation")
    second = _shards(again, "train") + _shards(again, "validation")
    assert [os.path.relpath(p, prepared_data) for p in first] == [os.path.relpath(p, again) for p in second]
    for a, b in zip(first, second):
        assert open(a, "rb").read() == open(b, "rb").read(), a
    assert open(os.path.join(prepared_data, "tokenizer", "tokenizer.json")).read() == open(os.path.join(again, "tokenizer", "tokenizer.json")).read()


@pytest.mark.slow
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
    manifest = prepare_shards(TRAIN.from_overrides([
        f"data={fmt}", f"data.sources.0.path='{source}'", "data.sources.0.field=body", "data.tokenizer.vocab_size=512",
        "data.seq_len=32", "data.val_fraction=0.3", "data.mb_per_task=0.05", f"data.output_dir={out}",
    ]).data)
    assert manifest["splits"]["train"]["documents"] + manifest["splits"]["validation"]["documents"] == len(docs)
    assert len(manifest["splits"]["train"]["shards"]) >= 3
    tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer")
    text = tokenizer.decode(table_to_rows(pq.read_table(_shards(str(out), "train")[0]))[0])
    assert any(piece in d for d in docs for piece in text.split(tokenizer.eos_token) if piece)


@pytest.mark.slow
def test_missing_field_is_a_clear_error(tmp_path, ray_session):
    source = tmp_path / "docs.jsonl"
    source.write_text(json.dumps({"text": "x"}) + "\n")
    with pytest.raises(ConfigError, match="data.sources.field=body"):
        prepare_shards(TRAIN.from_overrides(["data=jsonl", f"data.sources.0.path='{source}'", "data.sources.0.field=body", f"data.output_dir={tmp_path / 'o'}"]).data)


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


def _wikitext(articles: int = 120) -> str:
    """A WikiText-style dump from real text: each stdlib module's first lines as an article under ` = Title = `."""
    std = sysconfig.get_paths()["stdlib"]
    parts = []
    for path in sorted(glob.glob(f"{std}/*.py"))[:articles]:
        lines = [line for line in open(path, encoding="utf-8", errors="replace").read().splitlines()[:40] if line.strip()]
        title = os.path.basename(path)[:-3]
        parts.append(f" = {title} = \n\n" + "\n".join(lines[:12]) + "\n\n = = Notes = = \n\n" + "\n".join(lines[12:24]) + "\n\n")
    return "".join(parts)


WIKITEXT_REGEX = r"^ = [^=].* = $"


@pytest.mark.parametrize("split_on, regex", [("regex", WIKITEXT_REGEX), ("blank_lines", None), ("lines", None)])
@pytest.mark.parametrize("part_bytes", [1, 97, 5_000, 10**9])
def test_every_text_document_is_read_by_exactly_one_slice(tmp_path, split_on, regex, part_bytes):
    path = tmp_path / "wiki.txt"
    path.write_text(_wikitext(30))
    source = SourceFile(str(path), "text", "text", split_on, regex)
    whole = [doc for part in split_source(source, 10**12) for doc in read_documents(part)]
    sliced = [doc for part in split_source(source, part_bytes) for doc in read_documents(part)]
    assert sliced == whole and len({pos for pos, _ in whole}) == len(whole)
    if split_on == "regex":
        assert len(whole) == 30 and all(text.startswith(" = ") and "= = Notes = =" in text for _, text in whole)
    text = path.read_text()
    assert all(doc in text for _, doc in whole)


def test_a_documents_split_comes_from_its_content():
    """Duplicates (up to trailing spaces and blank lines around them) share their key, hence their split."""
    doc = "def f():\n    return 1\n"
    assert document_key(doc) == document_key("\n" + doc.replace("\n", "   \n") + "\n\n")
    assert document_key(doc) != document_key(doc.replace("1", "2"))
    keys = [document_key(f"document {i}") for i in range(2000)]
    share = sum(split_of(k, 0.1) == "validation" for k in keys) / len(keys)
    assert 0.08 < share < 0.12


@pytest.mark.slow
def test_a_wikitext_file_prepares_into_many_documents_and_a_validation_split(tmp_path, ray_session):
    path = tmp_path / "wiki.train.raw"
    path.write_text(_wikitext())
    manifest = prepare_shards(TRAIN.from_overrides([
        "data=wikitext", f"data.sources.0.path='{path}'", "data.tokenizer.vocab_size=512", "data.seq_len=32",
        "data.mb_per_task=0.01", f"data.output_dir={tmp_path / 'out'}",
    ]).data)
    splits = manifest["splits"]
    assert splits["train"]["documents"] + splits["validation"]["documents"] == 120
    assert splits["validation"]["rows"] > 0 and splits["validation"]["documents"] >= 2


@pytest.mark.slow
def test_duplicates_share_a_split_and_the_tokenizer_never_sees_validation_text(tmp_path, ray_session):
    """Every record twice (once with trailing spaces): each split holds whole pairs. One validation-only
    record repeats a made-up word hundreds of times; a tokenizer trained on it would learn that word."""
    docs = [open(p).read() for p in sorted(glob.glob(SMALL_CORPUS))[:12]]
    word = next(w for w in (f"zqxv{i}wjkq" for i in range(10_000)) if split_of(document_key(" ".join([w] * 400)), 0.2) == "validation")
    records = [d for doc in docs for d in (doc, doc.replace("\n", "  \n"))] + [" ".join([word] * 400)]
    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps({"text": r}) + "\n" for r in records))
    out = tmp_path / "out"
    manifest = prepare_shards(TRAIN.from_overrides([
        "data=jsonl", f"data.sources.0.path='{source}'", "data.tokenizer.vocab_size=600", "data.seq_len=32",
        "data.val_fraction=0.2", f"data.output_dir={out}",
    ]).data)
    train_docs = manifest["splits"]["train"]["documents"]
    assert train_docs % 2 == 0 and (manifest["splits"]["validation"]["documents"] - 1) % 2 == 0
    tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer")
    assert len(tokenizer(word, add_special_tokens=False)["input_ids"]) >= 4  # never merged: not in the train split


@pytest.mark.slow
@pytest.mark.slow
def test_an_empty_split_fails_prep_in_one_line_and_leaves_no_manifest(tmp_path, ray_session):
    """One file, one document: it lands in one split and the other is empty. (launch/prep.py prints a ConfigError
    as its one last line, as every launch script does: test_config.py.)"""
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=r"^data.val_fraction=0.05: the validation split is empty \(train: 1 documents"):
        prepare_shards(TRAIN.from_overrides([
            "data.sources.0.path=" + sorted(glob.glob(SMALL_CORPUS))[0], "data.tokenizer.vocab_size=300", "data.seq_len=32",
            f"data.output_dir={out}",
        ]).data)
    assert not (out / "manifest.json").exists()


@pytest.mark.slow
def test_prep_refuses_a_folder_it_did_not_write_before_any_work_and_deletes_nothing(tmp_path):
    """A corpus a user keeps in data/<name>/train beside a manifest of their own is not an earlier prep."""
    out = tmp_path / "mine"
    (out / "train").mkdir(parents=True)
    (out / "train" / "corpus.txt").write_text("the user's own text\n")
    (out / "manifest.json").write_text(json.dumps({"name": "my corpus"}))
    result = launch("prep.py", "data.sources.0.path=" + sorted(glob.glob(SMALL_CORPUS))[0], "data.tokenizer.vocab_size=300",
                    "data.seq_len=32", f"data.output_dir={out}", timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"ConfigError: data.output_dir={out}: exists and holds something other than an earlier prep"), last
    assert "prep:" not in result.stdout  # refused by the config check: no source read, no tokenizer, no cluster
    assert (out / "train" / "corpus.txt").read_text() == "the user's own text\n"
    assert json.loads((out / "manifest.json").read_text()) == {"name": "my corpus"}
    assert sorted(os.listdir(out)) == ["manifest.json", "train"]


@pytest.mark.slow
def test_a_folder_prep_wrote_is_prepared_again_and_only_prep_files_are_replaced(tmp_path, ray_session):
    """Marked by prep, or (from before the marker) holding a manifest prep wrote: prepared again; a file someone
    else put there survives, a stale shard of the earlier prep does not."""
    sources = tmp_path / "src"
    sources.mkdir()
    for path in sorted(glob.glob(SMALL_CORPUS))[:10]:
        (sources / os.path.basename(path)).write_text(open(path).read())
    out = tmp_path / "out"
    overrides = [f"data.sources.0.path={sources}/*.py", "data.tokenizer.vocab_size=300", "data.seq_len=32", "data.val_fraction=0.3",
                 f"data.output_dir={out}"]
    first = prepare_shards(TRAIN.from_overrides(overrides).data)
    assert (out / "prep.json").is_file()
    (out / "train" / "part-00099.parquet").write_bytes(b"a stale shard")
    (out / "train" / "notes.txt").write_text("kept")
    assert prepare_shards(TRAIN.from_overrides(overrides).data)["fingerprint"] == first["fingerprint"]
    assert not (out / "train" / "part-00099.parquet").exists() and (out / "train" / "notes.txt").read_text() == "kept"
    (out / "prep.json").unlink()  # a folder prepared before prep left its marker: its manifest says it is prep's
    assert prepare_shards(TRAIN.from_overrides(overrides).data)["fingerprint"] == first["fingerprint"]
    assert (out / "prep.json").is_file()
