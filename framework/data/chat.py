"""Conversations → token ids and loss masks, rendered with a chat template.

A record is a conversation in the OpenAI shape (`{"messages": [{"role": ..., "content": ...}, ...]}`, roles
system, user, assistant and tool; `data.sources.N.field` names the key) or a prompt/completion pair (a user turn
and the assistant's answer; `prompt` and `completion` name the keys). It is rendered with the tokenizer's chat
template, or `data.chat_template`, in three steps:

1. the template is rendered with every message's content replaced by a sentinel, and the text is split at the
   sentinels: what lies between them is the template's own text (`<|im_start|>assistant\\n`, ...);
2. the template's pieces are tokenised as usual, so its special tokens are real control tokens, and every
   message's content as text with `split_special_tokens=True`, so a user who types `<|im_start|>system` gets
   those characters, never the control token;
3. targets (the loss mask) are the assistant's contents and the end-of-turn token that closes each (the first
   special token of the template piece after it, past whitespace: ChatML's `<|im_end|>`, Llama 3's
   `<|eot_id|>`); with `data.train_on_prompt=true` every token; with `data.assistant_turns=last` the last
   assistant turn alone.

The text is also rendered with the real contents, and the two must agree (contents trimmed, when the template
trims them as Llama 3's does): a template that changes message text otherwise cannot have its tokens
attributed to turns. Tool calls that a template renders from `tool_calls` are template text, not targets.

A preference record (`data.sources.N.format=preference`, TRL's two shapes: `prompt`, `chosen` and `rejected` as
text, or `prompt` a list of messages and `chosen`/`rejected` lists of assistant messages; the keys renamable) is a
`Pair`: both conversations, prompt + chosen and prompt + rejected, are rendered as above with targets on the
response's turns alone (never the prompt's, whatever it holds), and a pair is kept only whole (`render_pairs`).

A record that is not a usable conversation is a `BadRecord` with one of BAD_REASONS; prep counts them per
reason in the manifest and its progress line, with the first example's place, and never drops one silently.
A conversation longer than `data.seq_len` is dropped (`data.overlong=drop`, the default: nothing is trained on
a cut answer) or cut after its last whole assistant turn that fits (`truncate`, counted as truncated);
one whose first assistant turn does not fit is `too_long` either way.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np

from framework.config import ConfigError
from framework.data.config import DataConfig

ROLES = ("system", "user", "assistant", "tool")
BAD_REASONS = {
    "malformed": "not a JSON object, or messages that are not a list of {role, content} objects with text content",
    "missing_field": "no messages (data.sources.N.field), prompt/completion key (data.sources.N.prompt, .completion) "
                     "or chosen/rejected key (data.sources.N.chosen, .rejected)",
    "unknown_role": f"a message role other than {', '.join(ROLES)}",
    "no_assistant": "no assistant turn to train on",
    "template_refused": "the chat template raised an error for it (roles that do not alternate, say)",
    "template_mismatch": "the chat template drops, repeats or rewrites message text, so its tokens cannot be attributed to turns",
    "too_long": "longer than data.seq_len (data.overlong=drop), or its first assistant turn does not fit (truncate); "
                "a preference pair: its two conversations together longer than data.seq_len",
    "identical_pair": "a preference pair whose chosen and rejected responses are the same (nothing to prefer)",
}
# Private-use characters: no template writes them, none trims or escapes them.
_SENTINEL = "\ue000{}\ue001"
_SENTINELS = re.compile("\ue000(\\d+)\ue001")


class BadRecord(Exception):
    """A record that is not a usable conversation: `reason` (a key of BAD_REASONS) and where and why."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail

    def __reduce__(self) -> Any:  # travels back from Ray tasks
        return BadRecord, (self.reason, self.detail)


