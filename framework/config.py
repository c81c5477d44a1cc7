"""Typed config schema for every job kind, Hydra entry point, and cross-field validation.

Hydra composes `conf/`; the dataclasses below are registered as the schema so that a misspelt key or
a wrong type fails at composition. `validate` then checks what a schema cannot express (batch
arithmetic, impossible combinations). All of it runs before any Ray work starts.
"""

from __future__ import annotations

import functools
import os
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from omegaconf import MISSING, DictConfig, OmegaConf

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

# `${stdlib:}` points at the running Python's standard library: real text every machine has.
OmegaConf.register_new_resolver("stdlib", lambda: sysconfig.get_paths()["stdlib"], replace=True)


class ConfigError(ValueError):
    """A config value a job cannot run with; the message names the key and what was expected."""


class JobError(RuntimeError):
    """A job that started and then failed for a reason its user can act on; the message says what to do."""


@dataclass
class ModelConfig:
    name: str = MISSING
    # Any `transformers` model_type (llama, gpt2, mistral, ...), built with AutoConfig.for_model;
    # or `pretrained`, which loads `pretrained_path` and requires it.
    arch: str = "llama"
    # Keyword arguments for the transformers config class; vocab_size comes from the tokenizer.
    hf_config: Dict[str, Any] = field(default_factory=dict)
    # A local Hugging Face model folder to fine-tune instead of building from `hf_config`.
    pretrained_path: Optional[str] = None
    activation_checkpointing: bool = False


@dataclass
class SourceConfig:
    # A file, a directory (read recursively) or a glob (`**` allowed).
    path: str = MISSING
    format: str = "text"  # text | jsonl | parquet
    field: str = "text"  # JSONL key or Parquet column holding the document text


@dataclass
class TokenizerConfig:
    # A local Hugging Face tokenizer folder; when null a byte-level BPE is trained on the sources.
    path: Optional[str] = None
    vocab_size: int = 8192
    min_frequency: int = 2


@dataclass
class DataConfig:
    name: str = MISSING
    sources: List[SourceConfig] = field(default_factory=list)
    output_dir: str = "data/${data.name}"
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    seq_len: int = 256
    val_fraction: float = 0.05
    seed: int = 0
    # Each Ray task tokenises up to files_per_task files, or about mb_per_task megabytes of source:
    # a larger JSONL or Parquet file is cut (by lines, by row groups) across tasks. Each task writes
    # one shard per split.
    files_per_task: int = 32
    mb_per_task: float = 64.0


@dataclass
class DeepSpeedConfig:
    name: str = MISSING
    stage: int = 2
    offload_optimizer: bool = False
    offload_param: bool = False
    # Extra keys merged verbatim into DeepSpeed's `zero_optimization` section.
    zero_extra: Dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    warmup_steps: int = 10
    grad_clip: float = 1.0


@dataclass
class RunConfig:
    name: str = MISSING
    num_workers: int = 2
    gpus_per_worker: int = 0
    # CPUs each Train worker holds; null sizes it so that Ray Data keeps CPUs for reading.
    cpus_per_worker: Optional[float] = None
    # CPUs kept free for Ray Data's read tasks when cpus_per_worker is sized automatically.
    data_cpus: float = 1.0
    max_steps: int = 100
    global_batch_size: int = 16
    micro_batch_size: int = 4
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp16 | fp32
    log_interval: int = 10
    eval_interval: int = 50
    eval_batches: int = 4
    checkpoint_interval: int = 50
    keep_checkpoints: int = 2
    # Local directory or any pyarrow filesystem URI (s3://, gs://, ...).
    storage_path: str = "outputs/runs"
    seed: int = 0
    max_failures: int = 2
    # Seconds a run (or a restart after a failure) waits for its workers' CPUs/GPUs, e.g. for an
    # autoscaler to add nodes, before it fails instead of waiting for a node that never comes.
    resource_wait_s: int = 600
    # Seconds the workers wait for each other to form the process group (TorchConfig.timeout_s);
    # a worker node lost during set-up fails the attempt after this instead of Ray's 30 minutes.
    init_timeout_s: int = 300
    # Ray cluster address; null uses RAY_ADDRESS or starts a local cluster.
    ray_address: Optional[str] = None
    # Peak TFLOP/s per GPU for MFU; null looks the GPU up by name (H100/H200 bf16: 989).
    peak_tflops: Optional[float] = None


@dataclass
class JobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)


