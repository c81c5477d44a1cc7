"""The `rl` group (`conf/rl/*`, experiment=grpo): reinforcement learning with verifiable rewards, read by the GRPO loop
(framework/train/rl_loop.py) and the rollout engine (framework/rl/rollout.py). Absent (null) for every other run.

Every value lives in the YAML (conf/rl/grpo.yaml); the schemas here hold the types and the checks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from omegaconf import MISSING

from framework.config import require

# How advantages are scaled within a group and how the loss is averaged (framework/rl/grpo.py computes both).
SCALES = ("group", "batch", "none")
NORMALIZATIONS = ("token", "sequence")


@dataclass
class EngineConfig:
    """The rollout engine: vLLM in a Ray actor of its own (framework/rl/rollout.py), on CPUs of its own (separate) or on
    rank 0's node, sharing the CPUs the workers hold (colocated: rollout and training take turns)."""

    placement: str = MISSING             # separate | colocated
    num_cpus: float = MISSING            # vLLM's threads on CPU; separate: also the Ray CPUs the actor reserves
    num_gpus: float = MISSING            # 0: vLLM's CPU build
    kv_cache_gib: int = MISSING          # CPU: the KV cache's whole GiB (VLLM_CPU_KVCACHE_SPACE)
    gpu_memory_utilization: float = MISSING  # GPU: vLLM's share of the device
    dtype: str = MISSING                 # auto: bf16 on GPU, fp32 on CPU
    max_num_seqs: int = MISSING          # sequences vLLM batches at once


@dataclass
class RLConfig:
    """GRPO (Shao et al. 2024) with TRL's definitions (framework/rl/grpo.py) and DAPO's options."""

    algorithm: str = MISSING             # grpo (the one loop there is)
    group_size: int = MISSING            # G: completions sampled per prompt; run.global_batch_size is the prompts per step
    max_tokens: int = MISSING            # a completion's longest, in tokens
    temperature: float = MISSING         # sampling temperature; the trainer divides its logits by it too
    epsilon_low: float = MISSING         # the ratio's clip below: 1 − ε_low
    epsilon_high: float = MISSING        # and above: 1 + ε_high (DAPO's clip-higher: a larger ε_high)
    beta: float = MISSING                # KL coefficient to the reference (the starting weights; LoRA: adapters off); 0: none
    iterations: int = MISSING            # μ: policy steps per rollout (TRL's num_iterations)
    scale_rewards: str = MISSING         # group | batch | none: what the advantages are divided by (TRL's scale_rewards)
    loss_normalization: str = MISSING    # token | sequence: what the step's loss is a mean over
    drop_equal_groups: bool = MISSING    # leave groups whose rewards are all equal out of the loss and its mean
    correct_reward: float = MISSING      # a completion counts as correct at this reward or more (the groups metrics)
    eval_samples: int = MISSING          # completions per validation prompt: val/reward is their mean reward
    eval_temperature: float = MISSING    # 0: greedy
    log_samples: int = MISSING           # groups per step written to logs/rollouts.jsonl (the step's rows always are)
    engine: EngineConfig = field(default_factory=EngineConfig)


ALGORITHMS = ("grpo",)
PLACEMENTS = ("separate", "colocated")


def check_rl(rl: RLConfig) -> None:
    """The `rl` rules a schema cannot express; raises ConfigError naming the first bad key."""
    require(rl.algorithm in ALGORITHMS, "rl.algorithm", rl.algorithm, f"expected one of {', '.join(ALGORITHMS)}")
    require(rl.group_size >= 2, "rl.group_size", rl.group_size, "expected 2 or more: advantages compare completions of one prompt")
    require(rl.max_tokens >= 1, "rl.max_tokens", rl.max_tokens, "expected a positive number of tokens")
    require(rl.temperature > 0, "rl.temperature", rl.temperature,
            "expected a positive temperature (the trainer divides its logits by it; greedy rollouts give no group signal)")
    require(0 <= rl.epsilon_low < 1, "rl.epsilon_low", rl.epsilon_low, "expected a value in [0, 1)")
    require(rl.epsilon_high >= 0, "rl.epsilon_high", rl.epsilon_high, "expected 0 or more")
    require(rl.beta >= 0, "rl.beta", rl.beta, "expected 0 (no KL term) or a positive coefficient")
    require(rl.iterations >= 1, "rl.iterations", rl.iterations, "expected 1 or more policy steps per rollout")
    require(rl.scale_rewards in SCALES, "rl.scale_rewards", rl.scale_rewards, f"expected one of {', '.join(SCALES)}")
    require(rl.loss_normalization in NORMALIZATIONS, "rl.loss_normalization", rl.loss_normalization,
            f"expected one of {', '.join(NORMALIZATIONS)}")
    require(rl.eval_samples >= 1, "rl.eval_samples", rl.eval_samples, "expected 1 or more")
    require(rl.eval_temperature >= 0, "rl.eval_temperature", rl.eval_temperature, "expected 0 (greedy) or more")
    require(rl.log_samples >= 0, "rl.log_samples", rl.log_samples, "expected 0 or more")
    engine = rl.engine
    require(engine.placement in PLACEMENTS, "rl.engine.placement", engine.placement, f"expected one of {', '.join(PLACEMENTS)}")
    require(engine.placement == "separate" or engine.num_gpus == 0, "rl.engine.placement", engine.placement,
            "an engine colocated on the trainer's GPU needs vLLM's sleep mode between rollouts and steps, which this version "
            "does not drive; use rl.engine.placement=separate (a GPU of its own) or a CPU engine (rl.engine.num_gpus=0)")
    require(engine.num_cpus > 0, "rl.engine.num_cpus", engine.num_cpus, "expected a positive number of CPUs")
    require(engine.num_gpus >= 0, "rl.engine.num_gpus", engine.num_gpus, "expected 0 (CPU) or more")
    require(engine.kv_cache_gib >= 1, "rl.engine.kv_cache_gib", engine.kv_cache_gib, "expected a whole number of GiB, 1 or more")
    require(0 < engine.gpu_memory_utilization <= 1, "rl.engine.gpu_memory_utilization", engine.gpu_memory_utilization,
            "expected a share in (0, 1]")
    require(engine.max_num_seqs >= 1, "rl.engine.max_num_seqs", engine.max_num_seqs, "expected 1 or more")

