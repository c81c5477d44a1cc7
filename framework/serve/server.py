"""The engine replica: Ray Serve LLM's `LLMServer` (vLLM) answering the OpenAI routes itself.

One deployment, "LLMServer:engine": this class is Ray Serve LLM's `LLMServer` with the project's FastAPI routes as its
ingress, so a request goes from Serve's proxy straight to the replica that holds the engine. (An ingress deployment in
front of `LLMServer` cost a second hop per streamed chunk: on 2 cores, 0.79-0.84× vLLM's own server's tokens/s
against 0.87-0.92× in most runs for this one replica; docs/benchmarks.md.) The routes: the API key and the body-size limit, checked at Serve's
proxy before a request takes a queue place and again here (framework/serve/ingress.py); strict OpenAI request models
whose every error is a 4xx naming the field; chats laid out as token ids by the project's encoder
(framework/serve/routes.py); a LoRA adapter's requests loaded through `LLMServer`'s own adapter loader.

Importing this module imports Ray Serve LLM (seconds); framework/serve/app.py imports it when it builds the app.
"""

# No `from __future__ import annotations` here: Serve's ingress rewrites the route signatures, and
# FastAPI must see the request models as classes, not strings, to read the JSON body into them.
import asyncio
import json
import logging
from typing import Any, AsyncIterator, Dict, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.llm import LLMServer
from starlette.exceptions import HTTPException as StarletteHTTPException

from framework.config import ConfigError
from framework.serve import routes
from framework.serve.config import check_model_path, to_serve_config
from framework.serve.gate import ExclusiveGate
from framework.serve.ingress import HEALTH_ROUTE, IngressChecks, IngressPolicy, read_api_key
from framework.serve.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
    new_id,
    now,
    validation_error,
)

logger = logging.getLogger(__name__)
VLLM_EXTRAS = {"prompt_logprobs": True, "prompt_token_ids": True, "kv_transfer_params": True,
               "choices": {"__all__": {"prompt_logprobs", "token_ids", "prompt_token_ids"}}}

api = FastAPI(title="framework: OpenAI-compatible LLM server")


class ReplicaState:
    """What this replica has set up, for the middleware and error handlers of the app it serves.

    `@serve.ingress` serves a pickled copy of `api`, so state set on `api` after import never reaches
    it; module-level functions and classes are pickled by reference, so they find this one by import."""

    policy: Optional[IngressPolicy] = None  # none yet: the middleware lets requests through
    metrics: Any = None  # framework.serve.metrics.IngressMetrics once the replica has made them


def _policy() -> Optional[IngressPolicy]:
    return ReplicaState.policy


def _refused(reason: str) -> None:
    """Count a refused request in the replica's metrics."""
    if ReplicaState.metrics is not None:
        ReplicaState.metrics.refusal(reason)


def _failed(reason: str) -> None:
    if ReplicaState.metrics is not None:
        ReplicaState.metrics.failure(reason)


api.add_middleware(IngressChecks, policy=_policy, refused=_refused)


def _error(exc: APIError) -> JSONResponse:
    if exc.status >= 500:  # the server's failure, not the request's fault
        _failed(exc.code or exc.type)
    else:
        _refused(exc.code or exc.type)
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


@api.exception_handler(APIError)
async def _api_error(_: Request, exc: APIError) -> JSONResponse:
    return _error(exc)


@api.exception_handler(RequestValidationError)
async def _invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
    return _error(validation_error(exc.errors()))


@api.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return _error(APIError(exc.status_code, str(exc.detail), code=code))


@api.exception_handler(Exception)
async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    rid = new_id("req")
    logger.error("request %s (%s) failed", rid, request.url.path, exc_info=exc)
    return _error(routes.internal_error(rid))


# vLLM's names for the parameters its length checks refuse, as the OpenAI request calls them.
_ENGINE_PARAMS = {"input_tokens": "prompt", "input_text": "prompt", "prompt": "prompt", "max_tokens": "max_tokens"}


def _engine_error(error: Any) -> APIError:
    """vLLM's ErrorResponse as the client sees it: a 4xx as vLLM words it (a context overflow with OpenAI's code),
    a 5xx without internal detail (logged)."""
    info = error.error if hasattr(error, "error") else error
    status = int(getattr(info, "code", 500) or 500)
    if status >= 500:
        rid = new_id("req")
        logger.error("request %s: the engine failed: %s", rid, getattr(info, "message", info))
        return routes.internal_error(rid)
    message = str(info.message)
    param = _ENGINE_PARAMS.get(getattr(info, "param", None) or "", getattr(info, "param", None))
    code = "context_length_exceeded" if "maximum context length" in message or "max_model_len" in message else None
    return APIError(status, message, param=param, code=code)