def register(name: str, schema: type) -> None:
    """Register a structured-config schema with Hydra's ConfigStore; a primary config names it first in its defaults."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=name, node=schema)


def register_schema() -> None:
    """The training schema, named by `conf/config.yaml`."""
    register("job_schema", JobConfig)


def typed(schema: type, node: Any, group: str, example: str = "VALUE") -> Any:
    """`node` (a DictConfig or dict) over `schema`'s defaults, as a `schema` instance.

    OmegaConf's errors become one ConfigError line naming `<group>.<key>`.
    """
    from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), node))
    except MissingMandatoryValue as exc:
        raise ConfigError(f"{group}.{exc.full_key}: missing; expected e.g. {group}.{exc.full_key}={example}") from None
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{group}.{one_line(exc)}") from None


# ---------------------------------------------------------------------------------------------
# Validation of what the schema cannot express

_TEXT_FORMATS = ("text", "jsonl", "parquet")
_PRECISIONS = ("auto", "bf16", "fp16", "fp32")


def require(ok: bool, key: str, value: Any, expected: str) -> None:
    """Raise the one-line ConfigError `key=value: expected` unless `ok`."""
    if not ok:
        raise ConfigError(f"{key}={value}: {expected}")


def validate(cfg: JobConfig) -> JobConfig:
    """Check cross-field rules; raises ConfigError naming the first bad key."""
    run, ds, data, optim, model = cfg.run, cfg.deepspeed, cfg.data, cfg.optim, cfg.model
    require(run.num_workers >= 1, "run.num_workers", run.num_workers, "expected at least 1")
    require(run.micro_batch_size >= 1, "run.micro_batch_size", run.micro_batch_size, "expected at least 1")
    per_step = run.num_workers * run.micro_batch_size
    require(
        run.global_batch_size % per_step == 0 and run.global_batch_size >= per_step,
        "run.global_batch_size",
        run.global_batch_size,
        f"expected a multiple of run.num_workers × run.micro_batch_size = "
        f"{run.num_workers} × {run.micro_batch_size} = {per_step}",
    )
    require(run.gpus_per_worker >= 0, "run.gpus_per_worker", run.gpus_per_worker, "expected 0 or more")
    require(
        run.cpus_per_worker is None or run.cpus_per_worker > 0,
        "run.cpus_per_worker", run.cpus_per_worker, "expected a positive number or null (sized automatically)",
    )
    require(run.max_steps >= 1, "run.max_steps", run.max_steps, "expected at least 1")
    for key in ("log_interval", "eval_interval", "checkpoint_interval", "eval_batches", "keep_checkpoints", "init_timeout_s", "resource_wait_s"):
        value = getattr(run, key)
        require(value >= 1, f"run.{key}", value, "expected at least 1")
    require(run.precision in _PRECISIONS, "run.precision", run.precision, f"expected one of {_PRECISIONS}")
    require(
        run.gpus_per_worker > 0 or run.precision in ("auto", "fp32"),
        "run.precision", run.precision, "half precision needs GPUs (run.gpus_per_worker>0); use fp32 or auto on CPU",
    )
    require(run.max_failures >= -1, "run.max_failures", run.max_failures, "expected -1 (forever) or more")

    require(ds.stage in (0, 1, 2, 3), "deepspeed.stage", ds.stage, "expected 0, 1, 2 or 3")
    require(
        not ds.offload_optimizer or ds.stage >= 1,
        "deepspeed.offload_optimizer", ds.offload_optimizer, "optimizer offload needs deepspeed.stage >= 1",
    )
    require(
        not ds.offload_param or ds.stage == 3,
        "deepspeed.offload_param", ds.offload_param, "parameter offload needs deepspeed.stage=3",
    )

    require(optim.lr > 0, "optim.lr", optim.lr, "expected a positive learning rate")
    require(0 <= optim.min_lr_ratio <= 1, "optim.min_lr_ratio", optim.min_lr_ratio, "expected a value in [0, 1]")
    require(
        0 <= optim.warmup_steps < run.max_steps,
        "optim.warmup_steps", optim.warmup_steps, f"expected 0 <= warmup_steps < run.max_steps={run.max_steps}",
    )
    require(optim.grad_clip >= 0, "optim.grad_clip", optim.grad_clip, "expected 0 (off) or a positive norm")

    require(data.seq_len >= 8, "data.seq_len", data.seq_len, "expected at least 8 tokens")
    require(0 <= data.val_fraction < 1, "data.val_fraction", data.val_fraction, "expected a fraction in [0, 1)")
    require(data.files_per_task >= 1, "data.files_per_task", data.files_per_task, "expected at least 1")
    require(data.mb_per_task > 0, "data.mb_per_task", data.mb_per_task, "expected a positive number of megabytes")
    require(
        data.tokenizer.path is not None or data.tokenizer.vocab_size >= 256 + 1,
        "data.tokenizer.vocab_size", data.tokenizer.vocab_size, "expected more than 256 (the byte alphabet)",
    )
    for i, source in enumerate(data.sources):
        require(
            source.format in _TEXT_FORMATS,
            f"data.sources[{i}].format", source.format, f"expected one of {_TEXT_FORMATS}",
        )

    _validate_model(model, data.seq_len)
    return cfg


def _validate_model(model: ModelConfig, seq_len: int) -> None:
    from transformers import AutoConfig, CONFIG_MAPPING

    if model.pretrained_path is not None or model.arch == "pretrained":
        path = Path(model.pretrained_path or "")
        require(
            (path / "config.json").is_file(),
            "model.pretrained_path", model.pretrained_path, f"expected a local Hugging Face model folder with config.json (model={model.name})",
        )
        config = AutoConfig.from_pretrained(model.pretrained_path, local_files_only=True)
    else:
        _validate_arch(model)
        try:
            config = CONFIG_MAPPING[model.arch](**model.hf_config)
        except Exception as exc:  # noqa: BLE001 - transformers validates its configs (heads must divide hidden_size, ...)
            raise ConfigError(f"model.hf_config: {_last_line(exc)} (model={model.name})") from None
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    require(
        positions is None or positions >= seq_len,
        "data.seq_len", seq_len, f"longer than the model's {positions} positions (model={model.name})",
    )


def _last_line(exc: BaseException) -> str:
    """The line of a multi-line library error that says what is wrong (transformers puts it last)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def _validate_arch(model: ModelConfig) -> None:
    from transformers import CONFIG_MAPPING

    require(
        model.arch in CONFIG_MAPPING,
        "model.arch", model.arch, "expected a transformers model_type such as llama, gpt2 or mistral",
    )
    known = set(CONFIG_MAPPING[model.arch]().to_dict())
    for key in model.hf_config:
        require(key in known, f"model.hf_config.{key}", model.hf_config[key], f"not a field of the {model.arch} config")


