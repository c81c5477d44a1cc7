"""Per-sequence sampling inside transformers' continuous batching: every sequence's next token drawn
with its own parameters, seeded generator and logits processors, and the model's log-probabilities
kept for the response.

transformers' `ContinuousBatchingManager` samples a whole batch one way (one `do_sample`, one global
RNG, temperature/top-k/top-p per request at most) and returns only the chosen token's log-probability,
after processing. `SequenceSampler` is a `ContinuousBatchingLogitsProcessor`, the manager's extension
point for per-request logits work: the manager hands it each step's raw logits, one row per sequence
that gets a token, with a per-request tensor argument that here carries the sequence's slot. The
sampler picks every row's token itself and returns scores where only that token is finite, so the
manager's greedy argmax takes it. Everything it does is guarded per row: an error ends that
sequence's request (`SequenceState.error`), never the batch or the manager's generation thread.
"""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    SequenceBiasLogitsProcessor,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)
from transformers.generation.continuous_batching.cb_logits_processors import (
    ContinuousBatchingLogitsProcessor,
    ContinuousBatchingLogitsProcessorList,
)

# Temperatures below this decode greedily: dividing logits by less can overflow them to inf, and
# sampling that sharp is greedy decoding anyway.
GREEDY_BELOW_TEMPERATURE = 1e-5
# The add_request keyword that carries a sequence's slot to the sampler (a logits-processor kwarg).
SLOT = "sequence_slot"
NO_SLOT = -1


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float  # below GREEDY_BELOW_TEMPERATURE (0, say) is greedy
    top_p: float
    stop: Sequence[str] = ()
    seed: Optional[int] = None  # null draws a fresh seed; torch takes [-2**63, 2**64)
    stop_token_ids: Sequence[int] = ()  # end the sequence like eos (a chat template's end-of-turn token)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    logprobs: Optional[int] = None  # null: none; k: the chosen token's and the k most likely ones'


@dataclass
class TokenLogprob:
    """A token and the model's log-probability of it, with the `top` most likely tokens at that position."""

    token: int
    logprob: Optional[float]  # null for a prompt's first token, which nothing predicts
    top: List[Tuple[int, float]]


class OccurrencePenaltyLogitsProcessor(LogitsProcessor):
    """OpenAI's presence and frequency penalties over the tokens generated so far (`input_ids`):
    logit[t] -= frequency_penalty × count(t) + presence_penalty × (count(t) > 0)."""

    def __init__(self, presence_penalty: float, frequency_penalty: float) -> None:
        self.presence_penalty, self.frequency_penalty = presence_penalty, frequency_penalty

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        counts = torch.zeros_like(scores)
        counts.scatter_add_(1, input_ids, torch.ones_like(input_ids, dtype=scores.dtype))
        return scores - self.frequency_penalty * counts - self.presence_penalty * (counts > 0).to(scores.dtype)


def top_logprobs(logprobs: torch.Tensor, k: int) -> List[Tuple[int, float]]:
    """The k most likely (token, log-probability) pairs of one row of log-probabilities."""
    if k <= 0:
        return []
    values, tokens = torch.topk(logprobs, k)
    return list(zip(tokens.tolist(), values.tolist()))


