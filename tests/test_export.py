"""Export: any training checkpoint becomes a Hugging Face folder that reproduces the checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from conftest import launch
from framework.config import ConfigError
from framework.export import ExportError, export_checkpoint
from framework.train.checkpoint import read_config, read_state

pytestmark = pytest.mark.slow


def probe(vocab_size: int) -> torch.Tensor:
    return torch.randint(vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))


def checkpoint_logits(checkpoint_dir: str, ids: torch.Tensor) -> torch.Tensor:
    """Logits of the framework's model holding the weights DeepSpeed consolidates (its plain, non-lazy API)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    config = AutoConfig.from_pretrained(os.path.join(checkpoint_dir, "hf_config"))
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag="deepspeed"), strict=True)
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def exported_logits(folder: str, ids: torch.Tensor) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def validation_loss(folder: str, checkpoint_dir: str, micro_batch: int) -> tuple[float, float]:
    """(the loss the run logged at the checkpoint's step, the exported folder's over the same evaluation set, outside Ray)."""
    from framework.evaluate import evaluate_folder

    cfg, step = read_config(checkpoint_dir), read_state(checkpoint_dir).step
    with open(os.path.join(os.path.dirname(checkpoint_dir), "logs", "metrics.jsonl")) as f:
        logged = [r["val/loss"] for r in map(json.loads, f) if r["step"] == step and "val/loss" in r][-1]
    return logged, evaluate_folder(folder, cfg.data.output_dir, cfg.run.eval_rows, micro_batch)["val/loss"]


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_exported_folder_loads_with_auto_classes(exports, trained_checkpoints, stage):
    folder = exports[stage]
    assert os.path.isfile(os.path.join(folder, "model.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    trained_tokenizer = AutoTokenizer.from_pretrained(os.path.join(trained_checkpoints[stage], "tokenizer"))
    generation = GenerationConfig.from_pretrained(folder)
    assert model.dtype == torch.float32 and model.config.use_cache
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tie_word_embeddings survives the round trip
    text = "import os\nprint(os.getcwd())\n"
    assert tokenizer(text)["input_ids"] == trained_tokenizer(text)["input_ids"]
    assert generation.eos_token_id == tokenizer.eos_token_id is not None
    assert generation.pad_token_id == tokenizer.pad_token_id is not None
    out = model.generate(**tokenizer([text], return_tensors="pt"), max_new_tokens=4, do_sample=False)
    assert out.shape[1] > len(tokenizer(text)["input_ids"])


@pytest.mark.parametrize("stage", [1, 3])
def test_exported_logits_match_the_checkpoints(exports, trained_checkpoints, stage):
    ids = probe(AutoConfig.from_pretrained(exports[stage]).vocab_size)
    expected = checkpoint_logits(trained_checkpoints[stage], ids)
    torch.testing.assert_close(exported_logits(exports[stage], ids), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stage", [1, 3])
def test_export_reproduces_the_runs_validation_loss_on_the_whole_evaluation_set(exports, trained_checkpoints, stage):
    """In one process, with plain transformers, in batches of 4 rows instead of the run's 2 workers × 2: the
    mean over the same target tokens, to float summation order. Wrongly joined shards could not match."""
    logged, exported = validation_loss(exports[stage], trained_checkpoints[stage], micro_batch=4)
    assert exported == pytest.approx(logged, rel=1e-6, abs=0)


def test_zero1_export_holds_the_weights_the_module_states_hold(exports, trained_checkpoints):
    module = torch.load(
        os.path.join(trained_checkpoints[1], "deepspeed", "mp_rank_00_model_states.pt"), weights_only=True
    )["module"]
    exported = load_file(os.path.join(exports[1], "model.safetensors"))
    assert set(exported) == set(module) - {"lm_head.weight"}  # the tied head is stored once
    for name, tensor in exported.items():
        assert torch.equal(tensor, module[name]), name


def test_zero0_checkpoint_exports(exports, trained_checkpoints, tmp_path):
    # A stage-0 checkpoint is rank 0's model states alone: the ZeRO-1 checkpoint without its optimizer shards.
    from conftest import as_zero0

    zero0 = as_zero0(trained_checkpoints[1], tmp_path / "run" / "checkpoint_00000020")
    folder = export_checkpoint(str(zero0), str(tmp_path / "zero0"))
    ids = probe(AutoConfig.from_pretrained(folder).vocab_size)
    torch.testing.assert_close(exported_logits(folder, ids), exported_logits(exports[1], ids), rtol=0, atol=0)


def test_bf16_export_loads_as_bf16(exports, trained_checkpoints, tmp_path):
    folder = export_checkpoint(trained_checkpoints[3], str(tmp_path / "bf16"), dtype="bf16")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto")
    assert model.dtype == torch.bfloat16 and AutoConfig.from_pretrained(folder).dtype == torch.bfloat16
    assert os.path.getsize(os.path.join(folder, "model.safetensors")) < 0.6 * os.path.getsize(
        os.path.join(exports[3], "model.safetensors")
    )


def test_cli_exports_a_runs_latest_checkpoint_by_run_name(trained_runs, exports, tmp_path):
    runs_dir, name = os.path.split(trained_runs[3])
    out = tmp_path / "cli"
    result = launch("export.py", f"export.checkpoint={name}", f"export.runs_dir={runs_dir}", f"export.output_dir={out}")
    assert result.returncode == 0, result.stderr
    assert "logits match the training engine's" in result.stdout
    cli, api = load_file(str(out / "model.safetensors")), load_file(os.path.join(exports[3], "model.safetensors"))
    assert cli.keys() == api.keys() and all(torch.equal(cli[k], api[k]) for k in cli)


def test_failed_verification_leaves_the_earlier_export_in_place(trained_checkpoints, tmp_path, monkeypatch):
    import framework.export

    out = tmp_path / "model"
    export_checkpoint(trained_checkpoints[1], str(out))
    before = {p: os.path.getmtime(out / p) for p in os.listdir(out)}
    monkeypatch.setattr(framework.export, "TOLERANCE", {torch.float32: -1.0})  # no difference passes
    with pytest.raises(ExportError, match="logits differ from the training engine's"):
        export_checkpoint(trained_checkpoints[3], str(out))
    assert {p: os.path.getmtime(out / p) for p in os.listdir(out)} == before
    assert sorted(os.listdir(tmp_path)) == ["model"]  # no partial folder left behind


def test_export_refuses_to_replace_the_base_a_run_was_trained_on(trained_checkpoints, exports, tmp_path):
    """A LoRA run's model.pretrained_path may be an earlier export: exporting over it, from a run beside that run or
    from anywhere while that run is under export.runs_dir, is refused by key, and the base stays as it was."""
    import re

    from omegaconf import OmegaConf

    from framework.export import EXPORT

    base, runs = tmp_path / "base", tmp_path / "runs"
    shutil.copytree(exports[1], base)
    on_base = runs / "on-base" / "checkpoint_00000020"
    shutil.copytree(trained_checkpoints[1], on_base)
    saved = OmegaConf.load(on_base / "config.yaml")
    saved.model.pretrained_path = str(base)  # what a run started with model.pretrained_path=<base> records
    OmegaConf.save(saved, on_base / "config.yaml")
    shutil.copytree(trained_checkpoints[3], runs / "other" / "checkpoint_00000020")
    before = {name: (base / name).read_bytes() for name in os.listdir(base) if (base / name).is_file()}
    refused = re.escape(f"export.output_dir={base}: holds model.pretrained_path={base}, the base of checkpoint {on_base}: ")
    with pytest.raises(ConfigError, match="^" + refused):
        export_checkpoint(str(runs / "other"), str(base))
    with pytest.raises(ConfigError, match="^" + refused):
        EXPORT.from_overrides([f"export.checkpoint={trained_checkpoints[3]}", f"export.output_dir={base}", f"export.runs_dir={runs}"])
    assert {name: (base / name).read_bytes() for name in os.listdir(base) if (base / name).is_file()} == before


@pytest.mark.parametrize("make", ["not_a_checkpoint", "missing"])
def test_not_a_checkpoint_fails_in_one_line(tmp_path, make):
    path = tmp_path / "somewhere"
    if make == "not_a_checkpoint":
        path.mkdir()
        (path / "notes.txt").write_text("no checkpoint here")
    result = launch("export.py", f"export.checkpoint={path}", f"export.output_dir={tmp_path / 'out'}", timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"ConfigError: export.checkpoint={path}: "), result.stderr
    with pytest.raises(ConfigError, match=r"^export\.checkpoint="):
        export_checkpoint(str(path), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_checkpoint_missing_a_ranks_shard_is_refused_before_reading_it(trained_checkpoints, tmp_path):
    partial = tmp_path / "checkpoint_00000020"
    shutil.copytree(trained_checkpoints[3], partial, ignore=shutil.ignore_patterns("zero_pp_rank_1_*_optim_states.pt"))
    with pytest.raises(ExportError, match=r"zero_pp_rank_1_mp_rank_00_optim_states.pt: missing \(written by rank-1\)$"):
        export_checkpoint(str(partial), str(tmp_path / "out"))