def one_line_error(exc: Exception) -> str:
    """A pydantic error of vLLM's request model in one line."""
    errors = getattr(exc, "errors", None)
    if callable(errors):
        first = (errors() or [{}])[0]
        return str(first.get("msg", exc)).removeprefix("Value error, ")
    return str(exc).splitlines()[0]


# Serve pickles the class below when it is decorated: every module-level name it uses is defined above it.
@serve.ingress(api)
class Server(LLMServer):
    """Ray Serve LLM's `LLMServer` (the engine) with the OpenAI routes in front of it, in one replica."""

    # LLMServer's hook for Ray Serve LLM's direct streaming: where a replica's class has it, Serve serves the app it
    # builds (vLLM's own OpenAI server) instead of the routes below. None: these routes are the app.
    __serve_build_asgi_app__ = None

    async def __init__(self, llm_config: Any, *, serve_cfg: Dict[str, Any], folder: str, model_id: str, **kwargs: Any) -> None:
        from transformers import AutoConfig, AutoTokenizer

        from framework.hf_folder import model_context
        from framework.serve.metrics import IngressMetrics
        from framework.serve.prompts import PromptEncoder

        cfg = to_serve_config(serve_cfg)
        key = None
        if cfg.api_key_env:
            key = read_api_key(cfg.api_key_env)
            if key is None:
                raise ConfigError(f"serve.api_key_env={cfg.api_key_env}: the variable is not set (or blank) on this "
                                  f"replica's node")
        # The folder `build` resolved (a promotion record or best.json names it): passed in, so that a new model changes
        # this deployment's arguments and Serve replaces its replicas too.
        check_model_path(cfg)
        self.folder = folder
        self.context = cfg.max_model_len or model_context(folder)
        self.vocab_size = AutoConfig.from_pretrained(folder).vocab_size
        self.prompts = PromptEncoder(AutoTokenizer.from_pretrained(folder), self.context)
        self.model_id = model_id
        self.adapters = sorted(cfg.adapters)
        self.adapter_folders = dict(cfg.adapters)
        self.default_max_tokens = cfg.default_max_tokens
        self.created = now()
        from ray.llm._internal.serve.core.configs.openai_api_models import CompletionRequest as VLLMRequest

        self.vllm_request = VLLMRequest
        # A CPU engine with LoRA must score a prompt alone (framework/serve/gate.py); None: no gate needed.
        self.gate = ExclusiveGate() if self.adapters and cfg.num_gpus == 0 else None
        self.metrics = ReplicaState.metrics = IngressMetrics()
        ReplicaState.policy = IngressPolicy(cfg.api_key_env, key, cfg.route_prefix, cfg.max_request_bytes)
        await super().__init__(llm_config, **kwargs)  # starts the engine

    def _check_model(self, model: str) -> None:
        if model != self.model_id and model not in self.adapter_folders:
            served = ", ".join(f"'{m}'" for m in [self.model_id, *self.adapters])
            raise APIError(404, f"The model '{model}' does not exist; this server serves {served}.",
                           param="model", code="model_not_found")

    async def _engine(self, body: Dict[str, Any]) -> AsyncIterator[Any]:
        """vLLM's output for a completion request: the response (or an error) first; the rest of a stream after it."""
        try:
            request = self.vllm_request(**body)
        except ValueError as exc:  # vLLM's own request checks (pydantic): the request's fault
            raise APIError(400, one_line_error(exc), code="invalid_value") from None
        if body["model"] in self.adapter_folders:
            # LLMServer's loader (Serve's multiplexing cache: a replica keeps the adapters it loaded), then vLLM's LoRA.
            await self.engine.resolve_lora(await self._load_model(body["model"]))
        return await self.completions(request, None)

    async def _first(self, outputs: Any) -> Any:
        first = await outputs.__anext__()
        item = first[0] if isinstance(first, list) and first else first
        if type(item).__name__ == "ErrorResponse":
            raise _engine_error(item)
        return first

    async def _events(self, first: Any, outputs: Any, release: Any = None) -> AsyncIterator[str]:
        """The SSE strings of a stream; a failure part-way is an OpenAI error event, counted as a failed request.
        `release` (a coroutine function) is awaited once the stream ends, however it ends."""
        rid, ended = new_id("req"), False
        try:
            for item in first:
                yield self._sse(item, rid)
            async for batch in outputs:
                for item in batch if isinstance(batch, list) else [batch]:
                    yield self._sse(item, rid)
            ended = True
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except Exception:  # noqa: BLE001 - the detail goes to the log, never to the client
            logger.exception("request %s failed while streaming", rid)
            _failed("stream_failed")
            ended = True
            yield f"data: {json.dumps(routes.internal_error(rid).body())}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            if not ended:  # the client went: the engine aborts the request rather than decode it for no one
                await outputs.aclose()
                self.metrics.cancelled.inc()
            if release is not None:
                await release()

    def _sse(self, item: Any, rid: str) -> str:
        if isinstance(item, str):
            if item.startswith('data: {"error"'):
                _failed("stream_failed")
            return item
        _failed("stream_failed")  # an ErrorResponse part-way through a stream
        logger.error("request %s failed while streaming: %s", rid, item)
        return f"data: {json.dumps(routes.internal_error(rid).body())}\n\n"

    @api.get(HEALTH_ROUTE)
    async def health_route(self) -> Dict[str, Any]:
        """Open without the key: the engine answers its own health check (Serve's, which replaces a dead engine)."""
        await self.check_health()
        return {"status": "ok", "model": self.model_id}

    @api.get("/v1/models")
    async def models_route(self) -> ModelList:
        return ModelList(data=[ModelCard(id=self.model_id, created=self.created, root=self.folder),
                               *(ModelCard(id=a, created=self.created, root=self.adapter_folders[a]) for a in self.adapters)])

    @api.get("/v1/models/{model}")
    async def model_route(self, model: str) -> ModelCard:
        self._check_model(model)
        return ModelCard(id=model, created=self.created)

    @api.post("/v1/completions")
    async def completion_route(self, body: CompletionRequest):  # noqa: ANN201 - JSON or a stream of events
        self._check_model(body.model)
        routes.check_prompt_size(body, self.prompts, self.context)
        request = await asyncio.to_thread(routes.completion_request, body, self.prompts, self.default_max_tokens, self.context,
                                          self.vocab_size)
        scores_prompt = bool(body.echo) and body.logprobs is not None
        if self.gate is not None and scores_prompt and (body.n or 1) > 1:
            raise APIError(400, "echo with logprobs takes n=1 on this server (a CPU engine with LoRA adapters scores a "
                                "prompt alone)", param="n", code="invalid_value")
        return await self._gated(scores_prompt, lambda release: self._completion(body, request, release))

    async def _gated(self, exclusive: bool, respond: Any):  # noqa: ANN202 - the route's response
        """`respond(release)` inside the gate (framework/serve/gate.py), when this server has one: a stream leaves it
        when it ends (its generator awaits `release`), any other response when it is made."""
        if self.gate is None:
            return await respond(None)
        await self.gate.enter(exclusive)

        async def release() -> None:
            await self.gate.leave(exclusive)

        try:
            response = await respond(release)
        except BaseException:
            await release()
            raise
        if not isinstance(response, StreamingResponse):
            await release()
        return response

    async def _completion(self, body: CompletionRequest, request: Dict[str, Any], release: Any = None):  # noqa: ANN202
        outputs = await self._engine(request)
        first = await self._first(outputs)
        if not body.stream:
            # vLLM's own extras (prompt_logprobs, token ids) are not OpenAI's and double the body: left out.
            response = first.model_dump(mode="json", exclude=VLLM_EXTRAS)
            if body.echo and body.max_tokens == 0:
                # Scoring a prompt, vLLM samples one token it does not return, and counts it: usage counts none.
                usage = response["usage"]
                usage.update(completion_tokens=0, total_tokens=usage["prompt_tokens"])
            return JSONResponse(response)
        return StreamingResponse(self._events(first, outputs, release), media_type="text/event-stream")

    @api.post("/v1/chat/completions")
    async def chat_route(self, body: ChatCompletionRequest):  # noqa: ANN201
        self._check_model(body.model)
        routes.check_prompt_size(body, self.prompts, self.context)
        request = await asyncio.to_thread(routes.chat_request, body, self.prompts, self.default_max_tokens, self.context)
        return await self._gated(False, lambda release: self._chat(body, request, release))

    async def _chat(self, body: ChatCompletionRequest, request: Dict[str, Any], release: Any = None):  # noqa: ANN202
        outputs = await self._engine(request)
        first = await self._first(outputs)
        shaper = routes.ChatShaper(self.prompts, new_id("chatcmpl"), now(), body.model, body.top_logprobs or 0)
        if not body.stream:
            return JSONResponse(shaper.response(first.model_dump(mode="json")).model_dump(mode="json"))
        return StreamingResponse(shaper.events(body.n, self._events(first, outputs, release)), media_type="text/event-stream")


