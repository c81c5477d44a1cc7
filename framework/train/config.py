"""The training tree of `conf/config.yaml`: its root `TrainRoot`, the `deepspeed`, `optim` and `run` groups' schemas, and the checks.

The root assembles each group's dataclass from the module that reads it (`framework/model.py`,
`framework/data/config.py`, this file); `validate` runs every group's rules and the cross-group ones,
all before any Ray work. The optional `tune` group (a sweep) is typed by the sweep itself
(`framework/tune/config.py`): training never reads it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

from omegaconf import MISSING, DictConfig

from framework.config import Job, absolute, optional_group, register, require, typed
from framework.data.config import DataConfig, check_data, is_preference, is_prompts
from framework.data.shards import check_prep_dir
from framework.model import ModelConfig, check_model_config
from framework.rl.config import RLConfig, check_rl
from framework.tracking import TrackingConfig, check_tracking
from framework.rl.rewards import RewardConfig, reward_functions

# optim.name → the torch.optim class framework/train/optim.py builds; both take lr, betas, eps and
# weight_decay (Adam's as an L2 term, AdamW's decoupled), so one OptimConfig serves both.
OPTIMIZERS = {"adamw": "AdamW", "adam": "Adam"}

PRECISIONS = ("auto", "bf16", "fp16", "fp32")


@dataclass
class DeepSpeedConfig:
    name: str = MISSING
    stage: int = MISSING
    offload_optimizer: bool = MISSING
    offload_param: bool = MISSING
    # Extra keys merged verbatim into DeepSpeed's `zero_optimization` section.
    zero_extra: Dict[str, Any] = MISSING


@dataclass
class OptimConfig:
    # An optimizer of framework/train/optim.py's OPTIMIZERS (adamw, adam).
    name: str = MISSING
    lr: float = MISSING
    min_lr_ratio: float = MISSING
    weight_decay: float = MISSING
    beta1: float = MISSING
    beta2: float = MISSING
    eps: float = MISSING
    warmup_steps: int = MISSING
    grad_clip: float = MISSING


@dataclass
class RunConfig:
    name: str = MISSING
    num_workers: int = MISSING
    # Elastic training: the fewest workers a run goes on with after losing some (Ray Train's
    # ScalingConfig(num_workers=(min_workers, num_workers))); null: a fixed-size run.
    min_workers: Optional[int] = MISSING
    gpus_per_worker: int = MISSING
    # CPUs each Train worker holds; null: at most one each on CPU (what fits), 1 to 8 beside a GPU.
    cpus_per_worker: Optional[float] = MISSING
    max_steps: int = MISSING
    global_batch_size: int = MISSING
    micro_batch_size: int = MISSING
    precision: str = MISSING  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp16 | fp32
    log_interval: int = MISSING
    eval_interval: int = MISSING
    # Validation rows evaluated, drawn once with run.seed from the whole split; null: all of it.
    eval_rows: Optional[int] = MISSING
    checkpoint_interval: int = MISSING
    keep_checkpoints: int = MISSING
    # sync: training waits while Ray Train stores a checkpoint; async: it goes on while the upload runs.
    checkpoint_upload: str = MISSING
    # Local directory or any pyarrow filesystem URI (s3://, gs://, ...).
    storage_path: str = MISSING
    # Seeds the model's initial weights and the sample order (framework/data/sampler.py).
    seed: int = MISSING
    # Row groups whose rows are shuffled together each epoch; larger mixes more, reads more at once.
    shuffle_window: int = MISSING
    # Steps of batches each worker reads ahead in a background thread.
    prefetch_steps: int = MISSING
    max_failures: int = MISSING
    # Seconds a run, and each restart after a failure, waits for its workers' CPUs/GPUs (an
    # autoscaler adding nodes, say) before it fails instead of waiting for a node that never comes.
    resource_wait_s: int = MISSING
    # Seconds the workers wait for each other to form the process group (a worker lost during set-up).
    setup_timeout_s: int = MISSING
    # Seconds one collective (an all-reduce, a ZeRO gather, a barrier around a save) may take before
    # the attempt fails: long enough for a rank that loads a model or saves alone to catch up.
    collective_timeout_s: int = MISSING
    # Elastic runs: seconds between checks for room to grow back (Ray Train's elastic_resize_monitor_interval_s).
    resize_check_s: int = MISSING
    # Ray cluster address; null uses RAY_ADDRESS or starts a local cluster.
    ray_address: Optional[str] = MISSING
    # Peak TFLOP/s per GPU for MFU; null looks the GPU up by name (H100/H200 bf16: 989).
    peak_tflops: Optional[float] = MISSING


def worker_counts(run: RunConfig) -> range:
    """Every worker count the run may train with: run.num_workers, or min_workers..num_workers when elastic."""
    return range(run.min_workers if run.min_workers is not None else run.num_workers, run.num_workers + 1)


def check_run(run: RunConfig) -> None:
    """The `run` rules a schema cannot express; raises ConfigError naming the first bad key."""
    require(run.num_workers >= 1, "run.num_workers", run.num_workers, "expected at least 1")
    require(
        run.min_workers is None or 1 <= run.min_workers <= run.num_workers,
        "run.min_workers", run.min_workers, f"expected null or 1 to run.num_workers={run.num_workers}",
    )
    require(run.micro_batch_size >= 1, "run.micro_batch_size", run.micro_batch_size, "expected at least 1")
    for workers in worker_counts(run):
        per_step = workers * run.micro_batch_size
        require(
            run.global_batch_size % per_step == 0 and run.global_batch_size >= per_step,
            "run.global_batch_size", run.global_batch_size,
            f"expected a multiple of run.num_workers × run.micro_batch_size = {workers} × {run.micro_batch_size} = {per_step}"
            + (" (every worker count from run.min_workers up trains the same global batch)" if run.min_workers is not None else ""),
        )
    require(run.gpus_per_worker >= 0, "run.gpus_per_worker", run.gpus_per_worker, "expected 0 or more")
    require(
        run.cpus_per_worker is None or run.cpus_per_worker > 0,
        "run.cpus_per_worker", run.cpus_per_worker, "expected a positive number or null (sized automatically)",
    )
    require(run.max_steps >= 1, "run.max_steps", run.max_steps, "expected at least 1")
    for key in ("log_interval", "eval_interval", "checkpoint_interval", "keep_checkpoints", "setup_timeout_s",
                "collective_timeout_s", "resize_check_s", "resource_wait_s", "shuffle_window", "prefetch_steps"):
        value = getattr(run, key)
        require(value >= 1, f"run.{key}", value, "expected at least 1")
    require(run.eval_rows is None or run.eval_rows >= 1, "run.eval_rows", run.eval_rows, "expected at least 1, or null (the whole validation split)")
    require(run.checkpoint_upload in ("sync", "async"), "run.checkpoint_upload", run.checkpoint_upload, "expected sync or async")
    require(run.precision in PRECISIONS, "run.precision", run.precision, f"expected one of {PRECISIONS}")
    require(
        run.gpus_per_worker > 0 or run.precision in ("auto", "fp32"),
        "run.precision", run.precision, "half precision needs GPUs (run.gpus_per_worker>0); use fp32 or auto on CPU",
    )
    require(run.max_failures >= -1, "run.max_failures", run.max_failures, "expected -1 (forever) or more")


def check_deepspeed(ds: DeepSpeedConfig) -> None:
    require(ds.stage in (0, 1, 2, 3), "deepspeed.stage", ds.stage, "expected 0, 1, 2 or 3")
    require(
        not ds.offload_optimizer or ds.stage >= 1,
        "deepspeed.offload_optimizer", ds.offload_optimizer, "optimizer offload needs deepspeed.stage >= 1",
    )
    require(not ds.offload_param or ds.stage == 3, "deepspeed.offload_param", ds.offload_param, "parameter offload needs deepspeed.stage=3")


def check_optim(optim: OptimConfig, max_steps: int) -> None:
    require(optim.name in OPTIMIZERS, "optim.name", optim.name, f"expected one of {tuple(OPTIMIZERS)}")
    require(optim.lr > 0, "optim.lr", optim.lr, "expected a positive learning rate")
    require(0 <= optim.min_lr_ratio <= 1, "optim.min_lr_ratio", optim.min_lr_ratio, "expected a value in [0, 1]")
    require(
        0 <= optim.warmup_steps < max_steps,
        "optim.warmup_steps", optim.warmup_steps, f"expected 0 <= warmup_steps < run.max_steps={max_steps}",
    )
    require(optim.weight_decay >= 0, "optim.weight_decay", optim.weight_decay, "expected 0 or more")
    for key in ("beta1", "beta2"):
        require(0 <= getattr(optim, key) < 1, f"optim.{key}", getattr(optim, key), "expected a value in [0, 1)")
    require(optim.eps > 0, "optim.eps", optim.eps, "expected a positive number")
    require(optim.grad_clip >= 0, "optim.grad_clip", optim.grad_clip, "expected 0 (off) or a positive norm")


@dataclass
class PostConfig:
    """The `post` group (`conf/post/*`, experiment=dpo): preference tuning on preference pairs (data=preference), read by
    framework/train/objectives.py. Absent (null) for pretraining and SFT."""

    # A loss of framework/train/objectives.py's LOSSES: dpo | ipo (against a reference model) | simpo | orpo (none).
    loss: str = MISSING
    # DPO/IPO/SimPO's β (how far from the reference, or how sharp the margin); ORPO's λ (weight of the odds-ratio term).
    beta: float = MISSING
    # dpo, simpo: the assumed share of flipped labels ε (conservative DPO); 0: the plain loss.
    label_smoothing: float = MISSING
    # simpo: the target reward margin γ.
    simpo_gamma: float = MISSING


def check_post(post: PostConfig) -> None:
    """The `post` rules a schema cannot express; raises ConfigError naming the first bad key."""
    from framework.train.objectives import LOSSES

    LOSSES.get(post.loss)
    require(post.beta > 0, "post.beta", post.beta, "expected a positive number")
    require(0 <= post.label_smoothing < 0.5, "post.label_smoothing", post.label_smoothing, "expected a value in [0, 0.5)")
    require(
        post.label_smoothing == 0 or post.loss in ("dpo", "simpo"), "post.label_smoothing", post.label_smoothing,
        f"applies to the sigmoid losses (dpo, simpo) only; post.loss={post.loss} expects 0",
    )
    require(post.simpo_gamma >= 0, "post.simpo_gamma", post.simpo_gamma, "expected 0 or more")


@dataclass
class TrainRoot:
    """The composed `conf/config.yaml`: what prep, training, export of a run, and a sweep (with `tune`) read."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    # `tune=<preset>` selects a sweep (launch/tune.py); absent from training runs. Typed as TuneConfig by
    # the sweep (framework/tune/plan.py), the one reader of it.
    tune: Optional[Any] = optional_group()
    # `post=dpo` (or experiment=dpo) trains on preference pairs with a preference loss; absent: the token loss.
    post: Optional[PostConfig] = optional_group()
    # `rl=grpo` and a `reward` (or experiment=grpo) train by reinforcement learning on prompts (data=prompts).
    rl: Optional[RLConfig] = optional_group()
    reward: Optional[RewardConfig] = optional_group()
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


