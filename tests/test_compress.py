"""Compression on the real stack: torchao through transformers, the evaluation set on the prepared shards, greedy
decoding through transformers' generate.

The session's tiny export (trained under ZeRO-3 by the shared fixture) is compressed once per method this
machine runs (the int8 one through a sweep's best.json: conftest's `compressed`); test_promote.py's rollout serves the
int8 folder with launch/serve.py, for its answers and for draining on SIGTERM. Refusals are checked on small
random-weight folders built here, before any weights are read.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Dict, Tuple

import pytest
import torch
from omegaconf import OmegaConf

from conftest import COMPRESS_PROMPTS, COMPRESS_SWEEP, compress_config, launch, sweep_best_json
from framework.compress.plan import COMPRESS_MARKER, plan_compression
from framework.compress.job import CompressError
from framework.config import CONF_DIR, ConfigError, compose

# ---------------------------------------------------------------------------------------------
# Shared artefacts (`compressed`, the session's compressions, is conftest's: test_promote serves the int8 one)

@pytest.fixture(scope="session")
def source(exports: Dict[int, str]) -> Path:
    """The session's tiny export: a trained Llama with its BPE and ChatML template, and its export.json."""
    return Path(exports[3])


@pytest.fixture(scope="module")
def random_folders(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Path]:
    """Small random-weight folders with a BPE of their own: a Llama, a GPT-2 (Conv1D blocks), an empty directory."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from framework.testing import RandomModelConfig, random_model_folder

    root = tmp_path_factory.mktemp("random")
    llama = random_model_folder(root / "llama", RandomModelConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True, context=256, corpus_mb=0.2, seed=0))
    gpt2 = root / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=512, n_embd=32, n_layer=1, n_head=2, n_positions=256, bos_token_id=0, eos_token_id=0)).save_pretrained(gpt2)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(llama / name, gpt2 / name)
    (root / "empty").mkdir()
    return {"llama": llama, "gpt2": gpt2, "empty": root / "empty"}


# ---------------------------------------------------------------------------------------------
# Configs

def test_every_compress_preset_sets_every_value() -> None:
    """Each method preset composes over conf/compress.yaml with nothing unset but the source (the schema holds no
    values: tests/test_config.py)."""
    for preset in sorted(p.stem for p in (CONF_DIR / "compress").glob("*.yaml")):
        cfg = compose([f"compress={preset}"], "compress")
        assert OmegaConf.missing_keys(cfg) == {"compress.model_path"}, preset
        assert cfg.compress.name == preset


# ---------------------------------------------------------------------------------------------
# Bad input: one line naming the key, before any work

@pytest.mark.parametrize("case, key", [
    ("empty", r"compress\.model_path: .* has no config\.json"),
    ("gpt2", r"compress\.method=int8_weight_only: .*GPT2LMHeadModel.* has no torch\.nn\.Linear layers"),
    ("bf16", r"compress\.dtype=bf16: half precision needs a GPU"),
])
def test_bad_input_fails_in_one_line_before_any_work(case: str, key: str, random_folders: Dict[str, Path], tmp_path: Path) -> None:
    """Exactly one line on stderr, exit 2: the libraries' import-time warnings (torchao's) stay quiet too."""
    import re

    folder = random_folders["llama" if case == "bf16" else case]
    extra = ["compress.dtype=bf16"] if case == "bf16" else []
    out = tmp_path / "out"
    result = launch("compress.py", f"compress.model_path={folder}", f"compress.output_dir={out}", *extra, timeout=300)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert re.match(r"^ConfigError: " + key, lines[0]), lines[0]
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine runs int4")
def test_a_method_this_machine_cannot_run_is_refused() -> None:
    result = launch("compress.py", "compress=int4", "compress.model_path=unused", timeout=300)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("ConfigError: compress.method=int4_weight_only: torchao 0.18.0 runs it on CUDA only, and "
                               "this machine has no CUDA device"), lines[0]


def test_layers_the_method_cannot_take_and_missing_shards_are_refused(random_folders: Dict[str, Path], tmp_path: Path) -> None:
    llama = random_folders["llama"]
    with pytest.raises(ConfigError, match=r"^compress\.group_size=7: does not divide the 64 inputs of model\.layers\.0\.self_attn\.q_proj"):
        plan_compression(compress_config(llama, group_size=7, output_dir=tmp_path / "out"))
    with pytest.raises(ConfigError, match=r"^compress\.group_size=32: expected null: int8_dynamic scales per row"):
        plan_compression(compress_config(llama, "int8-dynamic", group_size=32, output_dir=tmp_path / "out"))
    # A folder without export.json does not say which shards it was trained on: the user must name them.
    with pytest.raises(ConfigError, match=r"^compress\.data_dir=None: .* does not lead to the shards it was trained on"):
        plan_compression(compress_config(llama, output_dir=tmp_path / "out"))
    with pytest.raises(ConfigError, match=r"^compress\.data_dir=.*: no manifest\.json there"):
        plan_compression(compress_config(llama, output_dir=tmp_path / "out", data_dir=tmp_path))
    with pytest.raises(ConfigError, match=r"^compress\.max_ppl_increase=0\.0: expected a positive ratio"):
        plan_compression(compress_config(llama, max_ppl_increase=0.0))
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match=r"compress\.methd"):  # the schema: launch/compress.py says it in one line
        compose(["compress.model_path=x", "compress.methd=int8"], "compress")


# ---------------------------------------------------------------------------------------------
# The serving folder check: a quantised folder is accepted when its config and weights agree

def test_folder_check_accepts_a_torchao_folder_and_refuses_mismatched_ones(random_folders: Dict[str, Path], tmp_path: Path) -> None:
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TorchAoConfig

    from framework.hf_folder import check_model_folder

    llama = random_folders["llama"]
    quantised = tmp_path / "int8"
    model = AutoModelForCausalLM.from_pretrained(llama, quantization_config=TorchAoConfig(Int8WeightOnlyConfig()))
    model.save_pretrained(quantised)
    AutoTokenizer.from_pretrained(llama).save_pretrained(quantised)
    check_model_folder(quantised)
    check_model_folder(llama)

    config = json.loads((quantised / "config.json").read_text())
    no_config = shutil.copytree(quantised, tmp_path / "no-config")
    (no_config / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "quantization_config"}))
    with pytest.raises(ConfigError, match=r"^serve\.model_path: .* holds 7 torchao-quantised tensors, but its config\.json has no quantization_config"):
        check_model_folder(no_config)
    plain_weights = shutil.copytree(quantised, tmp_path / "plain-weights")
    shutil.copy(llama / "model.safetensors", plain_weights / "model.safetensors")
    with pytest.raises(ConfigError, match=r"^serve\.model_path: .* says torchao-quantised, but its weights hold no torchao tensors"):
        check_model_folder(plain_weights)
    other = shutil.copytree(llama, tmp_path / "bnb")
    (other / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "bitsandbytes"}}))
    with pytest.raises(ConfigError, match=r"^compress\.model_path: .* is quantised with bitsandbytes"):
        check_model_folder(other, "compress.model_path")


# ---------------------------------------------------------------------------------------------
# Compressing the tiny export

@pytest.mark.slow
def test_each_method_gives_a_smaller_folder_within_its_bound(compressed: Dict[str, Tuple[Path, Dict]], source: Path,
                                                             prepared_data: str) -> None:
    from framework.data.shards import read_manifest

    validation_rows = read_manifest(prepared_data)["splits"]["validation"]["rows"]
    for preset, (folder, report) in compressed.items():
        assert json.loads((folder / COMPRESS_MARKER).read_text()) == report
        assert report["source"] == str(source) and report["preset"] == preset
        assert report["quantised_layers"] == report["linear_layers"] == 2 * 7  # q k v o gate up down, 2 layers
        size = report["size"]
        assert size["compressed_bytes"] == (folder / "model.safetensors").stat().st_size
        assert size["source_bytes"] == (source / "model.safetensors").stat().st_size
        assert size["compressed_bytes"] < size["source_bytes"]
        ppl = report["perplexity"]
        # compress.data_dir=null found the shards the export was trained on (export.json → checkpoint → config).
        assert ppl["data_dir"] == prepared_data and ppl["rows"] == validation_rows
        assert math.isfinite(ppl["source"]) and math.isfinite(ppl["compressed"])
        assert ppl["ratio"] == pytest.approx(ppl["compressed"] / ppl["source"], rel=1e-4) and ppl["ratio"] <= ppl["max_ratio"] == 1.05
        greedy, decode = report["greedy"], report["decode"]
        assert greedy["prompts"] == COMPRESS_PROMPTS and 0 <= greedy["identical"] <= COMPRESS_PROMPTS and 0.0 <= greedy["token_agreement"] <= 1.0
        assert decode["source_tokens_per_s"] > 0 and decode["compressed_tokens_per_s"] > 0
        assert report["source_export"] == json.loads((source / "export.json").read_text())
        assert not (folder / "export.json").exists()  # an export's marker: this folder is not one
        assert not [p for p in folder.parent.iterdir() if ".partial-" in p.name]


@pytest.mark.slow
def test_eval_scores_a_compressed_folder_on_the_shards_its_report_names(compressed: Dict[str, Tuple[Path, Dict]],
                                                                       tmp_path: Path) -> None:
    """launch/eval.py on a compressed folder (no export.json) finds the shards through compress_report.json, and its
    perplexity is the report's: one function measures both."""
    from framework.evaluation.config import EVAL
    from framework.evaluation.job import run_eval

    preset, (folder, report) = next(iter(compressed.items()))
    [record] = run_eval(EVAL.from_overrides([f"eval.model={folder}", f"eval.output={tmp_path / 'eval.json'}"]))
    ppl = record["scores"]["val/perplexity"]
    assert ppl["source"] == f"shards {report['perplexity']['data_dir']}" and ppl["count"] == report["perplexity"]["rows"]
    assert ppl["value"] == pytest.approx(report["perplexity"]["compressed"], rel=1e-4), preset