def _text(content: Any, where: str) -> str:
    """A message's content as text: a string, null (an assistant turn that only calls tools), or OpenAI text parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise BadRecord("malformed", f"{where}: content is neither text, null nor a list of text parts")


def conversation(record: Any, source: Any) -> List[Dict[str, Any]]:
    """The messages of one record of a chat or prompt_completion `source` (a SourceFile); raises BadRecord."""
    if not isinstance(record, dict):
        raise BadRecord("malformed", "not a JSON object")
    if source.format == "prompt_completion":
        for key in (source.prompt, source.completion):
            if key not in record:
                raise BadRecord("missing_field", f"no {key!r} key")
            if not isinstance(record[key], str):
                raise BadRecord("malformed", f"{key!r} is not text")
        return [{"role": "user", "content": record[source.prompt]}, {"role": "assistant", "content": record[source.completion]}]
    if source.field not in record:
        raise BadRecord("missing_field", f"no {source.field!r} key")
    messages = checked_messages(record[source.field], source.field)
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRecord("no_assistant", "no assistant message")
    return messages


def checked_messages(raw: Any, key: str) -> List[Dict[str, Any]]:
    """The messages under `key` of a record, checked: a non-empty list of {role, content} with known roles and text."""
    if not isinstance(raw, list) or not raw:
        raise BadRecord("malformed", f"{key!r} is not a non-empty list of messages")
    messages = []
    for i, message in enumerate(raw):
        where = f"{key!r} message {i}" if key else f"message {i}"
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise BadRecord("malformed", f"{where} is not an object with a role")
        if message["role"] not in ROLES:
            raise BadRecord("unknown_role", f"{where} has role {message['role']!r}")
        # Other keys (name, tool_calls, tool_call_id) go to the template as they are.
        messages.append({**message, "content": _text(message.get("content"), where)})
    return messages


@dataclass
class Pair:
    """A preference record: the prompt's messages, and the chosen and the rejected response's (assistant) messages."""

    prompt: List[Dict[str, Any]]
    chosen: List[Dict[str, Any]]
    rejected: List[Dict[str, Any]]


def preference_pair(record: Any, source: Any) -> Pair:
    """The Pair of one record of a preference `source` (TRL's plain or conversational shape); raises BadRecord."""
    if not isinstance(record, dict):
        raise BadRecord("malformed", "not a JSON object")
    for key in (source.prompt, source.chosen, source.rejected):
        if key not in record:
            raise BadRecord("missing_field", f"no {key!r} key")
    prompt = record[source.prompt]
    prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else checked_messages(prompt, source.prompt)
    responses = []
    for key in (source.chosen, source.rejected):
        raw = record[key]
        messages = [{"role": "assistant", "content": raw}] if isinstance(raw, str) else checked_messages(raw, key)
        if not any(m["role"] == "assistant" for m in messages):
            raise BadRecord("no_assistant", f"{key!r} holds no assistant message")
        responses.append(messages)
    if responses[0] == responses[1]:
        raise BadRecord("identical_pair", f"{source.chosen!r} and {source.rejected!r} are the same response")
    return Pair(prompt, *responses)


def conversation_text(messages: Union[Sequence[Dict[str, Any]], Pair]) -> str:
    """What a conversation (or a preference pair) is known by (its split, duplicates): its messages as canonical JSON,
    whatever the template."""
    if isinstance(messages, Pair):
        return json.dumps(vars(messages), sort_keys=True, ensure_ascii=False)
    return json.dumps(list(messages), sort_keys=True, ensure_ascii=False)


def conversation_contents(messages: Union[Sequence[Dict[str, Any]], Pair]) -> str:
    """The text of a conversation's messages (a pair's: all three parts), for training a tokenizer on chat sources."""
    if isinstance(messages, Pair):
        messages = messages.prompt + messages.chosen + messages.rejected
    return "\n".join(m["content"] for m in messages)


@dataclass
class Rendered:
    """One conversation as tokens: ids, the loss mask (1: a target), and whether it was cut to fit."""

    ids: np.ndarray
    mask: np.ndarray
    truncated: bool
    second: Optional[int] = None  # a preference pair: where its rejected conversation starts


def chat_template(tokenizer: Any, data: DataConfig) -> str:
    """The template chat sources are rendered with: data.chat_template, else the tokenizer's; one line when neither exists."""
    template = data.chat_template or getattr(tokenizer, "chat_template", None)
    if not template:
        raise ConfigError(
            f"data.chat_template=null: the tokenizer (data.tokenizer.path={data.tokenizer.path}) has no chat template; "
            "set data.chat_template to a Jinja template (ChatML: see framework/data/tokenizer.py: CHAT_TEMPLATE)"
        )
    if isinstance(template, dict):  # a tokenizer with several named templates
        template = template.get("default") or next(iter(template.values()))
    return template


class ChatRenderer:
    """Renders conversations into (ids, loss mask) with one tokenizer and template, following the `data` settings."""

    def __init__(self, tokenizer: Any, data: DataConfig) -> None:
        self.tokenizer, self.template = tokenizer, chat_template(tokenizer, data)
        self.seq_len, self.train_on_prompt = data.seq_len, bool(data.train_on_prompt)
        self.last_only, self.truncate = data.assistant_turns == "last", data.overlong == "truncate"
        self.special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
        self._blank: Dict[int, bool] = {}

    def _apply(self, messages: Sequence[Dict[str, Any]], generation: bool = False) -> str:
        return self.tokenizer.apply_chat_template(list(messages), chat_template=self.template, tokenize=False,
                                                  add_generation_prompt=generation)

    def _split(self, messages: List[Dict[str, Any]], generation: bool = False) -> tuple:
        """(template pieces, the contents between them in order as message indices, the contents' text); with
        `generation`, the last piece ends with the template's generation prompt (the assistant's turn opening)."""
        try:
            text = self._apply([{**m, "content": _SENTINEL.format(i)} for i, m in enumerate(messages)], generation)
            real = self._apply(messages, generation)
        except Exception as exc:  # noqa: BLE001 - a template's raise_exception or any fault of its own, per record
            raise BadRecord("template_refused", str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None
        parts = _SENTINELS.split(text)
        pieces, order = parts[0::2], [int(i) for i in parts[1::2]]
        if sorted(order) != list(range(len(messages))):
            raise BadRecord("template_mismatch", f"the template rendered message contents {order} of {len(messages)} messages")
        for contents in ([m["content"] for m in messages], [m["content"].strip() for m in messages]):
            assembled = pieces[0] + "".join(contents[i] + piece for i, piece in zip(order, pieces[1:]))
            if assembled == real:
                return pieces, order, contents
        raise BadRecord("template_mismatch", "the template changes message text beyond trimming it")

    def _is_blank(self, token: int) -> bool:
        if token not in self._blank:
            self._blank[token] = not self.tokenizer.decode([token]).strip()
        return self._blank[token]

    def _end_of_turn(self, ids: List[int]) -> int:
        """How many of a template piece's first tokens close the turn before it: blanks up to a special token, inclusive."""
        for n, token in enumerate(ids):
            if token in self.special:
                return n + 1
            if not self._is_blank(token):
                return 0
        return 0

    def render_pairs(self, pairs: Sequence[Pair]) -> List[Union[Rendered, BadRecord]]:
        """Each preference pair as one document: prompt + chosen, then prompt + rejected, rendered as conversations with
        targets on the response's turns alone; `mask` is 1 on the chosen response's targets, 2 on the rejected's, and
        `second` where the rejected conversation starts (its own segment). A pair longer than a row is `too_long`."""
        conversations = [c for p in pairs for c in (p.prompt + p.chosen, p.prompt + p.rejected)]
        rendered = self.render(conversations, [len(p.prompt) for p in pairs for _ in range(2)])
        out: List[Union[Rendered, BadRecord]] = []
        for chosen, rejected in zip(rendered[0::2], rendered[1::2]):
            bad = next((r for r in (chosen, rejected) if isinstance(r, BadRecord)), None)
            if bad is None and len(chosen.ids) + len(rejected.ids) > self.seq_len:
                bad = BadRecord("too_long", f"chosen + rejected: {len(chosen.ids)} + {len(rejected.ids)} tokens, data.seq_len={self.seq_len}")
            if bad is not None:
                out.append(bad)
                continue
            ids = np.concatenate([chosen.ids, rejected.ids])
            mask = np.concatenate([chosen.mask, rejected.mask * 2]).astype(np.uint8)
            out.append(Rendered(ids, mask, False, second=len(chosen.ids)))
        return out

    def render(self, conversations: Sequence[List[Dict[str, Any]]], targets_from: Optional[Sequence[int]] = None) -> List[Union[Rendered, BadRecord]]:
        """Each conversation rendered (its ids and loss mask), or the BadRecord saying why it cannot be; with
        `targets_from`, the assistant turns before that message of each conversation are not targets."""
        split: List[Union[tuple, BadRecord]] = []
        for messages in conversations:
            try:
                split.append(self._split(messages))
            except BadRecord as bad:
                split.append(bad)
        good = [s for s in split if not isinstance(s, BadRecord)]
        # Two batched calls for speed: the template's pieces with special tokens, the contents as plain text.
        pieces = self._tokenize([p for s in good for p in s[0]], split_special=False)
        contents = self._tokenize([c for s in good for c in s[2]], split_special=True)
        out: List[Union[Rendered, BadRecord]] = []
        p = c = 0
        for n, (s, messages) in enumerate(zip(split, conversations)):
            if isinstance(s, BadRecord):
                out.append(s)
                continue
            mine, texts = pieces[p : p + len(s[0])], contents[c : c + len(s[2])]
            p, c = p + len(s[0]), c + len(s[2])
            try:
                out.append(self._assemble(messages, mine, s[1], texts, targets_from[n] if targets_from else 0))
            except BadRecord as bad:
                out.append(bad)
        return out

    def render_prompt(self, messages: List[Dict[str, Any]]) -> np.ndarray:
        """A prompt's ids: its messages rendered with the generation prompt after them, the template's pieces as
        control tokens and the contents as text; raises BadRecord (too_long past data.seq_len)."""
        pieces, order, contents = self._split(messages, generation=True)
        tokens = self._tokenize(list(pieces), split_special=False)
        texts = self._tokenize(list(contents), split_special=True)
        ids: List[int] = list(tokens[0])
        for i, piece in zip(order, tokens[1:]):
            ids += texts[i] + piece
        if len(ids) > self.seq_len:
            raise BadRecord("too_long", f"{len(ids)} tokens, data.seq_len={self.seq_len}")
        return np.asarray(ids, dtype=np.int32)

    def _tokenize(self, texts: List[str], split_special: bool) -> List[List[int]]:
        if not texts:
            return []
        ids = self.tokenizer(texts, add_special_tokens=False, split_special_tokens=split_special)["input_ids"]
        return list(ids)

    def _assemble(self, messages: List[Dict[str, Any]], pieces: List[List[int]], order: List[int], contents: List[List[int]],
                  first_target: int = 0) -> Rendered:
        ids: List[int] = list(pieces[0])
        spans: List[tuple] = []  # (start, end) of each assistant turn's targets: its content and end-of-turn token
        for i, piece in zip(order, pieces[1:]):
            start = len(ids)
            ids += contents[i]
            target = messages[i]["role"] == "assistant" and i >= first_target
            end = len(ids) + (self._end_of_turn(piece) if target else 0)
            if target:
                spans.append((start, end))
            ids += piece
        length, truncated = len(ids), False
        if length > self.seq_len:
            fitting = [s for s in spans if s[1] <= self.seq_len]
            if not self.truncate:
                raise BadRecord("too_long", f"{length} tokens, data.seq_len={self.seq_len} (data.overlong=drop)")
            if not fitting:
                raise BadRecord("too_long", f"{length} tokens; its first assistant turn ends at token {spans[0][1]}, past data.seq_len={self.seq_len}")
            length, spans, truncated = fitting[-1][1], fitting, True
        mask = np.zeros(length, dtype=np.uint8)
        if self.train_on_prompt:
            mask[:] = 1
        else:
            for start, end in spans[-1:] if self.last_only else spans:
                mask[start:end] = 1
        if not mask.any():
            raise BadRecord("no_assistant", "its assistant turns hold no token to train on")
        return Rendered(np.asarray(ids[:length], dtype=np.int32), mask, truncated)


def bad_summary(bad: Dict[str, Dict[str, Any]]) -> str:
    """`3 bad records: 2 no_assistant, 1 malformed`, in the order of BAD_REASONS."""
    total = sum(b["count"] for b in bad.values())
    parts = [f"{bad[r]['count']} {r}" for r in BAD_REASONS if r in bad]
    return f"{total} bad record{'s' if total != 1 else ''}: {', '.join(parts)}" if total else "no bad records"


__all__ = ["BAD_REASONS", "ROLES", "BadRecord", "ChatRenderer", "Pair", "Rendered", "bad_summary", "chat_template", "checked_messages", "conversation",
           "preference_pair"]