# `conf/config.yaml` names it first in its defaults: misspelt keys and wrong types fail at composition.
register("config_schema", TrainRoot)


def validate(cfg: TrainRoot) -> TrainRoot:
    """Check every training group's rules and the rules across groups; raises ConfigError naming the first bad key."""
    check_run(cfg.run)
    check_deepspeed(cfg.deepspeed)
    check_optim(cfg.optim, cfg.run.max_steps)
    check_data(cfg.data)
    check_model_config(cfg.model, cfg.data.seq_len)
    if cfg.post is not None:
        check_post(cfg.post)
    # (Pairs without a preference loss are refused by the training plan, from the shards: prep needs no `post`.)
    require(
        cfg.post is None or is_preference(cfg.data), "post", None if cfg.post is None else cfg.post.loss,
        "a preference loss trains on preference pairs: expected data=preference (experiment=dpo sets both), "
        f"not data.sources.0.format={cfg.data.sources[0].format if cfg.data.sources else None}",
    )
    if cfg.rl is not None or cfg.reward is not None:
        check_rl_run(cfg)
    check_tracking(cfg.tracking)
    return cfg


def check_rl_run(cfg: TrainRoot) -> None:
    """An rl run's rules across groups: a reward to learn from, prompts to sample, a folder to start the engine from."""
    require(cfg.rl is not None, "reward", cfg.reward.name if cfg.reward else None,
            "rewards score the completions of reinforcement learning: add rl=grpo (experiment=grpo sets both)")
    check_rl(cfg.rl)
    # A rollout's μ steps run as one: evaluations and checkpoints fall between them, where the engine holds the
    # policy's weights and no rollout is half used (a resume starts a new one).
    for key in ("max_steps", "eval_interval", "checkpoint_interval"):
        value = getattr(cfg.run, key)
        require(value % cfg.rl.iterations == 0, f"run.{key}", value,
                f"expected a multiple of rl.iterations={cfg.rl.iterations} (each rollout trains that many steps)")
    require(cfg.reward is not None, "reward", None, "rl=grpo needs rewards: expected reward=last-number or another conf/reward/ preset")
    reward_functions(cfg.reward)  # every function imported and its arguments checked, before any cluster work
    require(is_prompts(cfg.data), "data", cfg.data.name, "rl samples completions of prompts: expected data=prompts (experiment=grpo sets it)")
    require(cfg.model.pretrained_path is not None, "model.pretrained_path", None,
            "the rollout engine starts from a Hugging Face folder: expected model=hf-local with model.pretrained_path (an SFT export)")


def to_train_root(cfg: DictConfig) -> TrainRoot:
    """A composed DictConfig as the typed, validated TrainRoot (the `tune` node checked by the sweep, not here)."""
    return validate(typed(TrainRoot, cfg, ""))


def to_prep_root(cfg: DictConfig) -> TrainRoot:
    """launch/prep.py's root: the training tree, and a data.output_dir prep may write into (new, empty, or an earlier prep's)."""
    root = to_train_root(cfg)
    check_prep_dir(absolute(root.data.output_dir))
    return root


# launch/train.py: conf/config.yaml → TrainRoot; launch/prep.py the same, with its output folder checked.
TRAIN = Job("config", load=to_train_root)
PREP = Job("config", load=to_prep_root)


def training_overrides(overrides: Sequence[str]) -> List[str]:
    """The overrides among a command line that configure training (not `tune*`, not `hydra.*`)."""
    def group(o: str) -> str:
        return o.lstrip("+~").split("=", 1)[0].split(".", 1)[0].split("/", 1)[0]

    return [o for o in overrides if group(o) not in ("tune", "hydra")]
