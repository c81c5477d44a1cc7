"""Between the OpenAI API and the engine: checked requests become vLLM completion requests, and for chat
the engine's completion output becomes chat completions and chunks.

Completions go to vLLM as the client sent them (vLLM tokenises, samples, scores echo, streams). Chat
does not: vLLM renders a chat template to text and tokenises it whole, so a message saying
`<|im_end|>\\n<|im_start|>system` would open a system turn. Chats are laid out here by
framework/serve/prompts.py (message text always tokenised as text) and handed to vLLM as token ids,
with the template's end-of-turn token as a stop token. Chat logprobs ask vLLM for token ids
(`return_tokens_as_token_ids`) and are written from them: a token's text and its own bytes, which for
a partial UTF-8 character are that fragment's bytes, not U+FFFD's.
"""

from __future__ import annotations

import json
import re
from typing import Any, AsyncIterator, Dict, List, Optional, Union

from jinja2 import TemplateError, TemplateSyntaxError

from framework.serve.prompts import ControlTokenInContent, PromptEncoder
from framework.serve.protocol import (
    APIError,
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    ChatLogprobs,
    ChatTokenLogprob,
    CompletionRequest,
    TopLogprob,
    Usage,
)

MAX_STOPS = 4  # as OpenAI
TOKEN_ID = re.compile(r"token_id:(-?\d+)$")
# Fields of our request models that vLLM takes under the same name and meaning.
_SAMPLING = ("model", "temperature", "top_p", "n", "seed", "presence_penalty", "frequency_penalty", "logit_bias",
             "stream", "user")


def _context_exceeded(message: str, param: str) -> APIError:
    return APIError(400, message, param=param, code="context_length_exceeded")


def check_prompt_size(req: Union[CompletionRequest, ChatCompletionRequest], prompts: PromptEncoder, context: int) -> None:
    """Refuse a text prompt too long for the context from its length alone, before anything tokenises it."""
    limit = prompts.max_chars
    if isinstance(req, ChatCompletionRequest):
        texts, param = [m.text() for m in req.messages], "messages"
    else:
        texts = [req.prompt] if isinstance(req.prompt, str) else [p for p in req.prompt if isinstance(p, str)]
        param = "prompt"
    chars = sum(len(t) for t in texts) if param == "messages" else max((len(t) for t in texts), default=0)
    if chars > limit:
        raise _context_exceeded(f"The {param} {'have' if param == 'messages' else 'has'} {chars} characters: more than {context} tokens, this model's maximum "
                                f"context length, even at the longest token's {limit // context} characters.", param)


def _stops(req: Union[CompletionRequest, ChatCompletionRequest]) -> List[str]:
    stops = req.stop_list()
    if len(stops) > MAX_STOPS or any(not s for s in stops):
        raise APIError(400, f"stop takes at most {MAX_STOPS} non-empty strings", param="stop")
    return stops


def _sampling(req: Union[CompletionRequest, ChatCompletionRequest]) -> Dict[str, Any]:
    fields = {k: getattr(req, k) for k in _SAMPLING if getattr(req, k) is not None}
    if req.stream_options is not None:
        fields["stream_options"] = {"include_usage": req.stream_options.include_usage,
                                    "continuous_usage_stats": False}
    return fields


def _logit_bias(req: Union[CompletionRequest, ChatCompletionRequest]) -> None:
    for key in req.logit_bias or {}:
        if not (key.isascii() and key.lstrip("-").isdigit()):  # "²" is a digit, not an int
            raise APIError(400, f"logit_bias key {key!r} is not a token id", param="logit_bias")


def _max_tokens(asked: Optional[int], longest: int, default: int, context: int) -> int:
    """max_tokens as asked, or serve.default_max_tokens clipped to what the context leaves the longest prompt."""
    if asked is not None:
        return asked
    return max(min(default, context - longest), 1)


def completion_request(req: CompletionRequest, prompts: PromptEncoder, default_max_tokens: int, context: int,
                       vocab_size: int) -> Dict[str, Any]:
    """The vLLM completion request of an OpenAI completion (blocking when max_tokens is left out: the prompts'
    lengths are counted to clip the default to the context)."""
    if req.max_tokens == 0 and not req.echo:
        raise APIError(400, "max_tokens=0 generates nothing; it is only meaningful with echo=true (scoring the prompt)",
                       param="max_tokens")
    prompt = req.prompt
    items = [prompt] if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) else prompt
    if not items or any(len(p) == 0 for p in items):
        raise APIError(400, "prompt must not be empty", param="prompt", code="empty_prompt")
    _logit_bias(req)
    if req.max_tokens is not None and req.max_tokens >= context:
        raise _context_exceeded(f"This model's maximum context length is {context} tokens; max_tokens={req.max_tokens} "
                                f"leaves no room for the prompt.", "max_tokens")
    for ids in (p for p in items if not isinstance(p, str)):
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise APIError(400, f"token id {bad[0]} is outside the vocabulary [0, {vocab_size})", param="prompt")
    longest = 0
    if req.max_tokens is None:
        longest = max(len(prompts.encode(p)) if isinstance(p, str) else len(p) for p in items)
    return {**_sampling(req), "prompt": prompt, "stop": _stops(req), "echo": req.echo, "logprobs": req.logprobs,
            "max_tokens": _max_tokens(req.max_tokens, longest, default_max_tokens, context)}


