"""One source for every value (the YAML), and bad configs fail at once, in one line naming the key, before any Ray cluster starts."""

import dataclasses
import os

import pytest
from omegaconf import OmegaConf

from conftest import launch
from framework.config import CONF_DIR, ConfigError, compose, schema_defaults
from framework.train.config import TrainRoot, TRAIN


# The values a user must give: the presets leave them `???` on purpose.
MANDATORY = {"model.pretrained_path", "data.sources[0].path", "data.tokenizer.path"}
GROUPS = ("model", "model/lora", "data", "deepspeed", "optim", "run", "tune", "post", "experiment")


def _options(group):
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def test_schemas_hold_types_not_values():
    """Every default lives in the YAML: a schema leaf with a default would be a second, silent copy.

    The one exception is the items of a list (data.sources.N): a source added on the command line
    has no YAML to take its other keys from (framework/data/config.py says so).
    """
    from framework.compress.config import CompressConfig
    from framework.data.config import SourceConfig
    from framework.export import ExportConfig
    from framework.model import LoraConfig

    assert list(schema_defaults(TrainRoot)) == []
    assert list(schema_defaults(ExportConfig)) == []
    assert list(schema_defaults(LoraConfig)) == []  # model.lora: an Optional node, not walked from TrainRoot
    assert list(schema_defaults(CompressConfig)) == []
    assert {f.name for f in dataclasses.fields(SourceConfig) if f.default is not dataclasses.MISSING and f.name != "path"} == {
        "format", "field", "split_on", "split_regex", "prompt", "completion", "chosen", "rejected"
    }


def _unset(cfg, node=None, path=""):
    """The keys left `???`, and those that interpolate one (experiment=sft-*: data.tokenizer.path: ${model.pretrained_path})."""
    from omegaconf.errors import InterpolationToMissingValueError, MissingMandatoryValue

    node = cfg if node is None else node
    unset = set()
    items = node.items_ex(resolve=False) if OmegaConf.is_dict(node) else enumerate(node._iter_ex(resolve=False))
    for key, value in items:
        key_path = f"{path}[{key}]" if OmegaConf.is_list(node) else f"{path}.{key}" if path else str(key)
        if OmegaConf.is_config(value) and not value._is_none() and not value._is_missing():
            unset |= _unset(cfg, value, key_path)
            continue
        try:
            OmegaConf.select(cfg, key_path, throw_on_missing=True)
        except (MissingMandatoryValue, InterpolationToMissingValueError):
            unset.add(key_path)
    return unset


@pytest.mark.parametrize("group, option", [(g, o) for g in GROUPS for o in _options(g)])
def test_every_preset_sets_every_value(group, option):
    """Each option of each group composes over the defaults with no value left unset but the mandatory ones."""
    cfg = compose([f"{group}={option}"] + (["data=preference"] if group == "post" else []))  # a preference loss needs pairs
    assert _unset(cfg) <= MANDATORY, _unset(cfg)
    if not _unset(cfg):
        from framework.train.config import to_train_root

        to_train_root(cfg)


def test_optim_name_selects_the_optimizer():
    import torch

    from framework.train.optim import build_optimizer

    model = torch.nn.Linear(4, 4)
    for name, kind in (("adamw", torch.optim.AdamW), ("adam", torch.optim.Adam)):
        assert type(build_optimizer(model, TRAIN.from_overrides([f"optim={name}"]).optim, fused=False)) is kind
    with pytest.raises(ConfigError, match=r"^optim.name=sgd: expected one of \('adamw', 'adam'\)"):
        TRAIN.from_overrides(["optim.name=sgd"])


