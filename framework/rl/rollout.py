"""Rollout engines: vLLM in Ray actors, sampling completions with their log-probs and taking the trainer's weights.

Each engine is a Ray actor holding a `vllm.LLM` on its own CPUs (or GPU), apart from the DeepSpeed workers:
vLLM's CPU worker patches torch process-wide, and its `sleep` (how GPU frameworks share a device between trainer
and engine) does nothing on CPU. The trainer pushes weights after each optimiser step:

  full weights  a Hugging Face safetensors folder; the engine reloads it layer by layer (framework/rl/vllm_worker.py:
                vLLM's `reload_weights`, which re-packs its CPU kernels' weights, where a plain `load_weights` would
                leave them stale, and the tied embeddings it misses), then empties its prefix cache, whose blocks
                were computed by the old weights
  LoRA          the adapter folder (peft's save_pretrained), loaded under a new name per version: the name keys the
                prefix cache, and vLLM loads adapters only from folders

Log-probs are vLLM's `processed_logprobs`: those of the distribution it sampled from (after temperature), which the
trainer recomputes by dividing its logits by the same temperature (as TRL does); top-p/top-k are not offered, since
the trainer could not reproduce the truncation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from framework.vllm_env import cpu_engine_env, vllm_dtype


@dataclass
class EngineSpec:
    """What a rollout engine runs: the starting folder and the engine's resources and limits."""

    folder: str
    num_cpus: float = 1
    num_gpus: float = 0
    kv_cache_gib: int = 1  # whole GiB: vLLM reads VLLM_CPU_KVCACHE_SPACE as an integer
    gpu_memory_utilization: float = 0.5
    dtype: str = "auto"
    max_model_len: Optional[int] = None
    max_num_seqs: int = 64
    lora_rank: Optional[int] = None  # LoRA runs: the adapters' rank (vLLM allots room for it)
    seed: int = 0

    @property
    def on_gpu(self) -> bool:
        return self.num_gpus > 0

    def engine_kwargs(self) -> Dict[str, Any]:
        kwargs: Dict[str, Any] = {
            "model": self.folder,
            "dtype": vllm_dtype(self.dtype, self.on_gpu),
            "max_num_seqs": self.max_num_seqs,
            "enforce_eager": not self.on_gpu,
            "enable_prefix_caching": True,
            "generation_config": "vllm",
            "logprobs_mode": "processed_logprobs",
            "seed": self.seed,
            # The weight sync (framework/rl/vllm_worker.py), in the engine's worker processes.
            "worker_extension_cls": "framework.rl.vllm_worker.WeightSync",
        }
        if self.max_model_len is not None:
            kwargs["max_model_len"] = self.max_model_len
        if self.on_gpu:
            kwargs["gpu_memory_utilization"] = self.gpu_memory_utilization
        if self.lora_rank is not None:
            kwargs.update(enable_lora=True, max_lora_rank=self.lora_rank, max_loras=1)
        return kwargs

    def actor_options(self) -> Dict[str, Any]:
        env = {} if self.on_gpu else cpu_engine_env(self.num_cpus, self.kv_cache_gib)
        return {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus, "runtime_env": {"env_vars": env}}


@dataclass
class Sample:
    """One sampled completion: its token ids, each token's log-prob under the sampling distribution, its text."""

    token_ids: List[int]
    logprobs: List[float]
    text: str
    finish_reason: str


class RolloutEngine:
    """The actor's class (started with `start_engine`)."""

    def __init__(self, spec: EngineSpec) -> None:
        from vllm import LLM

        self.spec = spec
        self.llm = LLM(**spec.engine_kwargs())
        self.version = 0
        self.lora: Any = None

    def generate(self, prompts: Sequence[Sequence[int]], n: int, max_tokens: int, temperature: float,
                 seed: Optional[int] = None) -> List[List[Sample]]:
        """`n` completions of each prompt (token ids), sampled at `temperature`; in order."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(n=n, max_tokens=max_tokens, temperature=temperature, top_p=1.0, top_k=-1, logprobs=0,
                                seed=seed)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params, lora_request=self.lora,
                                    use_tqdm=False)
        return [[Sample(list(c.token_ids), [lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)], c.text, c.finish_reason or "")
                 for c in out.outputs] for out in outputs]

    def token_logprobs(self, sequences: Sequence[Sequence[int]]) -> List[List[float]]:
        """Each sequence's tokens' log-probs after the first (the model's own distribution, temperature 1)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(s)) for s in sequences], params, lora_request=self.lora,
                                    use_tqdm=False)
        return [[lp[t].logprob for t, lp in zip(s[1:], out.prompt_logprobs[1:])] for s, out in zip(sequences, outputs)]

    def ready(self) -> int:
        return self.version

    def load_weights(self, folder: str) -> int:
        """Take the weights in `folder`: a Hugging Face folder (every weight), or a peft adapter folder (on an engine
        started with a LoRA rank: the adapters, over the base); gives the engine's new weight version."""
        adapter = (Path(folder) / "adapter_config.json").is_file()
        if adapter and self.spec.lora_rank is None:
            raise ValueError(f"{folder} holds LoRA adapters, but the engine was started without a LoRA rank")
        self.version += 1
        if adapter:
            from vllm.lora.request import LoRARequest

            previous = self.lora
            self.lora = LoRARequest(f"policy-v{self.version}", self.version, folder)
            self.llm.llm_engine.add_lora(self.lora)
            if previous is not None:
                self.llm.llm_engine.remove_lora(previous.lora_int_id)
        else:
            self.llm.collective_rpc("sync_weights", args=(folder,))  # drops loaded adapters
            self.lora = None
            self.llm.reset_prefix_cache()
        return self.version


def start_engine(spec: EngineSpec, name: Optional[str] = None) -> Any:
    """A rollout engine actor on `spec`'s resources (named `name` in the job's namespace, if given); waits until it is up."""
    import ray

    options = spec.actor_options()
    if name:
        options["name"] = name
    actor = ray.remote(RolloutEngine).options(**options).remote(spec)
    ray.get(actor.ready.remote())
    return actor

