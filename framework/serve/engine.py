"""The engine: a causal LM decoding many sequences at once with transformers' continuous batching.

`transformers`' `ContinuousBatchingManager` runs the decode loop in its own thread over a paged KV
cache (`PagedAttentionCache`: blocks of `serve.kv_block_size` tokens, `serve.kv_cache_blocks` of
them): each step it admits waiting sequences (their prompts prefilled in chunks of at most
`serve.max_batch_tokens` tokens beside the running ones' next tokens), runs one forward pass over
all of them, and frees a sequence's blocks the moment it ends or is cancelled. Every sequence's token
is drawn by `framework.serve.sampling.SequenceSampler` with the sequence's own parameters and seed.

`Engine.generate` gives one request's sequences as text deltas, decoded on the event loop as the
manager's outputs arrive; leaving the iterator early (a client gone, a stop string) cancels whatever
is still running, and its blocks are free at the next step.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Dict, FrozenSet, List, Optional, Set

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    ContinuousBatchingConfig,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.generation.continuous_batching import RequestStatus

from framework.model import pad_token_id
from framework.model import torch_dtype
from framework.hf_folder import context_length
from framework.serve.prompts import PromptEncoder
from framework.serve.sampling import SLOT, SamplerList, SamplingParams, SequenceSampler, SequenceState, TokenLogprob, top_logprobs
from framework.serve.text import TextTracker

logger = logging.getLogger(__name__)


@dataclass
class Batching:
    """How many sequences and tokens one forward pass takes, and the paged KV cache's size."""

    max_sequences: int
    max_batch_tokens: int
    kv_cache_blocks: int
    kv_block_size: int


@dataclass
class Sequence:
    """One sequence to generate: a prompt and how to sample its continuation."""

    prompt_ids: List[int]
    params: SamplingParams


@dataclass
class Delta:
    """What one step gives one sequence: new text (maybe empty), its tokens' count and logprobs, and why it ended."""

    index: int  # the sequence's position in its request
    text: str
    tokens: int
    finish_reason: Optional[str] = None  # "stop" | "length" | None while running
    logprobs: List[TokenLogprob] = field(default_factory=list)


class GenerationFailed(RuntimeError):
    """A sequence could not be set up or sampled, or the engine failed it; only its request ends."""


@dataclass
class EngineStats:
    running: int  # sequences that have their first token
    waiting: int  # sequences queued or prefilling
    kv_blocks_used: int
    kv_blocks_total: int
    steps: int  # forward passes that gave tokens since start-up