# ---------------------------------------------------------------------------------------------
# Composition and the Hydra entry point

def to_job_config(cfg: DictConfig) -> JobConfig:
    """Resolve a composed DictConfig into the typed JobConfig (extra top-level groups are dropped)."""
    job = OmegaConf.merge(OmegaConf.structured(JobConfig), {k: cfg[k] for k in JobConfig.__dataclass_fields__})
    return OmegaConf.to_object(job)


def compose(overrides: List[str] | None = None, config_name: str = "config") -> DictConfig:
    """Compose `conf/` with overrides, as the launch scripts do, without starting a job."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_schema()
    # Inside a running @hydra.main (a benchmark composing its trials' configs) Hydra is already
    # initialised; set it aside for this composition and put it back afterwards.
    outer = GlobalHydra.instance().hydra
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return hydra_compose(config_name=config_name, overrides=list(overrides or []))
    finally:
        if outer is not None:
            GlobalHydra.instance().clear()
            GlobalHydra.instance().initialize(outer)


def load_job_config(overrides: List[str] | None = None) -> JobConfig:
    """Compose, type and validate the training config from command-line style overrides."""
    return validate(to_job_config(compose(overrides)))


def one_line(exc: BaseException) -> str:
    """Reduce Hydra/OmegaConf errors (which span several lines) to the line that names the problem."""
    from omegaconf.errors import OmegaConfBaseException

    cause = exc
    while cause.__cause__ is not None and not isinstance(cause, OmegaConfBaseException):
        cause = cause.__cause__
    if isinstance(cause, OmegaConfBaseException):
        key = getattr(cause, "full_key", None)
        msg = str(getattr(cause, "msg", None) or cause).strip().splitlines()[0]
        return f"{key}: {msg}" if key else msg
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return " ".join(lines[:3]) if lines else type(exc).__name__


def check_job(cfg: DictConfig) -> None:
    """The check for job kinds that run on the training config (prep, train, export)."""
    validate(to_job_config(cfg))


def hydra_entry(config_name: str = "config", check: Callable[[DictConfig], Any] = check_job) -> Callable:
    """Decorate a launch script's `main(cfg: DictConfig)`: fail in one line on a bad config, then run Hydra.

    The overrides are composed and checked first (`check` raises ConfigError or an OmegaConf error),
    so that a misspelt key, a wrong type or an impossible combination exits with `ConfigError: ...`
    before any cluster work. Hydra's own flags (`--cfg job`, `--help`, `-m`, ...) pass straight
    through to `hydra.main`.
    """

    def decorate(task: Callable[[DictConfig], Any]) -> Callable[[], Any]:
        import hydra

        @functools.wraps(task)
        def main() -> Any:
            argv = sys.argv[1:]
            if not any(a.startswith("-") for a in argv):
                overrides = [a for a in argv if not a.startswith(("hydra.", "+hydra.", "~hydra."))]
                try:
                    check(compose(overrides, config_name))
                except (ConfigError, Exception) as exc:  # noqa: BLE001 - every composition error ends here
                    message = str(exc) if isinstance(exc, ConfigError) else one_line(exc)
                    print(f"ConfigError: {message}", file=sys.stderr)
                    raise SystemExit(2) from None
            register_schema()
            return hydra.main(config_path=str(CONF_DIR), config_name=config_name, version_base="1.3")(guarded)()

        @functools.wraps(task)
        def guarded(cfg: DictConfig) -> Any:
            # What only the job can find out (shards that do not match, a cluster too small, a run
            # resumed with other settings) ends the same way as a bad override: one line, exit 2;
            # a job that failed for a reason its user can act on, in one line too, exit 1.
            try:
                return task(cfg)
            except (ConfigError, JobError) as exc:
                print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
                raise SystemExit(2 if isinstance(exc, ConfigError) else 1) from None

        # Tests and manifests check an entry point's overrides the same way it does.
        main.config_name, main.check = config_name, check
        return main

    return decorate


def absolute(path: str) -> str:
    """Make a local path absolute (Ray workers run in other directories); URIs pass through."""
    return path if "://" in path else os.path.abspath(os.path.expanduser(path))