@pytest.mark.slow
def test_the_folder_reloads_with_from_pretrained_holding_int8_weights(compressed: Dict[str, Tuple[Path, Dict]], source: Path) -> None:
    from torchao.quantization import Int8Tensor
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from framework.model import PROBE_TEXT

    ids = AutoTokenizer.from_pretrained(source)(PROBE_TEXT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(source).eval()(ids).logits
        for preset, (folder, _) in compressed.items():
            model = AutoModelForCausalLM.from_pretrained(folder).eval()
            assert isinstance(model.model.layers[0].self_attn.q_proj.weight, Int8Tensor), preset
            got = model(ids).logits
            assert not torch.equal(got, expected)  # quantised...
            assert (got - expected).abs().max() < 0.05 * expected.abs().max()  # ...and close
            assert AutoTokenizer.from_pretrained(folder).chat_template == AutoTokenizer.from_pretrained(source).chat_template


@pytest.mark.slow
def test_the_gate_fails_a_method_past_its_bound_and_writes_nothing(source: Path, tmp_path: Path) -> None:
    from framework.compress.job import compress

    out = tmp_path / "compressed" / "tiny-int8"
    # Below 1 the bound demands that perplexity fall by half: no int8 model of the source does that.
    plan = plan_compression(compress_config(source, max_ppl_increase=0.5, output_dir=out))
    with pytest.raises(CompressError, match=r"^compress\.max_ppl_increase=0\.5: int8 \(int8_weight_only\) takes validation "
                                            r"perplexity from [\d.]+ to [\d.]+ \(×[\d.]+, past the bound\) on \d+ rows of .*; "
                                            r"nothing written to .*tiny-int8$"):
        compress(plan)
    assert list(out.parent.iterdir()) == []


@pytest.mark.slow
def test_output_dir_follows_export_rules(compressed: Dict[str, Tuple[Path, Dict]], source: Path, exports: Dict[int, str],
                                         tmp_path: Path) -> None:
    folder, _ = compressed["int8"]
    plan_compression(compress_config(source, output_dir=folder))  # an earlier compression may be replaced
    with pytest.raises(ConfigError, match=r"^compress\.output_dir=.*: exists and holds something other than an earlier "
                                          r"compression \(no compress_report\.json\)"):
        plan_compression(compress_config(source, output_dir=exports[1]))  # an export is not ours to replace
    with pytest.raises(ConfigError, match=r"^compress\.output_dir=.*: overlaps the source folder"):
        plan_compression(compress_config(source, output_dir=source / "int8"))
    with pytest.raises(ConfigError, match=r"^compress\.model_path=.*: is quantised already \(torchao\)"):
        plan_compression(compress_config(folder, output_dir=tmp_path / "again"))


@pytest.mark.slow
def test_a_sweeps_best_json_is_compressed_by_name(compressed: Dict[str, Tuple[Path, Dict]], source: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    assert compressed["int8"][1]["source"] == str(source)  # compressed through best.json by the fixture
    best = sweep_best_json(source, tmp_path / "outputs" / "sweeps")
    monkeypatch.chdir(tmp_path)
    plan = plan_compression(compress_config(best))  # compress.output_dir=null
    assert plan.source == source and plan.output_dir == str(tmp_path / "outputs" / "compressed" / f"{COMPRESS_SWEEP}-int8")


