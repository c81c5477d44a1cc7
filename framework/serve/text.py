"""A sequence's tokens as text deltas: incremental decoding that holds back what might still become a stop string."""

from __future__ import annotations

from typing import FrozenSet, List, Optional, Tuple

from transformers import PreTrainedTokenizerBase

from framework.serve.sampling import SamplingParams


class TextTracker:
    """Turns a sequence's tokens into text deltas and says when and why the sequence ends."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, params: SamplingParams, eos_ids: FrozenSet[int]) -> None:
        self.tokenizer, self.params = tokenizer, params
        self.eos_ids = eos_ids | frozenset(params.stop_token_ids)
        self.ids: List[int] = []
        self.count = 0
        self.emitted = 0  # characters of the decoded text already sent

    def push(self, token: int) -> Tuple[str, Optional[str]]:
        """Add one sampled token; give the text now safe to send and the finish reason, if any."""
        self.count += 1
        if token in self.eos_ids:
            return self._rest(self._text()), "stop"
        self.ids.append(token)
        # Decoding the whole continuation (not token by token) keeps multi-byte characters and merges right.
        text = self._text()
        hits = [i for i in (text.find(s) for s in self.params.stop) if i >= 0]
        if hits:
            return self._rest(text[: min(hits)]), "stop"
        if self.count >= self.params.max_tokens:
            return self._rest(text), "length"
        safe = len(text) - self._held_back(text)
        delta = text[self.emitted : safe] if safe > self.emitted else ""
        self.emitted = max(self.emitted, safe)
        return delta, None

    def _text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def _rest(self, text: str) -> str:
        delta = text[self.emitted :]
        self.emitted = len(text)
        return delta

    def _held_back(self, text: str) -> int:
        """Characters at the end of `text` not yet safe: a partial UTF-8 character, or a stop string's prefix."""
        held = len(text) - len(text.rstrip("\ufffd"))
        for stop in self.params.stop:
            for k in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:k]):
                    held = max(held, k)
                    break
        return held
