"""Ray Serve LLM engine-start hooks (`LLMConfig.callback_config`), loaded by name in each engine replica."""

from __future__ import annotations

import os

from ray.llm._internal.common.callbacks.base import CallbackBase


class LocalFolder(CallbackBase):
    """The engine serves a local folder (framework/hf_folder.py checked it before deployment): no node initialisation.

    Ray Serve LLM otherwise starts, before each engine, a Ray task on every node of the replica's placement group, in
    the engine's runtime environment, that "downloads" the model; for a local path that download returns the path
    unchanged, but the task's new worker process imports torch and transformers first (about 12 s of CPU, and seconds
    of every replica's start). `run_init_node` is Ray's documented switch for skipping it.
    """

    async def on_before_node_init(self) -> None:
        import torch  # loaded already: the replica runs vLLM

        # What the skipped task also did: the folder torch cannot make for its kernel cache when its parent is missing.
        os.makedirs(os.path.join(os.path.dirname(torch.hub.get_dir()), "kernels"), exist_ok=True)
        self.ctx.run_init_node = False
