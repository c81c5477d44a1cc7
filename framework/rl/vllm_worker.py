"""Runs inside each vLLM worker process of a rollout engine (vLLM's `worker_extension_cls`): the weight sync.

`sync_weights(folder)` reloads every weight from a Hugging Face safetensors folder with vLLM's layerwise reload
(which re-packs the CPU kernels' copies of the linear layers' weights), then sets the vocabulary embeddings itself:
the reload leaves a tied input/output embedding as it was (vllm/model_executor/model_loader/reload/__init__.py,
limitation 2; measured here: a tiny Llama with tied embeddings kept its old output layer, whose CPU kernel holds a
packed copy of the weights), so each vocabulary embedding (the input embedding, and the output layer, tied or not) is
copied from the folder and its kernel rebuilt (`process_weights_after_loading`).
"""

from __future__ import annotations

import glob
import os
from typing import Any, Dict


class WeightSync:
    """Mixed into vLLM's worker class; its method names must not clash with the worker's."""

    model_runner: Any  # the worker's

    def sync_weights(self, folder: str) -> int:
        """Load `folder`'s weights; gives how many embedding modules were set after the reload."""
        from safetensors import safe_open
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

        with set_current_vllm_config(self.vllm_config):  # type: ignore[attr-defined]
            self.model_runner.reload_weights(weights_path=folder)
        model = self.model_runner.get_model()
        files: Dict[str, str] = {}
        for path in glob.glob(os.path.join(folder, "*.safetensors")):
            with safe_open(path, framework="pt") as f:
                files.update({name: path for name in f.keys()})
        done, seen, source = 0, set(), None
        for name, module in model.named_modules():
            if not isinstance(module, VocabParallelEmbedding) or id(module) in seen:
                continue
            seen.add(id(module))
            key = name.replace(".base_layer", "") + ".weight"
            if key not in files:
                # A tied output layer (lm_head): the input embedding's weights, with its own output kernel.
                key = source
                if key is None:
                    raise ValueError(f"{folder} has no weights for {name}")
            source = source or key
            with safe_open(files[key], framework="pt") as f:
                weight = f.get_tensor(key)
            # vLLM may pad the vocabulary to a multiple of its tile: the rows the folder has.
            module.weight.data[: weight.shape[0]].copy_(weight)
            module.quant_method.process_weights_after_loading(module)
            done += 1
        return done