class SequenceState:
    """One sequence's sampling: processors, seeded generator, the tokens it has drawn and their logprobs."""

    def __init__(self, params: SamplingParams, device: torch.device) -> None:
        self.params = params
        self.greedy = params.temperature < GREEDY_BELOW_TEMPERATURE
        self.processors = LogitsProcessorList()
        if params.logit_bias:
            self.processors.append(SequenceBiasLogitsProcessor([[[t], float(b)] for t, b in params.logit_bias.items()]))
        if params.presence_penalty or params.frequency_penalty:
            self.processors.append(OccurrencePenaltyLogitsProcessor(params.presence_penalty, params.frequency_penalty))
        self.generator: Optional[torch.Generator] = None
        if not self.greedy:
            seed = params.seed if params.seed is not None else random.SystemRandom().randrange(2**63)
            # Raises for a seed torch cannot take: the request fails before it is queued.
            self.generator = torch.Generator(device=device).manual_seed(seed)
            self.processors.append(TemperatureLogitsWarper(float(params.temperature)))
            if params.top_p < 1.0:
                self.processors.append(TopPLogitsWarper(float(params.top_p)))
        self.tokens: List[int] = []
        self.logprobs: List[TokenLogprob] = []
        self.error: Optional[Exception] = None

    @property
    def plain_greedy(self) -> bool:
        """Greedy with nothing to apply first: the batch's argmax is this sequence's token."""
        return self.greedy and not self.processors

    def choose(self, scores: torch.Tensor) -> int:
        """The next token for one row of raw logits ([1, vocab])."""
        history = torch.tensor([self.tokens], dtype=torch.long, device=scores.device)
        scores = self.processors(history, scores)
        if self.greedy:
            return int(scores.argmax(-1))
        probs = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def record(self, token: int, logprobs: torch.Tensor) -> None:
        self.tokens.append(token)
        if self.params.logprobs is not None:
            self.logprobs.append(TokenLogprob(token, float(logprobs[token]), top_logprobs(logprobs, self.params.logprobs)))


class SequenceSampler(ContinuousBatchingLogitsProcessor):
    """The manager's only logits processor: draws each row's token with its sequence's own state."""

    supported_kwargs = {SLOT: int}
    ignored_kwargs = ()

    def __init__(self) -> None:
        self._states: Dict[int, SequenceState] = {}
        self._next_slot = 0
        self._lock = threading.Lock()
        # Forward passes that produced tokens: a count that measures scheduling (the head-of-line test).
        self.steps = 0

    def add(self, state: SequenceState) -> int:
        """Register a sequence; gives the slot to pass to `add_request` as its `SLOT` kwarg."""
        with self._lock:
            slot, self._next_slot = self._next_slot, self._next_slot + 1
        self._states[slot] = state
        return slot

    def remove(self, slot: int) -> None:
        self._states.pop(slot, None)

    # -- the ContinuousBatchingLogitsProcessor interface (called in the manager's generation thread) --

    def fill_defaults(self, int32_tensor: torch.Tensor) -> None:
        int32_tensor.fill_(NO_SLOT)

    def prepare_tensor_args(self, requests_with_new_token: list) -> torch.Tensor:
        slots = [r.state.logit_processor_kwargs.get(SLOT, NO_SLOT) for r in requests_with_new_token]
        return torch.tensor(slots, dtype=torch.int32, device="cpu")

    @torch.no_grad()
    def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
        rows = scores.shape[0]
        if rows == 0:
            return scores
        self.steps += 1  # forward passes that produced tokens
        slots = tensor_arg[:rows].tolist()
        logprobs = torch.log_softmax(scores, dim=-1)
        chosen = scores.argmax(-1).tolist()  # one device sync for every greedy row
        for row, slot in enumerate(slots):
            state = self._states.get(slot)
            if state is None or state.error is not None:  # cancelled, finished or failed: its token is never used
                continue
            try:
                if not state.plain_greedy:
                    chosen[row] = state.choose(scores[row : row + 1])
                state.record(chosen[row], logprobs[row])
            except Exception as exc:  # noqa: BLE001 - only this sequence's request ends; the batch goes on
                state.error = exc
        forced = torch.full_like(scores, float("-inf"))
        forced[torch.arange(rows, device=scores.device), torch.tensor(chosen, device=scores.device)] = 0.0
        return forced


class SamplerList(ContinuousBatchingLogitsProcessorList):
    """The manager's processor list holding only the sampler, with the one per-request tensor it needs."""

    def __init__(self, sampler: SequenceSampler) -> None:
        super().__init__(LogitsProcessorList([sampler]))
        # The base class counts tensors only for the processors it converts itself; the sampler's slot is one.
        self.tensors_required = 1
