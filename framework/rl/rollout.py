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
    """What a rollout engine runs: the starting folder, the engine's resources and limits (conf/rl/*: rl.engine)."""

    folder: str
    num_cpus: float
    num_gpus: float
    kv_cache_gib: int  # whole GiB: vLLM reads VLLM_CPU_KVCACHE_SPACE as an integer
    gpu_memory_utilization: float
    dtype: str
    max_num_seqs: int
    placement: str = "separate"  # separate: the actor reserves num_cpus/num_gpus; colocated: none, on node `node_id`
    node_id: Optional[str] = None
    max_model_len: Optional[int] = None  # the longest prompt + completion (the run's data.seq_len + rl.max_tokens)
    lora_rank: Optional[int] = None  # LoRA runs: the adapters' rank (vLLM allots room for it)
    seed: int = 0

    @classmethod
    def of(cls, engine: Any, folder: str, max_model_len: Optional[int], lora_rank: Optional[int], seed: int,
           node_id: Optional[str] = None) -> "EngineSpec":
        """The spec of an `rl.engine` config (framework/rl/config.py: EngineConfig) for `folder`; a colocated engine
        goes to node `node_id` (the trainer's)."""
        return cls(folder=folder, num_cpus=engine.num_cpus, num_gpus=engine.num_gpus, kv_cache_gib=engine.kv_cache_gib,
                   gpu_memory_utilization=engine.gpu_memory_utilization, dtype=engine.dtype, max_num_seqs=engine.max_num_seqs,
                   placement=engine.placement, node_id=node_id, max_model_len=max_model_len, lora_rank=lora_rank, seed=seed)

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
            # A prompt prefilled in chunks has its sampled token discarded and its seeded generator rewound, which
            # the CPU's torch generators cannot do (vLLM 0.29: "CPU Generator does not use offset"); whole prefills
            # keep every prompt's completions a function of its seed.
            "enable_chunked_prefill": self.on_gpu,
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
        # A weight sync logs a page of INFO lines (and warnings for the tied weights it sets itself) every step.
        env["VLLM_LOGGING_LEVEL"] = "ERROR"
        if not self.on_gpu:
            # On CPU the engine core runs in the actor's own process: a separate core process (vLLM's default, which
            # overlaps a GPU's work with the scheduler's) buys nothing there and costs a second interpreter importing
            # torch and vLLM. Measured on the 2-core VM: the engine up in 2 s instead of 19 s, sampling as fast.
            env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        options: Dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus, "runtime_env": {"env_vars": env}}
        if self.placement == "colocated":
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            # Nothing reserved: its threads share the trainer's CPUs, which wait while it samples and vice versa.
            options.update(num_cpus=0, num_gpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(self.node_id, soft=False))
        return options


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
        self.folder: Optional[str] = None  # the engine's copy of the weights last sent as files

    def generate(self, prompts: Sequence[Sequence[int]], n: int, max_tokens: int, temperature: float,
                 seeds: Optional[Sequence[int]] = None) -> List[List[Sample]]:
        """`n` completions of each prompt (token ids), sampled at `temperature` (0: greedy), in order. `seeds` (one per
        prompt) makes each prompt's completions depend on its seed and the weights alone, not on what it is batched with."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        def params(seed: Optional[int]) -> Any:
            return SamplingParams(n=n, max_tokens=max_tokens, temperature=temperature, top_p=1.0, top_k=-1, logprobs=0, seed=seed)

        per_prompt = [params(s) for s in seeds] if seeds is not None else params(None)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], per_prompt, lora_request=self.lora,
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

    def load_weight_files(self, files: Dict[str, bytes]) -> int:
        """`load_weights` of a folder sent as its files (name → content) through Ray's object store, so the trainer and
        the engine need share no file system; written to a folder of the engine's own (the last version's is kept:
        vLLM reads a LoRA adapter's folder when a request first uses it)."""
        import tempfile

        folder = tempfile.mkdtemp(prefix="rollout-weights-")
        for name, content in files.items():
            path = Path(folder) / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
        version = self.load_weights(folder)
        self.close()
        self.folder = folder
        return version

    def close(self) -> None:
        """Remove the engine's copy of the weights last sent as files (the run calls it at its end; the actor's process
        is then stopped, which would leave a model-sized folder in the node's temp directory)."""
        import shutil

        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None


def start_engine(spec: EngineSpec, name: Optional[str] = None) -> Any:
    """A rollout engine actor on `spec`'s resources (named `name` in the job's namespace, if given); waits until it is up."""
    import ray

    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    options = spec.actor_options()
    # Not inside the caller's placement group (a Train worker's bundle, which its worker fills): on its own resources.
    options.setdefault("scheduling_strategy", PlacementGroupSchedulingStrategy(placement_group=None))
    if name:
        options["name"] = name
    actor = ray.remote(RolloutEngine).options(**options).remote(spec)
    ray.get(actor.ready.remote())
    return actor

