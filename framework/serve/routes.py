"""Between OpenAI requests and the engine: a request becomes a `GenerationRequest` (its sequences, checked
against the model), the engine's deltas become a response or server-sent events.

Sequence order is prompt-major (prompt 0's n choices, then prompt 1's, ...), which is also the `index`
a completion choice carries. With a `seed`, choice i samples with (seed + i) mod 2**64 (the range
torch's generators take), so the n choices differ from each other but the whole response is
reproducible. Preparing a request (tokenising, rendering a chat template) is blocking work the app
runs off its event loop; `check_prompt_size` is the cheap part it runs first, before any tokenising.

logprobs are the model's own: a log-softmax of its logits, before temperature, top_p, penalties or
logit_bias. A stream that fails part-way ends with an OpenAI-shaped error event and `[DONE]`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import AsyncIterator, Dict, List, Optional, Sequence as Seq, Union

from jinja2 import TemplateError, TemplateSyntaxError
from pydantic import BaseModel

from framework.serve.engine import Delta, Engine, GenerationFailed, Sequence
from framework.serve.prompts import ControlTokenInContent
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
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    SamplingFields,
    TopLogprob,
    Usage,
)
from framework.serve.sampling import SamplingParams, TokenLogprob

MAX_STOPS = 4  # as OpenAI
SEED_MODULUS = 2**64  # torch.Generator.manual_seed takes [-2**63, 2**64); reducing keeps seed + i inside it

logger = logging.getLogger(__name__)


@dataclass
class GenerationRequest:
    """A checked request: its sequences, its prompts' token ids, and what the response needs to know."""

    sequences: List[Sequence]
    prompts: List[List[int]]
    n: int
    # Echo the prompts; with `prompt_logprobs` (the top-k count) also score them.
    echo: bool = False
    prompt_logprobs: Optional[int] = None

    @property
    def prompt_tokens(self) -> int:
        # As OpenAI: each prompt counts once, however many choices (n) are sampled from it.
        return sum(len(p) for p in self.prompts)


def _context_exceeded(message: str, param: str) -> APIError:
    return APIError(400, message, param=param, code="context_length_exceeded")


def check_prompt_size(req: Union[CompletionRequest, ChatCompletionRequest], engine: Engine) -> None:
    """Refuse a prompt too long for the context from its length alone, before anything tokenises it."""
    limit, context = engine.prompts.max_chars, engine.context_length
    if isinstance(req, ChatCompletionRequest):
        chars = sum(len(m.text()) for m in req.messages)
        if chars > limit:
            raise _context_exceeded(f"The messages have {chars} characters: more than {context} tokens, this model's "
                                    f"maximum context length, even at the longest token's {limit // context} characters.",
                                    "messages")
        return
    prompts = [req.prompt] if isinstance(req.prompt, str) or _is_ids(req.prompt) else req.prompt
    for prompt in prompts:
        size = len(prompt)
        if isinstance(prompt, str) and size > limit:
            raise _context_exceeded(f"The prompt has {size} characters: more than {context} tokens, this model's "
                                    f"maximum context length, even at the longest token's {limit // context} characters.",
                                    "prompt")
        if not isinstance(prompt, str) and size > context:
            raise _context_exceeded(f"This model's maximum context length is {context} tokens; the prompt has {size}.",
                                    "prompt")


def _is_ids(prompt: object) -> bool:
    return isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], int)


def completion_request(req: CompletionRequest, engine: Engine, default_max_tokens: int,
                       max_sequences: int) -> GenerationRequest:
    """The GenerationRequest of a completion (blocking: tokenises)."""
    if req.max_tokens == 0 and not req.echo:
        raise APIError(400, "max_tokens=0 generates nothing; it is only meaningful with echo=true (scoring the prompt)",
                       param="max_tokens")
    if req.echo and req.stream:
        raise APIError(400, "echo is not supported with stream=true", param="echo")
    prompts = _completion_prompts(req.prompt, engine)
    return _prepare(req, prompts, "prompt", req.max_tokens, (), engine, default_max_tokens, max_sequences, (),
                    req.logprobs, req.echo)


