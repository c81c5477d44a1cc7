"""Serving config: the `serve.*` schema (Hydra ConfigStore) and the checks a schema cannot express.

`conf/serve.yaml` names `serve_schema` first in its defaults, so a misspelt `serve.*` key or a wrong
type fails at composition; `load_serve` then checks ranges, combinations and the model folder,
all before Ray or Serve start.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

from omegaconf import MISSING, DictConfig

from framework.config import ConfigError, Job, compose, one_line, register, require, typed
from framework.hf_folder import DTYPE_NAMES
from framework.serve.ingress import read_api_key


@dataclass
class ServeConfig:
    """The `serve.*` keys: types here, values in conf/serve/default.yaml (and the presets over it)."""

    name: str = MISSING
    # A Hugging Face model folder, or a sweep's best.json whose `path` names one.
    model_path: str = MISSING
    # The id clients put in `model` and /v1/models lists; null uses the folder's name, or for a
    # best.json the name of the folder holding it (the sweep's name).
    model_name: Optional[str] = MISSING
    # LoRA adapters served on the base as their own model ids: id → a PEFT folder or an export.adapter=true export.
    adapters: Dict[str, str] = field(default_factory=dict)
    # A LoRA sweep's tune.output_dir (or its best.json): every trial it exported served too, as its trial's name.
    adapters_from: Optional[str] = MISSING
    dtype: str = MISSING  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp16 | fp32
    # Ray resources per replica (the vLLM engine's placement group bundle): CPUs the engine's threads use,
    # and GPUs (num_gpus > 0 runs vLLM's GPU build on them; 0 runs the CPU build).
    num_cpus: float = MISSING
    num_gpus: float = MISSING
    # Autoscaling (Serve's autoscaling_config): replicas follow ongoing requests per replica.
    min_replicas: int = MISSING
    max_replicas: int = MISSING
    target_ongoing_requests: float = MISSING
    # Back-pressure: requests a replica takes at once, and requests a caller may queue for the
    # deployment beyond that before the proxy answers `backpressure_status`.
    max_ongoing_requests: int = MISSING
    max_queued_requests: int = MISSING
    backpressure_status: int = MISSING  # 503 | 429
    # vLLM's scheduler: sequences and tokens in one forward pass (max_num_seqs, max_num_batched_tokens).
    max_sequences: int = MISSING
    max_batch_tokens: int = MISSING
    # Longest prompt + completion; null: the model's own context (max_position_embeddings).
    max_model_len: Optional[int] = MISSING
    # KV cache: GiB of memory on a CPU replica (VLLM_CPU_KVCACHE_SPACE), the fraction of GPU memory vLLM
    # may take on a GPU replica (gpu_memory_utilization).
    kv_cache_gib: int = MISSING
    gpu_memory_utilization: float = MISSING
    # Eager PyTorch instead of torch.compile / CUDA graphs: starts in seconds rather than minutes.
    enforce_eager: bool = MISSING
    # Reuse the KV cache of a shared prompt prefix across requests.
    enable_prefix_caching: bool = MISSING
    # Ray Serve LLM's stream batching (stream_batching_interval_ms): a stream's tokens made within this window go
    # to the client together; 0: each token as soon as the engine makes it.
    stream_batching_ms: float = MISSING
    # max_tokens when a request leaves it out (clipped to what the context has left).
    default_max_tokens: int = MISSING
    # Largest request body, checked at the proxy and the replica before it is read (413 past it).
    max_request_bytes: int = MISSING
    # On SIGTERM / Ctrl-C, and when Serve stops a replica: how long in-flight requests may run to their end.
    drain_timeout_s: float = MISSING
    # serve.model_path a JSON naming the folder (a promotion record, a best.json): how often launch/serve.py reads it
    # again and rolls a new folder out in place (framework/serve/app.py: follow); 0: never.
    follow_interval_s: float = MISSING
    # Name of an environment variable holding the API key (a Kubernetes Secret, say); null: no key.
    api_key_env: Optional[str] = MISSING
    # HTTP proxy and application.
    host: str = MISSING
    port: int = MISSING
    route_prefix: str = MISSING
    app_name: str = MISSING
    # Ray cluster address; null uses RAY_ADDRESS or starts a local cluster.
    ray_address: Optional[str] = MISSING


@dataclass
class ServeRoot:
    """The root of conf/serve.yaml."""

    serve: ServeConfig = field(default_factory=ServeConfig)


# Registered on import (`conf/serve.yaml` names it) so that `compose(..., "serve")` finds it from any entry point.
register("serve_schema", ServeRoot)

_DTYPES = ("auto", *DTYPE_NAMES)


def to_serve_config(cfg: DictConfig | Dict[str, Any]) -> ServeConfig:
    """Type the `serve` node (or a plain dict of serve.* keys, as Serve's `args` gives them) as ServeConfig."""
    return typed(ServeConfig, cfg["serve"] if "serve" in cfg else cfg, "serve", example="PATH")


def validate_serve(serve: ServeConfig) -> ServeConfig:
    """Check ranges and combinations; raises ConfigError naming the first bad key."""
    require(serve.dtype in _DTYPES, "serve.dtype", serve.dtype, f"expected one of {_DTYPES}")
    require(
        serve.num_gpus > 0 or serve.dtype != "fp16",
        "serve.dtype", serve.dtype, "vLLM's CPU build runs fp32 or bf16, not fp16; use fp32, bf16 or auto on CPU",
    )
    require(serve.num_cpus >= 0, "serve.num_cpus", serve.num_cpus, "expected 0 or more")
    require(serve.num_gpus >= 0, "serve.num_gpus", serve.num_gpus, "expected 0 or more")
    require(serve.num_cpus >= 1 or serve.num_gpus > 0, "serve.num_cpus", serve.num_cpus,
            "expected at least 1 on a CPU replica (the engine's threads)")
    require(serve.min_replicas >= 0, "serve.min_replicas", serve.min_replicas, "expected 0 or more")
    require(
        serve.max_replicas >= max(serve.min_replicas, 1),
        "serve.max_replicas", serve.max_replicas, f"expected at least 1 and serve.min_replicas={serve.min_replicas}",
    )
    require(
        serve.target_ongoing_requests > 0,
        "serve.target_ongoing_requests", serve.target_ongoing_requests, "expected a positive number",
    )
    require(serve.max_ongoing_requests >= 1, "serve.max_ongoing_requests", serve.max_ongoing_requests, "expected at least 1")
    for key in ("max_sequences", "max_batch_tokens", "kv_cache_gib", "max_request_bytes"):
        require(getattr(serve, key) >= 1, f"serve.{key}", getattr(serve, key), "expected at least 1")
    require(serve.max_model_len is None or serve.max_model_len >= 1, "serve.max_model_len", serve.max_model_len,
            "expected at least 1 token, or null (the model's context)")
    require(0 < serve.gpu_memory_utilization <= 1, "serve.gpu_memory_utilization", serve.gpu_memory_utilization,
            "expected a fraction in (0, 1]")
    require(serve.drain_timeout_s >= 0, "serve.drain_timeout_s", serve.drain_timeout_s, "expected 0 or more seconds")
    require(serve.stream_batching_ms >= 0, "serve.stream_batching_ms", serve.stream_batching_ms,
            "expected 0 or more milliseconds")
    require(serve.follow_interval_s >= 0, "serve.follow_interval_s", serve.follow_interval_s, "expected 0 or more seconds")
    require(
        serve.max_queued_requests == -1 or serve.max_queued_requests >= 0,
        "serve.max_queued_requests", serve.max_queued_requests, "expected 0 or more, or -1 (unbounded)",
    )
    require(
        serve.backpressure_status in (503, 429),
        "serve.backpressure_status", serve.backpressure_status, "expected 503 or 429",
    )
    require(serve.default_max_tokens >= 1, "serve.default_max_tokens", serve.default_max_tokens, "expected at least 1")
    require(1 <= serve.port <= 65535, "serve.port", serve.port, "expected a TCP port")
    require(serve.route_prefix.startswith("/"), "serve.route_prefix", serve.route_prefix, "expected a path starting with /")
    require(
        serve.api_key_env is None or serve.api_key_env.strip() != "",
        "serve.api_key_env", serve.api_key_env, "expected an environment variable name, or null",
    )
    return serve


def compose_serve_config(args: Dict[str, Any]) -> ServeConfig:
    """A checked ServeConfig from a preset and serve.* keys, as Serve's builder args give them: `preset` (a
    conf/serve/ name, default "default") plus any keys, e.g. {"preset": "gpu", "model_path": "/models/best.json"}."""
    from omegaconf import OmegaConf, open_dict

    args = dict(args)
    overrides = [f"serve={args.pop('preset', 'default')}"]
    try:
        preset = compose(overrides, "serve")
        # Merging into the typed preset converts `serve run`'s string values ("2") to the schema's types; the
        # adapters are the one node whose keys (model ids) are the user's.
        with open_dict(preset.serve.adapters):
            cfg = to_serve_config(OmegaConf.merge(preset.serve, args))
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - OmegaConf/Hydra errors, reduced to one line
        raise ConfigError(one_line(exc)) from None
    return with_sweep_adapters(validate_serve(cfg))


def with_sweep_adapters(serve: ServeConfig) -> ServeConfig:
    """`serve` with serve.adapters_from's trial adapters added to serve.adapters (what every later step reads)."""
    if serve.adapters_from is None:
        return serve
    from dataclasses import replace

    from framework.hf_folder import resolve_model_path
    from framework.serve.lora import sweep_adapters

    found = sweep_adapters(serve.adapters_from, resolve_model_path(serve.model_path))
    for model_id in found:
        require(model_id not in serve.adapters, f"serve.adapters.{model_id}", serve.adapters.get(model_id),
                f"serve.adapters_from={serve.adapters_from} serves trial {model_id} under this id already")
    return replace(serve, adapters={**serve.adapters, **{model_id: str(folder) for model_id, folder in found.items()}})


def check_model_path(serve: ServeConfig) -> Path:
    """The model folder, checked whole, and checked to hold serve.max_model_len tokens; the adapters, each a PEFT folder."""
    from framework.hf_folder import check_model_folder, model_context, resolve_model_path

    folder = resolve_model_path(serve.model_path)
    check_model_folder(folder)
    context = model_context(folder)
    require(serve.max_model_len is None or serve.max_model_len <= context, "serve.max_model_len", serve.max_model_len,
            f"expected at most the model's context of {context} tokens")
    from framework.hf_folder import default_model_id
    from framework.serve.lora import check_adapters

    check_adapters(dict(serve.adapters), serve.model_name or default_model_id(serve.model_path))
    return folder


def load_serve(cfg: DictConfig) -> ServeConfig:
    """`launch/serve.py`'s root: schema, ranges, then the model folder itself (before Serve starts)."""
    serve = with_sweep_adapters(validate_serve(to_serve_config(cfg)))
    check_model_path(serve)
    # On the local cluster the replicas inherit this process's environment, so a missing key shows now.
    local = serve.ray_address is None and not os.environ.get("RAY_ADDRESS")
    if serve.api_key_env and local and read_api_key(serve.api_key_env) is None:
        raise ConfigError(f"serve.api_key_env={serve.api_key_env}: environment variable {serve.api_key_env} is not set "
                          f"(or blank)")
    return serve


SERVE = Job("serve", load=load_serve)


__all__ = ["SERVE", "ConfigError", "ServeConfig", "check_model_path", "compose_serve_config", "load_serve", "to_serve_config",
           "validate_serve", "with_sweep_adapters"]
