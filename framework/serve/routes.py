"""Between OpenAI requests and the engine: requests become Jobs (checked against the model), deltas
become responses or server-sent events.

Row order in a Job is prompt-major (prompt 0's n choices, then prompt 1's, ...), which is also the
`index` a completion choice carries. With a `seed`, choice i samples with (seed + i) mod 2**64 (the
range torch's generators take), so the n choices differ from each other but the whole response is
reproducible. A chat the tokenizer's template refuses (roles that must alternate, say) is a 400 on
`messages`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import AsyncIterator, List, Optional, Sequence

from jinja2 import TemplateError, TemplateSyntaxError

from framework.serve.protocol import (
    APIError,
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    Completion,
    CompletionChoice,
    CompletionRequest,
    Usage,
    SamplingFields,
)
from framework.serve.engine import Delta, Engine, Job, Row, SamplingParams

MAX_STOPS = 4  # as OpenAI
SEED_MODULUS = 2**64  # torch.Generator.manual_seed takes [-2**63, 2**64); reducing keeps seed + i inside it


@dataclass
class Prepared:
    """A checked request: the Job to decode and what the response needs to know about it."""

    job: Job
    prompt_tokens: int


def completion_job(req: CompletionRequest, engine: Engine, default_max_tokens: int, max_rows: int) -> Prepared:
    prompts = _completion_prompts(req.prompt, engine)
    return _prepare(req, prompts, "prompt", req.max_tokens, (), engine, default_max_tokens, max_rows, ())


def chat_job(req: ChatCompletionRequest, engine: Engine, default_max_tokens: int, max_rows: int) -> Prepared:
    messages = [{"role": m.role, "content": m.text()} for m in req.messages]
    if not any(m["content"].strip() for m in messages):
        raise APIError(400, "messages must contain some text; every message content is empty", param="messages")
    try:
        ids, implied_stops, stop_token_ids = engine.chat_prompt(messages)
    except TemplateSyntaxError:
        raise  # the template itself is broken: the server's fault, not these messages'
    except TemplateError as exc:  # the template's raise_exception(): these messages are not a chat it accepts
        raise APIError(400, f"messages do not fit this model's chat template: {exc}", param="messages") from None
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    return _prepare(req, [ids], "messages", max_tokens, implied_stops, engine, default_max_tokens, max_rows,
                    stop_token_ids)


def _completion_prompts(prompt: object, engine: Engine) -> List[List[int]]:
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "prompt must not be empty", param="prompt", code="empty_prompt")
    prompts = []
    for item in prompt:
        if isinstance(item, str):
            if not item:
                raise APIError(400, "prompt must not be empty", param="prompt", code="empty_prompt")
            ids = engine.encode(item)
        else:
            ids = list(item)
            bad = [t for t in ids if not 0 <= t < engine.vocab_size]
            if bad:
                raise APIError(400, f"token id {bad[0]} is outside the vocabulary [0, {engine.vocab_size})", param="prompt")
        if not ids:
            raise APIError(400, "prompt must not be empty", param="prompt", code="empty_prompt")
        prompts.append(ids)
    return prompts


def _prepare(
    req: SamplingFields,
    prompts: List[List[int]],
    prompt_param: str,
    max_tokens: Optional[int],
    implied_stops: Sequence[str],
    engine: Engine,
    default_max_tokens: int,
    max_rows: int,
    stop_token_ids: Sequence[int],
) -> Prepared:
    context = engine.context_length
    longest = max(len(p) for p in prompts)
    if longest >= context:
        raise APIError(
            400,
            f"This model's maximum context length is {context} tokens; the prompt has {longest} tokens, "
            f"which leaves no room for a completion.",
            param=prompt_param, code="context_length_exceeded",
        )
    if max_tokens is None:
        max_tokens = min(default_max_tokens, context - longest)
    elif longest + max_tokens > context:
        raise APIError(
            400,
            f"This model's maximum context length is {context} tokens; you asked for {longest + max_tokens} "
            f"({longest} in the prompt, {max_tokens} for the completion). Reduce max_tokens or the prompt.",
            param="max_tokens", code="context_length_exceeded",
        )
    stops = req.stop_list()
    if len(stops) > MAX_STOPS or any(not s for s in stops):
        raise APIError(400, f"stop takes at most {MAX_STOPS} non-empty strings", param="stop")
    rows_wanted = len(prompts) * req.n
    if rows_wanted > max_rows:
        raise APIError(
            400, f"{len(prompts)} prompt(s) × n={req.n} is {rows_wanted} sequences; this server decodes at most {max_rows} per request",
            param="n",
        )
    rows = []
    for ids in prompts:
        for choice in range(req.n):
            params = SamplingParams(
                max_tokens=max_tokens,
                temperature=1.0 if req.temperature is None else req.temperature,
                top_p=1.0 if req.top_p is None else req.top_p,
                stop=tuple(stops) + tuple(implied_stops),
                seed=None if req.seed is None else (req.seed + choice) % SEED_MODULUS,
                stop_token_ids=tuple(stop_token_ids),
            )
            rows.append(Row(ids, params))
    # As OpenAI: each prompt counts once, however many choices (n) are sampled from it.
    return Prepared(Job(rows), sum(len(p) for p in prompts))


# ---------------------------------------------------------------------------------------------
# Responses

@dataclass
class Collected:
    texts: List[str]
    finish_reasons: List[Optional[str]]
    completion_tokens: int


async def collect(deltas: AsyncIterator[List[Delta]], rows: int) -> Collected:
    """Gather a job's streamed deltas into whole texts."""
    texts, reasons, tokens = [""] * rows, [None] * rows, 0
    async for step in deltas:
        for d in step:
            texts[d.index] += d.text
            tokens += d.tokens
            if d.finish_reason:
                reasons[d.index] = d.finish_reason
    return Collected(texts, reasons, tokens)


def usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=prompt_tokens + completion_tokens)


def completion_response(rid: str, created: int, model: str, done: Collected, prompt_tokens: int) -> Completion:
    choices = [
        CompletionChoice(index=i, text=t, finish_reason=r) for i, (t, r) in enumerate(zip(done.texts, done.finish_reasons))
    ]
    return Completion(id=rid, created=created, model=model, choices=choices, usage=usage(prompt_tokens, done.completion_tokens))


def chat_response(rid: str, created: int, model: str, done: Collected, prompt_tokens: int) -> ChatCompletion:
    choices = [
        ChatChoice(index=i, message=AssistantMessage(content=t), finish_reason=r)
        for i, (t, r) in enumerate(zip(done.texts, done.finish_reasons))
    ]
    return ChatCompletion(id=rid, created=created, model=model, choices=choices, usage=usage(prompt_tokens, done.completion_tokens))


def sse(payload: object) -> str:
    """One server-sent event; `payload` is a pydantic model or the literal "[DONE]"."""
    data = payload if isinstance(payload, str) else payload.model_dump_json(exclude_none=False)
    return f"data: {data}\n\n"


async def completion_events(
    deltas: AsyncIterator[List[Delta]], rid: str, created: int, model: str, prompt_tokens: int, include_usage: bool
) -> AsyncIterator[str]:
    """Server-sent events of a streamed completion: one chunk per piece of text, then [DONE]."""
    tokens = 0
    async for step in deltas:
        for d in step:
            tokens += d.tokens
            if d.text or d.finish_reason:
                choice = CompletionChoice(index=d.index, text=d.text, finish_reason=d.finish_reason)
                yield sse(Completion(id=rid, created=created, model=model, choices=[choice]))
    if include_usage:
        yield sse(Completion(id=rid, created=created, model=model, choices=[], usage=usage(prompt_tokens, tokens)))
    yield sse("[DONE]")


async def chat_events(
    deltas: AsyncIterator[List[Delta]], rid: str, created: int, model: str, rows: int, prompt_tokens: int, include_usage: bool
) -> AsyncIterator[str]:
    """Server-sent events of a streamed chat completion: the role first, then content, then [DONE]."""

    def chunk(choices: List[ChatChunkChoice], usage_: Optional[Usage] = None) -> str:
        return sse(ChatCompletionChunk(id=rid, created=created, model=model, choices=choices, usage=usage_))

    for i in range(rows):
        yield chunk([ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content=""))])
    tokens = 0
    async for step in deltas:
        for d in step:
            tokens += d.tokens
            if d.text or d.finish_reason:
                delta = ChatDelta(content=d.text) if d.text else ChatDelta()
                yield chunk([ChatChunkChoice(index=d.index, delta=delta, finish_reason=d.finish_reason)])
    if include_usage:
        yield chunk([], usage(prompt_tokens, tokens))
    yield sse("[DONE]")
