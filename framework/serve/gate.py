"""A gate that lets requests into the engine together, or one alone.

vLLM 0.29's CPU LoRA kernels apply the adapters to the logits of a prompt's tokens with the batch's per-request
mapping (`PunicaWrapperCPU.add_lora_logits` indexes by `sampler_indices`): a request that scores its prompt
(`echo` with `logprobs`: the engine's prompt_logprobs) sharing a batch with another request makes the engine core
raise (an einsum whose batch sizes differ), and a dead engine fails every request until Serve replaces it. (vLLM's
GPU kernels map prompt tokens on their own: upstream vllm-project/vllm#16668, #29955.) So on a CPU server with
adapters the engine replica runs such a request alone: it waits for the requests in flight, and holds new ones until it is
done. lm-evaluation-harness's loglikelihood requests are of this kind; against such a server they run one at a time.
"""

from __future__ import annotations

import asyncio


class ExclusiveGate:
    """Shared entry for ordinary requests, exclusive for the others; an exclusive request waiting goes first."""

    def __init__(self) -> None:
        self._changed = asyncio.Condition()
        self._shared = 0
        self._exclusive = False
        self._waiting = 0

    async def enter(self, exclusive: bool) -> None:
        async with self._changed:
            if exclusive:
                self._waiting += 1
                try:
                    await self._changed.wait_for(lambda: not self._exclusive and self._shared == 0)
                finally:
                    self._waiting -= 1
                self._exclusive = True
            else:
                await self._changed.wait_for(lambda: not self._exclusive and self._waiting == 0)
                self._shared += 1

    async def leave(self, exclusive: bool) -> None:
        async with self._changed:
            if exclusive:
                self._exclusive = False
            else:
                self._shared -= 1
            self._changed.notify_all()