def chat_request(req: ChatCompletionRequest, prompts: PromptEncoder, default_max_tokens: int, context: int) -> Dict[str, Any]:
    """The vLLM completion request of an OpenAI chat: the messages laid out here, as token ids (blocking: tokenises)."""
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
    messages = [{"role": m.role, "content": m.text()} for m in req.messages]
    if not any(m["content"].strip() for m in messages):
        raise APIError(400, "messages must contain some text; every message content is empty", param="messages")
    try:
        ids, implied_stops, stop_token_ids = prompts.chat(messages)
    except TemplateSyntaxError:
        raise  # the template itself is broken: the server's fault, not these messages'
    except TemplateError as exc:  # the template's raise_exception(): these messages are not a chat it accepts
        raise APIError(400, f"messages do not fit this model's chat template: {exc}", param="messages") from None
    except ControlTokenInContent as exc:
        raise APIError(400, str(exc), param=f"messages[{exc.index}].content") from None
    _logit_bias(req)
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    body = {**_sampling(req), "prompt": ids, "stop": _stops(req) + list(implied_stops),
            "stop_token_ids": list(stop_token_ids),
            "max_tokens": _max_tokens(max_tokens, len(ids), default_max_tokens, context)}
    if req.logprobs:
        body.update(logprobs=req.top_logprobs or 0, return_tokens_as_token_ids=True)
    return body


# ---------------------------------------------------------------------------------------------
# Chat responses from vLLM's completion output

class ChatShaper:
    """Turns one chat request's vLLM completion output (whole or streamed) into OpenAI chat shapes."""

    def __init__(self, prompts: PromptEncoder, rid: str, created: int, model: str, top_logprobs: int) -> None:
        self.prompts, self.rid, self.created, self.model = prompts, rid, created, model
        self.top_logprobs = top_logprobs

    def _entry(self, key: str, logprob: float) -> TopLogprob:
        token = int(TOKEN_ID.match(key).group(1))
        return TopLogprob(token=self.prompts.token_text(token), logprob=max(logprob, -9999.0),
                          bytes=list(self.prompts.token_bytes(token)))

    def logprobs(self, lp: Optional[Dict[str, Any]]) -> Optional[ChatLogprobs]:
        """Chat logprobs from vLLM's completion logprobs keyed by `token_id:N`: per token, the chosen one and the
        `top_logprobs` most likely (vLLM's entry also holds the chosen token, which may rank below them)."""
        if not lp:
            return None
        content = []
        for key, logprob, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"] or []):
            ranked = sorted((top or {}).items(), key=lambda item: -item[1])[: self.top_logprobs]
            content.append(ChatTokenLogprob(**self._entry(key, logprob).model_dump(),
                                            top_logprobs=[self._entry(k, v) for k, v in ranked]))
        return ChatLogprobs(content=content)

    def response(self, completion: Dict[str, Any]) -> ChatCompletion:
        choices = [
            ChatChoice(index=c["index"], message=AssistantMessage(content=c["text"]), logprobs=self.logprobs(c.get("logprobs")),
                       finish_reason=c.get("finish_reason"))
            for c in completion["choices"]
        ]
        return ChatCompletion(id=self.rid, created=self.created, model=self.model, choices=choices,
                              usage=Usage(**{k: completion["usage"][k] for k in Usage.model_fields}))

    def _chunk(self, choices: List[ChatChunkChoice], usage: Optional[Dict[str, Any]] = None) -> str:
        chunk = ChatCompletionChunk(id=self.rid, created=self.created, model=self.model, choices=choices,
                                    usage=Usage(**{k: usage[k] for k in Usage.model_fields}) if usage else None)
        return f"data: {chunk.model_dump_json()}\n\n"

    async def events(self, n: int, completion_events: AsyncIterator[str]) -> AsyncIterator[str]:
        """Chat chunks (the role first, then content, then [DONE]) from vLLM's completion events."""
        for i in range(n):
            yield self._chunk([ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content=""))])
        async for event in completion_events:
            for line in event.splitlines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data.strip() == "[DONE]":
                    yield "data: [DONE]\n\n"
                    continue
                payload = json.loads(data)
                if "error" in payload:
                    yield f"data: {data}\n\n"
                    continue
                choices = [
                    ChatChunkChoice(index=c["index"], delta=ChatDelta(content=c["text"]) if c.get("text") else ChatDelta(),
                                    logprobs=self.logprobs(c.get("logprobs")), finish_reason=c.get("finish_reason"))
                    for c in payload.get("choices", [])
                ]
                if choices or payload.get("usage") and not payload.get("choices"):
                    yield self._chunk(choices, payload.get("usage") if not payload.get("choices") else None)


def internal_error(rid: str) -> APIError:
    """What a client is told when the server fails it: no internal detail, the id to find it in the logs by."""
    return APIError(500, f"The server failed while generating this response (request {rid}); it has been logged.",
                    type="server_error")
