"""Prompts as token ids: completion text, chats laid out by the tokenizer's template (message content
always tokenised as text), and the character bound that refuses an over-long prompt before any tokenising.

Chat content is user data, not markup: a message that says `<|im_start|>system` must not open a
system turn. The template is rendered with a placeholder for each message's content; the template's
own text is tokenised with its control tokens, and each content by the tokenizer's model alone, with none of its
added tokens (`split_special_tokens=True` would still match added tokens not marked special).
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any, Dict, List, Optional, Tuple

from transformers import PreTrainedTokenizerBase
from transformers.convert_slow_tokenizer import bytes_to_unicode

# Without a chat template, messages are laid out as "role: content" lines and the model continues
# after "assistant:"; it stops where it would start the next user or system turn.
FALLBACK_ROLE_FORMAT = "{role}: {content}\n"
FALLBACK_GENERATION_PROMPT = "assistant:"
FALLBACK_STOPS = ("\nuser:", "\nsystem:")
# GPT-2's byte-level alphabet: each of the 256 bytes as the printable character a byte-level BPE writes it as.
_UNICODE_TO_BYTE = {v: k for k, v in bytes_to_unicode().items()}
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")
# Placeholders for message contents while the template renders: private-use characters no text carries.
_PLACEHOLDER = "\ue000{}\ue001"


class ControlTokenInContent(ValueError):
    """A message's content holds a control token's text and this model's template cannot keep it as text."""

    def __init__(self, index: int, token: str) -> None:
        super().__init__(f"messages[{index}].content contains the control token {token!r}, which this model's chat "
                         f"template cannot keep as plain text")
        self.index = index


class PromptEncoder:
    """A tokenizer's view of prompts, and the longest text that can still fit `context_length` tokens."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, context_length: int) -> None:
        self.tokenizer = tokenizer
        # Every token decodes to at most `longest` characters, so a text with more than context × longest
        # characters has more tokens than the context holds: refused without tokenising it.
        longest = max(len(piece) for piece in tokenizer.batch_decode([[i] for i in range(len(tokenizer))]))
        self.max_chars = context_length * max(longest, 1)

    def token_text(self, token: int) -> str:
        """One token's text as it decodes alone (a partial UTF-8 character decodes to U+FFFD)."""
        return self.tokenizer.decode([token])

    def token_bytes(self, token: int) -> bytes:
        """One token's own bytes: a byte-level BPE token's bytes, a byte-fallback token's byte (<0xE2>), else its
        text's UTF-8 (a SentencePiece ▁ as the space it stands for)."""
        piece = self.tokenizer.convert_ids_to_tokens(token)
        if piece is None:
            return b""
        byte = _BYTE_FALLBACK.fullmatch(piece)
        if byte:
            return bytes([int(byte.group(1), 16)])
        if self._byte_level and all(c in _UNICODE_TO_BYTE for c in piece):
            return bytes(_UNICODE_TO_BYTE[c] for c in piece)
        return piece.replace("\u2581", " ").encode("utf-8")

    @functools.cached_property
    def _byte_level(self) -> bool:
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        return backend is not None and type(backend.decoder).__name__ == "ByteLevel"

    def encode(self, text: str) -> List[int]:
        """Token ids of a completion prompt, with the special tokens the tokenizer adds (BOS, say)."""
        return self.tokenizer(text)["input_ids"]

    def chat(self, messages: List[Dict[str, str]]) -> Tuple[List[int], Tuple[str, ...], Tuple[int, ...]]:
        """Token ids of a chat, laid out by the tokenizer's chat template, or by the documented fallback.

        Also gives what ends the assistant's turn in that layout: stop strings (the fallback's next-turn
        markers) and stop token ids (the template's end-of-turn token, e.g. ChatML's <|im_end|>).
        Raises jinja2's TemplateError when the template refuses the messages, ControlTokenInContent when
        content holds a control token the template does not render verbatim.
        """
        if not self.tokenizer.chat_template:
            text = "".join(FALLBACK_ROLE_FORMAT.format(**m) for m in messages) + FALLBACK_GENERATION_PROMPT
            return self._tokens(text, as_text=True), FALLBACK_STOPS, ()
        return self._templated(messages), (), self.turn_end_ids

    def _templated(self, messages: List[Dict[str, str]]) -> List[int]:
        placeholders = [_PLACEHOLDER.format(i) for i in range(len(messages))]
        rendered = self._render([{**m, "content": p} for m, p in zip(messages, placeholders)])
        pieces = _split_on(rendered, placeholders)
        if pieces is None:  # the template rewrites content: render it as it is, if that injects nothing
            for index, message in enumerate(messages):
                token = self._control_token_in(message["content"])
                if token is not None:
                    raise ControlTokenInContent(index, token)
            return self._tokens(self._render(messages))
        ids: List[int] = []
        for i, template_text in enumerate(pieces):
            ids += self._tokens(template_text)
            if i < len(messages):
                ids += self._tokens(messages[i]["content"], as_text=True)
        return ids

    def _render(self, messages: List[Dict[str, str]]) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def _tokens(self, text: str, as_text: bool = False) -> List[int]:
        if not text:
            return []
        if as_text and self._text_only is not None:
            return self._text_only.encode(text, add_special_tokens=False).ids
        return self.tokenizer(text, add_special_tokens=False, split_special_tokens=as_text)["input_ids"]

    @functools.cached_property
    def _text_only(self) -> Optional[Any]:
        """The fast tokenizer without its added tokens (special or not): text through it never becomes a control token."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None:
            return None
        from tokenizers import Tokenizer

        spec = json.loads(backend.to_str())
        spec["added_tokens"] = []
        return Tokenizer.from_str(json.dumps(spec))

    def _control_token_in(self, content: str) -> Optional[str]:
        return next((t for t in self.tokenizer.get_added_vocab() if t in content), None)

    @functools.cached_property
    def turn_end_ids(self) -> Tuple[int, ...]:
        """The added token the template writes right after an assistant message, if there is one."""
        probe = "\x00probe\x00"
        try:
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": "a"}, {"role": "assistant", "content": probe}], tokenize=False
            )
        except Exception:  # noqa: BLE001 - a template that insists on other roles: no end-of-turn token known
            return ()
        tail = text.split(probe, 1)[-1] if probe in text else ""
        ids = self._tokens(tail)
        added = set(self.tokenizer.get_added_vocab().values())
        return (ids[0],) if ids and ids[0] in added else ()


def _split_on(text: str, placeholders: List[str]) -> Optional[List[str]]:
    """`text` cut at each placeholder, in order (len(placeholders) + 1 pieces); None unless each occurs once, in order."""
    pieces, rest = [], text
    for placeholder in placeholders:
        if text.count(placeholder) != 1 or placeholder not in rest:
            return None
        before, rest = rest.split(placeholder, 1)
        pieces.append(before)
    return pieces + [rest]
