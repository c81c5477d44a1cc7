"""How a vLLM engine runs on this machine's CPUs or GPUs: its dtype names and its processes' environment.

One place for what every engine of the project needs (serving replicas, batch generation, GRPO's rollout
engines): on CPU the KV cache gets an explicit share of memory (left to itself vLLM's CPU build takes most of the
node's), its OpenMP threads stay unbound and as many as the CPUs Ray gave it (Ray shares the node), and Intel's
OpenMP (`libiomp5`, installed with vLLM's CPU build) is preloaded into its processes, as vLLM asks.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Dict, Optional

# vLLM's dtype names for the project's.
VLLM_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def vllm_dtype(dtype: str, on_gpu: bool) -> str:
    """A project dtype name as vLLM names it; auto is bf16 on a GPU, fp32 on a CPU (not the folder's own dtype, as vLLM's auto)."""
    if dtype == "auto":
        return "bfloat16" if on_gpu else "float32"
    return VLLM_DTYPES[dtype]


def iomp_library() -> Optional[str]:
    """The Intel OpenMP library vLLM's CPU build installs beside this interpreter, if there is one."""
    path = Path(sys.prefix) / "lib" / "libiomp5.so"
    return str(path) if path.exists() else None


def cpu_engine_env(num_cpus: float, kv_cache_gib: int) -> Dict[str, str]:
    """Environment of a CPU engine's processes (a runtime_env's env_vars)."""
    env = {
        "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib),
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
        "OMP_NUM_THREADS": str(max(int(num_cpus), 1)),
    }
    preload = iomp_library()
    if preload:
        env["LD_PRELOAD"] = " ".join(filter(None, [os.environ.get("LD_PRELOAD"), preload]))
    return env
