"""The engine's settings: `serve.*` mapped onto vLLM's engine arguments and Ray Serve LLM's `LLMConfig`.

One place for the mapping, so that serving (framework/serve/app.py) and batch generation
(framework/serve/generate.py) run the same engine on the same folder. vLLM runs on the replica's
placement-group bundle: `num_cpus` CPUs or `num_gpus` GPUs; on CPU with `kv_cache_gib` of KV cache and the
environment framework/vllm_env.py gives every engine of the project.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

from framework.serve.config import ServeConfig
from framework.vllm_env import cpu_engine_env
from framework.vllm_env import vllm_dtype as named_vllm_dtype

ENGINE_DEPLOYMENT = "engine"


def on_gpu(cfg: ServeConfig) -> bool:
    return cfg.num_gpus > 0


def vllm_dtype(cfg: ServeConfig) -> str:
    """serve.dtype as vLLM names it (auto: bf16 on a GPU, fp32 on a CPU)."""
    return named_vllm_dtype(cfg.dtype, on_gpu(cfg))


def engine_kwargs(cfg: ServeConfig) -> Dict[str, Any]:
    """vLLM's engine arguments for a replica (or a batch-generation worker) of `cfg`.

    Sampling defaults are OpenAI's (temperature 1, top_p 1), not those of the folder's generation_config.json;
    every request reaches the engine with its max_tokens set (framework/serve/routes.py fills serve.default_max_tokens).
    """
    kwargs: Dict[str, Any] = {
        "dtype": vllm_dtype(cfg),
        "max_num_seqs": cfg.max_sequences,
        "max_num_batched_tokens": cfg.max_batch_tokens,
        "enforce_eager": cfg.enforce_eager,
        "enable_prefix_caching": cfg.enable_prefix_caching,
        "generation_config": "vllm",
        # The largest top_logprobs the API takes (chat's 20); logprobs of the prompt (echo) share the bound.
        "max_logprobs": 20,
    }
    if cfg.max_model_len is not None:
        kwargs["max_model_len"] = cfg.max_model_len
    if on_gpu(cfg):
        kwargs["gpu_memory_utilization"] = cfg.gpu_memory_utilization
    return kwargs


def engine_cli(cfg: ServeConfig) -> list:
    """The same engine arguments as `vllm serve` flags (the serving benchmark starts vLLM's own server with them)."""
    flags = []
    for key, value in engine_kwargs(cfg).items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + key.replace("_", "-"))
        else:
            flags += [flag, str(value)]
    return flags


def engine_env(cfg: ServeConfig) -> Dict[str, str]:
    """Environment of the engine's processes (a runtime_env's env_vars)."""
    return {} if on_gpu(cfg) else cpu_engine_env(cfg.num_cpus, cfg.kv_cache_gib)


def engine_bundle(cfg: ServeConfig) -> Dict[str, float]:
    """The placement-group bundle one engine runs in."""
    return {"CPU": cfg.num_cpus, "GPU": cfg.num_gpus} if on_gpu(cfg) else {"CPU": cfg.num_cpus}


# Extra replicas allowed while a deployment's replicas are replaced (Ray Serve's max_surge_percent): a whole second set,
# so no request finds the deployment without a running replica.
ROLLOUT_SURGE_PERCENT = 100


def llm_config(cfg: ServeConfig, folder: Path, model_id: str) -> Any:
    """Ray Serve LLM's LLMConfig for `cfg` serving `folder` as `model_id`, and serve.adapters on it (vLLM's LoRA)."""
    from ray.serve.llm import LLMConfig

    from framework.serve.lora import check_adapters, lora_settings

    kwargs, env, lora = engine_kwargs(cfg), engine_env(cfg), None
    if cfg.adapters:
        lora = lora_settings(check_adapters(dict(cfg.adapters), model_id))
        kwargs.update(enable_lora=True, max_lora_rank=lora["max_rank"], max_loras=lora["max_loras"])
        env.update(lora["env"])
    return LLMConfig(
        model_loading_config={"model_id": model_id, "model_source": str(folder)},
        accelerator_config={"kind": "gpu" if on_gpu(cfg) else "cpu"},
        engine_kwargs=kwargs,
        placement_group_config={"bundles": [engine_bundle(cfg)]},
        runtime_env={"env_vars": env},
        lora_config=lora["config"] if lora is not None else None,
        callback_config={"callback_class": "framework.serve.callbacks.LocalFolder"},
        experimental_configs={"stream_batching_interval_ms": cfg.stream_batching_ms},
        deployment_config={
            # Deployed as "LLMServer:engine", whatever the model id (KubeRay's serveConfigV2 names it).
            "name": ENGINE_DEPLOYMENT,
            "autoscaling_config": {
                "min_replicas": cfg.min_replicas,
                "initial_replicas": max(cfg.min_replicas, 1),
                "max_replicas": cfg.max_replicas,
                "target_ongoing_requests": cfg.target_ongoing_requests,
            },
            "max_ongoing_requests": cfg.max_ongoing_requests,
            # Past every replica's ongoing requests and then the queue, the proxy answers serve.backpressure_status at
            # once (the replica is its own ingress: framework/serve/server.py).
            "max_queued_requests": cfg.max_queued_requests,
            "backpressure_config": {"status_code": cfg.backpressure_status},
            "graceful_shutdown_timeout_s": cfg.drain_timeout_s,
            # A new model rolls out in place (framework/serve/app.py: follow): new replicas start and pass their health
            # check while the old ones serve, which then drain.
            "max_surge_percent": ROLLOUT_SURGE_PERCENT,
            # A CPU replica is its engine's threads (the bundle's serve.num_cpus): the replica actor's own loop (its
            # routes) shares them rather than holding a CPU more (Ray Serve LLM's default: 1), so that a 2-core machine
            # has room for the second replica a rollout starts.
            **({} if on_gpu(cfg) else {"ray_actor_options": {"num_cpus": 0}}),
        },
        log_engine_metrics=True,
    )