def chat_request(req: ChatCompletionRequest, engine: Engine, default_max_tokens: int,
                 max_sequences: int) -> GenerationRequest:
    """The GenerationRequest of a chat (blocking: renders the template and tokenises)."""
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
    messages = [{"role": m.role, "content": m.text()} for m in req.messages]
    if not any(m["content"].strip() for m in messages):
        raise APIError(400, "messages must contain some text; every message content is empty", param="messages")
    try:
        ids, implied_stops, stop_token_ids = engine.prompts.chat(messages)
    except TemplateSyntaxError:
        raise  # the template itself is broken: the server's fault, not these messages'
    except TemplateError as exc:  # the template's raise_exception(): these messages are not a chat it accepts
        raise APIError(400, f"messages do not fit this model's chat template: {exc}", param="messages") from None
    except ControlTokenInContent as exc:
        raise APIError(400, str(exc), param=f"messages[{exc.index}].content") from None
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    return _prepare(req, [ids], "messages", max_tokens, implied_stops, engine, default_max_tokens, max_sequences,
                    stop_token_ids, logprobs, False)


def _completion_prompts(prompt: object, engine: Engine) -> List[List[int]]:
    if isinstance(prompt, str) or _is_ids(prompt):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "prompt must not be empty", param="prompt", code="empty_prompt")
    prompts = []
    for item in prompt:
        if isinstance(item, str):
            if not item:
                raise APIError(400, "prompt must not be empty", param="prompt", code="empty_prompt")
            ids = engine.prompts.encode(item)
        else:
            ids = list(item)
            bad = [t for t in ids if not 0 <= t < engine.vocab_size]
            if bad:
                raise APIError(400, f"token id {bad[0]} is outside the vocabulary [0, {engine.vocab_size})", param="prompt")
        if not ids:
            raise APIError(400, "prompt must not be empty", param="prompt", code="empty_prompt")
        prompts.append(ids)
    return prompts


def _logit_bias(req: SamplingFields, vocab_size: int) -> Dict[int, float]:
    bias = {}
    for key, value in (req.logit_bias or {}).items():
        if not (key.isascii() and key.lstrip("-").isdigit()) or not 0 <= int(key) < vocab_size:  # "²" is a digit, not an int
            raise APIError(400, f"logit_bias key {key!r} is not a token id in [0, {vocab_size})", param="logit_bias")
        bias[int(key)] = value
    return bias


def _prepare(
    req: SamplingFields,
    prompts: List[List[int]],
    prompt_param: str,
    max_tokens: Optional[int],
    implied_stops: Seq[str],
    engine: Engine,
    default_max_tokens: int,
    max_sequences: int,
    stop_token_ids: Seq[int],
    logprobs: Optional[int],
    echo: bool,
) -> GenerationRequest:
    context = engine.context_length
    longest = max(len(p) for p in prompts)
    if longest > context or (longest == context and max_tokens != 0):
        raise _context_exceeded(
            f"This model's maximum context length is {context} tokens; the prompt has {longest} tokens, "
            f"which leaves no room for a completion.", prompt_param)
    if max_tokens is None:
        max_tokens = min(default_max_tokens, context - longest)
    elif longest + max_tokens > context:
        raise _context_exceeded(
            f"This model's maximum context length is {context} tokens; you asked for {longest + max_tokens} "
            f"({longest} in the prompt, {max_tokens} for the completion). Reduce max_tokens or the prompt.", "max_tokens")
    stops = req.stop_list()
    if len(stops) > MAX_STOPS or any(not s for s in stops):
        raise APIError(400, f"stop takes at most {MAX_STOPS} non-empty strings", param="stop")
    wanted = len(prompts) * req.n
    if wanted > max_sequences:
        raise APIError(400, f"{len(prompts)} prompt(s) × n={req.n} is {wanted} sequences; this server decodes at most "
                            f"{max_sequences} at once", param="n")
    bias = _logit_bias(req, engine.vocab_size)
    sequences = []
    if max_tokens > 0:
        for ids in prompts:
            for choice in range(req.n):
                params = SamplingParams(
                    max_tokens=max_tokens,
                    temperature=1.0 if req.temperature is None else req.temperature,
                    top_p=1.0 if req.top_p is None else req.top_p,
                    stop=tuple(stops) + tuple(implied_stops),
                    seed=None if req.seed is None else (req.seed + choice) % SEED_MODULUS,
                    stop_token_ids=tuple(stop_token_ids),
                    presence_penalty=req.presence_penalty or 0.0,
                    frequency_penalty=req.frequency_penalty or 0.0,
                    logit_bias=bias,
                    logprobs=logprobs,
                )
                sequences.append(Sequence(ids, params))
    return GenerationRequest(sequences, prompts, req.n, echo, logprobs if echo else None)