@pytest.mark.parametrize(
    "override, expected",
    [
        ("run.num_workerz=2", "run.num_workerz"),  # misspelt key
        ("run.num_workers=two", "run.num_workers"),  # wrong type
        ("run.global_batch_size=30", "run.global_batch_size=30"),  # 30 is not a multiple of 2 workers × 4
        ("deepspeed=zero9", "deepspeed"),  # no such config group option
    ],
)
def test_bad_config_fails_in_one_line_without_starting_ray(tmp_path, override, expected):
    ray_tmp = tmp_path / "ray"
    ray_tmp.mkdir()
    result = launch("train.py", override, env={"RAY_TMPDIR": str(ray_tmp)}, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ConfigError: ") and expected in lines[0], result.stderr
    assert list(ray_tmp.iterdir()) == [], "a Ray session was started for an invalid config"


def test_batch_arithmetic_message_names_the_numbers():
    with pytest.raises(ConfigError, match=r"run.global_batch_size=30: expected a multiple of .* = 2 × 4 = 8"):
        TRAIN.from_overrides(["run.global_batch_size=30"])


@pytest.mark.parametrize(
    "override, key",
    [
        ("+model.hf_config.hidden_sise=64", "model.hf_config.hidden_sise"),
        ("model.hf_config.hidden_size=65", "model.hf_config"),  # transformers' own check: 4 heads do not divide 65
        ("deepspeed.offload_param=true", "deepspeed.offload_param"),  # needs ZeRO-3
        ("run.precision=bf16", "run.precision"),  # half precision on CPU workers
        ("data.seq_len=4096", "data.seq_len"),  # beyond the tiny model's 1024 positions
        ("optim.warmup_steps=1000", "optim.warmup_steps"),
        ("model=hf-local", "model.pretrained_path"),  # mandatory value left unset
        ("run.min_workers=3", "run.min_workers"),  # more than run.num_workers
        ("data.sources.0.split_on=regex", "data.sources.0.split_regex"),  # regex splitting needs the regex
        ("data.val_fraction=0", "data.val_fraction"),  # training evaluates on the validation split
        ("run.eval_rows=0", "run.eval_rows"),
    ],
)
def test_impossible_combinations_are_rejected(override, key):
    with pytest.raises(ConfigError, match="^" + key.replace(".", r"\.")):
        TRAIN.from_overrides([override])


def test_elastic_runs_need_a_global_batch_every_worker_count_can_split():
    """With run.min_workers the run may go on with fewer workers: 16 rows over 3 workers × 2 do not divide."""
    assert TRAIN.from_overrides(["run.min_workers=1", "run.num_workers=2", "run.micro_batch_size=2"]).run.min_workers == 1
    with pytest.raises(ConfigError, match=r"run.global_batch_size=16: expected a multiple of .* = 3 × 2 = 6"):
        TRAIN.from_overrides(["run.min_workers=2", "run.num_workers=4", "run.micro_batch_size=2"])


def test_presets_compose_and_validate():
    for overrides in ([], ["experiment=smoke"], ["experiment=llama-125m-gpu"], ["model=gpt2-small"], ["deepspeed=zero3-offload"]):
        job = TRAIN.from_overrides(overrides)
        assert job.run.global_batch_size % (job.run.num_workers * job.run.micro_batch_size) == 0


def test_cli_override_reaches_the_typed_config():
    job = TRAIN.from_overrides(["model=llama-125m", "deepspeed=zero3", "run.num_workers=4", "optim.lr=3e-4", "run.global_batch_size=32"])
    assert (job.model.hf_config["hidden_size"], job.deepspeed.stage, job.run.num_workers, job.optim.lr) == (768, 3, 4, 3e-4)
    assert os.path.basename(job.data.output_dir) == "stdlib"


def test_compose_inside_a_running_hydra_app_leaves_the_app_intact():
    """Benchmarks run under @hydra.main and compose their jobs' configs; both must keep working."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from framework.config import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        outer = GlobalHydra.instance().hydra
        assert TRAIN.from_overrides(["model=llama-125m"]).model.name == "llama-125m"
        assert GlobalHydra.instance().hydra is outer
        assert hydra_compose(config_name="config").model.name == "tiny"


@pytest.mark.parametrize("preset", ["train", "train-gpu", "tune", "serve", "data", "compress", "rl"])
def test_benchmark_presets_compose_and_pass_their_checks(preset):
    """Every conf/bench preset is runnable as written; the GPU one is checked here since CI has no GPU."""
    from framework.bench import BENCH

    BENCH.from_overrides([f"bench={preset}"])


def test_a_benchmark_clears_only_storage_a_benchmark_made(tmp_path):
    from pathlib import Path

    from framework.bench.common import SCRATCH_MARKER, fresh_storage

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match=rf"^bench.storage_path={mine}: exists and holds something a benchmark did not write \(no {SCRATCH_MARKER}\)"):
        fresh_storage(str(mine))
    assert (mine / "notes.txt").read_text() == "keep me"
    scratch = fresh_storage(str(tmp_path / "scratch"))
    (Path(scratch) / "leftover-run").mkdir()
    assert fresh_storage(scratch) == scratch and sorted(p.name for p in Path(scratch).iterdir()) == [SCRATCH_MARKER]


def test_tracking_without_a_server_fails_in_one_line_before_any_work(monkeypatch):
    """tracking=mlflow needs a server: refused at composition, naming tracking.uri (train, export, eval, promote alike)."""
    from framework.evaluation.config import EVAL
    from framework.train.config import TRAIN

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ConfigError, match=r"^tracking.uri=None: missing; name the MLflow server"):
        TRAIN.from_overrides(["tracking=mlflow"])
    with pytest.raises(ConfigError, match=r"^tracking.uri=None: missing"):
        EVAL.from_overrides(["eval.model=http://h:8000", "eval.perplexity=false", "eval.output=x.json", "tracking=mlflow",
                             "+eval.chat_sets.a={path: tests/data/arith_chat.jsonl, scoring: contains, field: answer}"])


def test_the_readme_walk_through_commands_compose(monkeypatch):
    """Every `launch/*.py` command of README's evaluate-track-promote walk-through composes under its own entry point
    (a misspelt key or group fails here); what needs files that only the walk-through makes is checked in its tests."""
    import importlib.util
    import re
    import shlex

    text = (CONF_DIR.parent / "README.md").read_text()
    block = text.split("**Evaluate, track, promote**", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [shlex.split(line, comments=True) for line in block.replace("\\\n", " ").splitlines()]
    launched = [c for c in commands if len(c) > 1 and re.fullmatch(r"launch/\w+\.py", c[1])]
    assert len(launched) >= 5
    for command in launched:
        spec = importlib.util.spec_from_file_location("walk_" + command[1][7:-3], CONF_DIR.parent / command[1])
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        args = [a.replace("rollback", "promote.action=rollback") if a == "rollback" else a for a in command[2:] if a != "&"]
        module.main.job.compose(args)


def test_tracking_at_an_address_where_no_server_answers_fails_in_one_line():
    from framework.train.config import TRAIN

    from conftest import free_port

    with pytest.raises(ConfigError, match=r"^tracking.uri=http://127.0.0.1:\d+: no MLflow server answers there"):
        TRAIN.from_overrides(["tracking=mlflow", f"tracking.uri=http://127.0.0.1:{free_port()}"])
