"""The policy's weights as the files of a Hugging Face folder, for the rollout engine (framework/rl/rollout.py).

Every weight (a full fine-tune: config.json and model.safetensors, as `save_pretrained` writes them) or the adapters
alone (LoRA: peft's adapter_config.json and adapter_model.safetensors). Under ZeRO-3 each worker holds a slice of every
weight: all workers gather them together (a collective), and rank 0 writes the folder. The files travel to the engine
through Ray's object store (`RolloutEngine.load_weight_files`), so the two need share no file system or node.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Any, Dict, Optional


def policy_files(engine: Any, lora: bool, rank: int) -> Optional[Dict[str, bytes]]:
    """The policy as folder files (name → content) on rank 0, None elsewhere; every rank must call it (ZeRO-3 gathers)."""
    import deepspeed

    module = engine.module
    zero3 = engine.zero_optimization_stage() == 3
    params = [p for p in module.parameters() if p.requires_grad or not lora]
    gathered = deepspeed.zero.GatheredParameters(params, modifier_rank=None) if zero3 else contextlib.nullcontext()
    with gathered:
        if rank != 0:
            return None
        with tempfile.TemporaryDirectory(prefix="policy-") as folder:
            module.save_pretrained(folder)  # peft writes the adapters alone; transformers the whole model
            files = {}
            for root, _, names in os.walk(folder):
                for name in names:
                    path = os.path.join(root, name)
                    with open(path, "rb") as f:
                        files[os.path.relpath(path, folder)] = f.read()
            return files