# ---------------------------------------------------------------------------------------------
# Responses

@dataclass
class Collected:
    """A request's sequences gathered whole: per choice its text, finish reason and token logprobs."""

    texts: List[str]
    finish_reasons: List[Optional[str]]
    logprobs: List[List[TokenLogprob]] = field(default_factory=list)
    completion_tokens: int = 0


async def collect(deltas: AsyncIterator[List[Delta]], rows: int) -> Collected:
    """Gather a request's streamed deltas into whole texts."""
    done = Collected([""] * rows, [None] * rows, [[] for _ in range(rows)])
    async for step in deltas:
        for d in step:
            done.texts[d.index] += d.text
            done.logprobs[d.index] += d.logprobs
            done.completion_tokens += d.tokens
            if d.finish_reason:
                done.finish_reasons[d.index] = d.finish_reason
    return done


def usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=prompt_tokens + completion_tokens)


def completion_logprobs(engine: Engine, tokens: List[TokenLogprob], offset: int = 0) -> CompletionLogprobs:
    """OpenAI's completion logprobs. Each top_logprobs entry also holds the chosen token (as vLLM does), so
    a token was the greedy choice exactly when its logprob equals the entry's largest."""
    texts = [engine.token_text(t.token) for t in tokens]
    offsets, at = [], offset
    for text in texts:
        offsets.append(at)
        at += len(text)
    tops: List[Optional[Dict[str, float]]] = []
    for t, text in zip(tokens, texts):
        if t.logprob is None:
            tops.append(None)
            continue
        top = {engine.token_text(token): lp for token, lp in t.top}
        top.setdefault(text, t.logprob)
        tops.append(top)
    return CompletionLogprobs(tokens=texts, token_logprobs=[t.logprob for t in tokens], top_logprobs=tops,
                              text_offset=offsets)


def chat_logprobs(engine: Engine, tokens: List[TokenLogprob]) -> ChatLogprobs:
    def entry(token: int, logprob: float) -> TopLogprob:
        text = engine.token_text(token)
        return TopLogprob(token=text, logprob=logprob, bytes=list(text.encode("utf-8")))

    content = []
    for t in tokens:
        head = entry(t.token, t.logprob)
        content.append(ChatTokenLogprob(**head.model_dump(), top_logprobs=[entry(tok, lp) for tok, lp in t.top]))
    return ChatLogprobs(content=content)


def completion_response(rid: str, created: int, model: str, request: GenerationRequest, done: Collected,
                        engine: Engine, scored: List[List[TokenLogprob]]) -> Completion:
    """The response of a whole completion; `scored` holds each prompt's token logprobs when echo asked for them."""
    choices = []
    for p, ids in enumerate(request.prompts):
        prompt_text = engine.tokenizer.decode(ids, skip_special_tokens=True) if request.echo else ""
        for c in range(request.n):
            i = p * request.n + c
            generated = i < len(done.texts)
            text = prompt_text + (done.texts[i] if generated else "")
            logprobs = None
            if request.prompt_logprobs is not None or (generated and request.sequences[i].params.logprobs is not None):
                tokens = (scored[p] if request.prompt_logprobs is not None else []) + (done.logprobs[i] if generated else [])
                logprobs = completion_logprobs(engine, tokens)
            reason = done.finish_reasons[i] if generated else "length"
            choices.append(CompletionChoice(index=i, text=text, logprobs=logprobs, finish_reason=reason))
    return Completion(id=rid, created=created, model=model, choices=choices,
                      usage=usage(request.prompt_tokens, done.completion_tokens))