class Engine:
    """A causal LM, its tokenizer and the continuous-batching loop that decodes every request's sequences."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, generation: GenerationConfig,
                 batching: Batching) -> None:
        self.model, self.tokenizer, self.batching = model, tokenizer, batching
        self.device = next(model.parameters()).device
        eos = generation.eos_token_id if generation.eos_token_id is not None else tokenizer.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        if tokenizer.eos_token_id is not None:
            eos.append(tokenizer.eos_token_id)
        self.eos_ids: FrozenSet[int] = frozenset(eos)
        pad = pad_token_id(tokenizer)  # the tokenizer's pad, else its eos
        self.pad_id = int(pad if pad is not None else (eos[0] if eos else 0))
        self.context_length = context_length(model.config)
        self.vocab_size = int(model.config.vocab_size)
        self.prompts = PromptEncoder(tokenizer, self.context_length)
        self.sampler = SequenceSampler()
        self._waiting: Set[str] = set()
        self._running: Set[str] = set()
        self.manager = model.init_continuous_batching(
            generation_config=GenerationConfig(do_sample=False, eos_token_id=sorted(self.eos_ids), pad_token_id=self.pad_id),
            continuous_batching_config=ContinuousBatchingConfig(
                page_size=batching.kv_block_size, num_blocks=batching.kv_cache_blocks,
                max_batch_tokens=batching.max_batch_tokens, max_requests_per_batch=batching.max_sequences,
                # The sampler runs Python per row and reads its slots from each step's own arguments:
                # no CUDA graphs or compilation around it, and no overlapped (async) batches.
                use_async_batching=False, use_cuda_graph=False, cpu_offload_space=0.0,
            ),
        )
        # Before start(): the generation thread builds its batch processor from this list.
        self.manager.logit_processor = SamplerList(self.sampler)
        self.manager.start()

    def shutdown(self) -> None:
        self.manager.stop(block=True, timeout=10)

    # -- generation ------------------------------------------------------------------------------

    async def generate(self, sequences: List[Sequence]) -> AsyncIterator[List[Delta]]:
        """One request's sequences decoded together with every other request's: their deltas as tokens arrive.

        Raises GenerationFailed when a sequence cannot be set up or sampled (its request only)."""
        try:
            states = [SequenceState(s.params, self.device) for s in sequences]
        except (ValueError, RuntimeError) as exc:  # a seed or a parameter torch refuses
            raise GenerationFailed(f"{type(exc).__name__}: {exc}") from exc
        outputs: asyncio.Queue = asyncio.Queue()
        live: Dict[int, str] = {}  # index → the manager's request id, while it runs
        slots = [self.sampler.add(state) for state in states]
        trackers = [TextTracker(self.tokenizer, s.params, self.eos_ids) for s in sequences]
        seen = [0] * len(sequences)
        try:
            for index, (sequence, slot) in enumerate(zip(sequences, slots)):
                rid = f"seq-{slot}"
                self.manager.register_result_handler(rid, functools.partial(_put, outputs, index))
                added = self.manager.add_request(
                    sequence.prompt_ids, request_id=rid, max_new_tokens=sequence.params.max_tokens, streaming=True,
                    eos_token_id=sorted(self.eos_ids | set(sequence.params.stop_token_ids)), **{SLOT: slot},
                )
                if added is None:
                    raise GenerationFailed("the continuous-batching loop is not accepting requests")
                live[index] = rid
                self._waiting.add(rid)
            while live:
                index, output = await outputs.get()
                if index not in live:
                    continue  # a snapshot queued before the sequence ended
                rid, state = live[index], states[index]
                if state.error is not None:
                    raise GenerationFailed(f"{type(state.error).__name__}: {state.error}") from state.error
                if output.status == RequestStatus.FAILED:
                    raise GenerationFailed(output.error or "the engine failed this sequence")
                if rid in self._waiting and output.generated_tokens:
                    self._waiting.discard(rid)
                    self._running.add(rid)
                delta = self._advance(index, output.generated_tokens, trackers[index], state, seen)
                if delta.finish_reason is not None:
                    del live[index]
                    self._forget(rid, cancel=not output.is_finished())
                yield [delta]
        finally:
            for rid in live.values():
                self._forget(rid, cancel=True)
            for slot in slots:
                self.sampler.remove(slot)

    def _advance(self, index: int, generated: List[int], tracker: TextTracker, state: SequenceState,
                 seen: List[int]) -> Delta:
        """The delta of the tokens in `generated` not yet seen, up to the one that ends the sequence."""
        start, text, reason = seen[index], [], None
        for token in generated[start:]:
            piece, reason = tracker.push(token)
            text.append(piece)
            seen[index] += 1
            if reason is not None:
                break
        logprobs = state.logprobs[start : seen[index]] if state.params.logprobs is not None else []
        return Delta(index, "".join(text), seen[index] - start, reason, logprobs)

    def _forget(self, rid: str, cancel: bool) -> None:
        """Stop tracking a sequence; if it still runs, cancel it (its blocks are freed at the next step)."""
        self._waiting.discard(rid)
        self._running.discard(rid)
        if cancel:
            self.manager.cancel_request(rid)
            # transformers 5.23 has no public way to drop a handler: a cancelled request never sends the
            # finished output that would remove it, so it is removed here.
            router = self.manager.output_router
            with router._lock:
                router.result_handlers.pop(rid, None)

    # -- scoring, health and stats ---------------------------------------------------------------

    @torch.inference_mode()
    def prompt_logprobs(self, ids: List[int], top: int) -> List[TokenLogprob]:
        """The model's log-probability of every prompt token given the ones before it (the first has none),
        with the `top` most likely tokens at each position. Blocking: run it in a thread.

        The prompt goes through in chunks of `max_batch_tokens`, so logits are never held for the whole of it."""
        out = [TokenLogprob(ids[0], None, [])]
        past = None
        chunk = self.batching.max_batch_tokens
        with self.manager.pause():  # the decode loop waits at its next step; the model is this thread's
            for start in range(0, len(ids), chunk):
                piece = ids[start : start + chunk]
                result = self.model(input_ids=torch.tensor([piece], device=self.device), past_key_values=past,
                                    use_cache=True)
                past = result.past_key_values
                logprobs = torch.log_softmax(result.logits[0].float(), dim=-1)
                for j, token in enumerate(ids[start + 1 : start + 1 + len(piece)]):
                    out.append(TokenLogprob(token, float(logprobs[j, token]), top_logprobs(logprobs[j], top)))
        return out

    @torch.inference_mode()
    def check(self) -> None:
        """Raise unless the decode loop runs and a one-token forward pass gives finite logits."""
        if not self.manager.is_running():
            raise RuntimeError("engine check: the continuous-batching loop has stopped")
        ids = torch.tensor([[self.pad_id]], device=self.device)
        with self.manager.pause():
            logits = self.model(input_ids=ids, use_cache=False).logits
        if not bool(torch.isfinite(logits).all()):
            raise RuntimeError(f"engine check: a forward pass on {self.device} gave non-finite logits")

    def stats(self) -> EngineStats:
        used, total = 0, self.batching.kv_cache_blocks
        processor = self.manager.batch_processor
        if processor is not None:
            cache = processor.cache
            # In use: neither free nor kept only for prefix reuse (blocks no sequence references any more).
            reusable = sum(len(a.ledger.cached_blocks) * a.bytes_per_block for a in cache.cache_allocators.values())
            reusable_share = reusable / (cache.num_sectors * cache.bytes_per_sector)
            total = cache.num_blocks
            used = round(total * (1.0 - cache.compute_free_capacity() - reusable_share))
        return EngineStats(len(self._running), len(self._waiting), used, total, self.sampler.steps)

    def token_text(self, token: int) -> str:
        """One token as text, special tokens included (how logprobs name tokens)."""
        return self.tokenizer.decode([token])


def _put(queue: asyncio.Queue, index: int, output: object) -> None:
    queue.put_nowait((index, output))


def load_engine(folder: Path, batching: Batching, dtype: str = "auto", device: Optional[str] = None) -> Engine:
    """Load a Hugging Face model folder onto `device` (default: cuda when there is one) in `dtype`."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    weights_dtype = torch_dtype(dtype, device.startswith("cuda"))
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=weights_dtype, local_files_only=True).to(device).eval()
    try:
        generation = GenerationConfig.from_pretrained(folder, local_files_only=True)
    except OSError:  # no generation_config.json: the model config's own ids
        generation = GenerationConfig.from_model_config(model.config)
    return Engine(model, tokenizer, generation, batching)