def chat_response(rid: str, created: int, model: str, request: GenerationRequest, done: Collected,
                  engine: Engine) -> ChatCompletion:
    choices = []
    for i, (text, reason) in enumerate(zip(done.texts, done.finish_reasons)):
        logprobs = chat_logprobs(engine, done.logprobs[i]) if request.sequences[i].params.logprobs is not None else None
        choices.append(ChatChoice(index=i, message=AssistantMessage(content=text), logprobs=logprobs, finish_reason=reason))
    return ChatCompletion(id=rid, created=created, model=model, choices=choices,
                          usage=usage(request.prompt_tokens, done.completion_tokens))


def sse(payload: Union[BaseModel, str]) -> str:
    """One server-sent event; `payload` is a pydantic model or the literal "[DONE]"."""
    data = payload if isinstance(payload, str) else payload.model_dump_json(exclude_none=False)
    return f"data: {data}\n\n"


def internal_error(rid: str) -> APIError:
    """What a client is told when the server fails it: no internal detail, the id to find it in the logs by."""
    return APIError(500, f"The server failed while generating this response (request {rid}); it has been logged.",
                    type="server_error")


async def _guarded(events: AsyncIterator[str], rid: str) -> AsyncIterator[str]:
    """`events`, or up to where they fail, then an OpenAI-shaped error event; `[DONE]` ends the stream either way."""
    try:
        async for event in events:
            yield event
    except APIError as exc:
        yield f"data: {json.dumps(exc.body())}\n\n"
    except Exception:  # noqa: BLE001 - the detail goes to the log, never to the client
        logger.exception("request %s failed while streaming", rid)
        yield f"data: {json.dumps(internal_error(rid).body())}\n\n"
    yield sse("[DONE]")


def completion_events(deltas: AsyncIterator[List[Delta]], rid: str, created: int, model: str,
                      request: GenerationRequest, engine: Engine, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events of a streamed completion: one chunk per piece of text, then [DONE]."""

    async def events() -> AsyncIterator[str]:
        tokens = 0
        async for step in deltas:
            for d in step:
                tokens += d.tokens
                if d.text or d.finish_reason or d.logprobs:
                    logprobs = completion_logprobs(engine, d.logprobs) if d.logprobs else None
                    choice = CompletionChoice(index=d.index, text=d.text, logprobs=logprobs, finish_reason=d.finish_reason)
                    yield sse(Completion(id=rid, created=created, model=model, choices=[choice]))
        if include_usage:
            yield sse(Completion(id=rid, created=created, model=model, choices=[], usage=usage(request.prompt_tokens, tokens)))

    return _guarded(events(), rid)


def chat_events(deltas: AsyncIterator[List[Delta]], rid: str, created: int, model: str,
                request: GenerationRequest, engine: Engine, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events of a streamed chat completion: the role first, then content, then [DONE]."""

    def chunk(choices: List[ChatChunkChoice], usage_: Optional[Usage] = None) -> str:
        return sse(ChatCompletionChunk(id=rid, created=created, model=model, choices=choices, usage=usage_))

    async def events() -> AsyncIterator[str]:
        for i in range(len(request.sequences)):
            yield chunk([ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content=""))])
        tokens = 0
        async for step in deltas:
            for d in step:
                tokens += d.tokens
                if d.text or d.finish_reason or d.logprobs:
                    delta = ChatDelta(content=d.text) if d.text else ChatDelta()
                    logprobs = chat_logprobs(engine, d.logprobs) if d.logprobs else None
                    yield chunk([ChatChunkChoice(index=d.index, delta=delta, logprobs=logprobs, finish_reason=d.finish_reason)])
        if include_usage:
            yield chunk([], usage(request.prompt_tokens, tokens))

    return _guarded(events(), rid)


def generation_failed(exc: GenerationFailed, rid: str) -> APIError:
    """A failed generation as the client sees it: a 500 without the internal detail (which is logged)."""
    logger.error("request %s: generation failed (%s)", rid, exc)
    return internal_error(rid)
