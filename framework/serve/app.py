"""The Ray Serve application: an OpenAI-compatible FastAPI ingress in front of Ray Serve LLM's `LLMServer`,
which runs vLLM.

Two deployments. `LLMServer` (Ray Serve LLM's, configured by framework/serve/llm.py) holds the engine,
autoscales on ongoing requests, and answers completions as vLLM's OpenAI layer does. The ingress here
(no CPUs of its own) is what clients reach: the API key and the body-size limit, checked at Serve's
proxy before a request takes a queue place and again here (framework/serve/ingress.py); strict
OpenAI request models whose every error is a 4xx naming the field; chats laid out as token ids by the
project's encoder (framework/serve/routes.py); back-pressure: past `max_ongoing_requests ×
max_replicas` requests in flight and `max_queued_requests` waiting, the proxy answers
`backpressure_status` at once.

Entry points: `serve_model(cfg)` (launch/serve.py: deploys, serves until SIGTERM or Ctrl-C, then drains),
and `build_app(args)` for `serve run` / a KubeRay RayService `import_path: framework.serve.app:build_app`.
"""

# No `from __future__ import annotations` here: Serve's ingress rewrites the route signatures, and
# FastAPI must see the request models as classes, not strings, to read the JSON body into them.
import asyncio
import dataclasses
import json
import logging
import os
import signal
import threading
from typing import Any, AsyncIterator, Dict, List, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from framework.config import ConfigError, one_line
from framework.hf_folder import default_model_id
from framework.serve import routes
from framework.serve.gate import ExclusiveGate
from framework.serve.config import ServeConfig, check_model_path, compose_serve_config, to_serve_config
from framework.serve.ingress import HEALTH_ROUTE, IngressChecks, IngressPolicy, ingress_environment, read_api_key
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
    """What this process's ingress replica has set up, for the middleware and error handlers of the app it serves.

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


def served_model_id(cfg: ServeConfig) -> str:
    return cfg.model_name or default_model_id(cfg.model_path)


# Serve pickles the class below when it is decorated: every module-level name it uses is defined above it.
@serve.deployment(name="Ingress", ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class Ingress:
    """The OpenAI routes in front of the LLMServer deployment."""

    def __init__(self, serve_cfg: Dict[str, Any], llm: Any, folder: str) -> None:
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
        self.metrics = ReplicaState.metrics = IngressMetrics()
        ReplicaState.policy = IngressPolicy(cfg.api_key_env, key, cfg.route_prefix, cfg.max_request_bytes)
        # The folder `build` resolved (a promotion record or best.json names it): passed in, so that a new model changes
        # this deployment's arguments and Serve replaces its replicas too.
        check_model_path(cfg)
        self.folder = folder
        self.context = cfg.max_model_len or model_context(folder)
        self.vocab_size = AutoConfig.from_pretrained(folder).vocab_size
        self.prompts = PromptEncoder(AutoTokenizer.from_pretrained(folder), self.context)
        self.model_id = served_model_id(cfg)
        self.adapters = sorted(cfg.adapters)
        self.adapter_folders = dict(cfg.adapters)
        self.default_max_tokens = cfg.default_max_tokens
        self.created = now()
        # vLLM's request model, imported now rather than on the first request (vLLM takes seconds to import).
        from ray.llm._internal.serve.core.configs.openai_api_models import CompletionRequest as VLLMRequest

        self.vllm_request = VLLMRequest
        self.llm = llm
        self.stream = llm.options(stream=True)
        # An adapter's requests go to replicas by Serve's multiplexing (a replica keeps the adapters it loaded).
        self.adapter_streams = {a: llm.options(stream=True, multiplexed_model_id=a) for a in self.adapters}
        # A CPU engine with LoRA must score a prompt alone (framework/serve/gate.py); None: no gate needed.
        self.gate = ExclusiveGate() if self.adapters and cfg.num_gpus == 0 else None

    def _check_model(self, model: str) -> None:
        if model != self.model_id and model not in self.adapter_streams:
            served = ", ".join(f"'{m}'" for m in [self.model_id, *self.adapters])
            raise APIError(404, f"The model '{model}' does not exist; this server serves {served}.",
                           param="model", code="model_not_found")

    async def _engine(self, body: Dict[str, Any]) -> AsyncIterator[Any]:
        """vLLM's output for a completion request: the response (or an error) first; the rest of a stream after it."""
        try:
            request = self.vllm_request(**body)
        except ValueError as exc:  # vLLM's own request checks (pydantic): the request's fault
            raise APIError(400, one_line_error(exc), code="invalid_value") from None
        return self.adapter_streams.get(body["model"], self.stream).completions.remote(request, None)

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
                outputs.cancel()
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
    async def health(self) -> Dict[str, Any]:
        """Open without the key: the engine answers its own health check (Serve's, which replaces a dead engine)."""
        await self.llm.check_health.remote()
        return {"status": "ok", "model": self.model_id}

    @api.get("/v1/models")
    async def models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=self.model_id, created=self.created, root=self.folder),
                               *(ModelCard(id=a, created=self.created, root=self.adapter_folders[a]) for a in self.adapters)])

    @api.get("/v1/models/{model}")
    async def model(self, model: str) -> ModelCard:
        self._check_model(model)
        return ModelCard(id=model, created=self.created)

    @api.post("/v1/completions")
    async def completions(self, body: CompletionRequest):  # noqa: ANN201 - JSON or a stream of events
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
    async def chat_completions(self, body: ChatCompletionRequest):  # noqa: ANN201
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


# ---------------------------------------------------------------------------------------------
# Building and running the application

def build(cfg: ServeConfig) -> serve.Application:
    """The application: the ingress bound to its config (plain data) and to the LLMServer deployment."""
    from ray.serve.llm import build_llm_deployment

    from framework.serve.llm import ROLLOUT_SURGE_PERCENT, llm_config

    from framework.serve.lora import local_adapter_loader

    folder = check_model_path(cfg)
    config = llm_config(cfg, folder, served_model_id(cfg))
    llm = build_llm_deployment(config, bind_kwargs={"model_downloader": local_adapter_loader()} if cfg.adapters else None)
    ingress = Ingress.options(
        # The ingress bounds what the proxy lets in: every replica's ongoing requests when scaled out fully,
        # then the queue; past that, serve.backpressure_status at once.
        max_ongoing_requests=cfg.max_ongoing_requests * cfg.max_replicas,
        max_queued_requests=cfg.max_queued_requests,
        backpressure_config={"status_code": cfg.backpressure_status},
        graceful_shutdown_timeout_s=cfg.drain_timeout_s,
        max_surge_percent=ROLLOUT_SURGE_PERCENT,
    )
    return ingress.bind(dataclasses.asdict(cfg), llm, str(folder))


def config_from_args(args: Dict[str, Any]) -> ServeConfig:
    """A checked ServeConfig from Serve's builder args (see `compose_serve_config`), its model folder checked too."""
    cfg = compose_serve_config(args)
    check_model_path(cfg)
    return cfg


def build_app(args: Dict[str, Any]) -> serve.Application:
    """Serve application builder: `serve run framework.serve.app:build_app model_path=/models/m` or a RayService."""
    return build(config_from_args(args))


def deploy(cfg: ServeConfig, blocking: bool = False) -> str:
    """Start Serve's HTTP proxy and the application on the connected cluster; gives the base URL."""
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(build(cfg), name=cfg.app_name, route_prefix=cfg.route_prefix, blocking=blocking)
    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host
    return f"http://{host}:{cfg.port}{cfg.route_prefix.rstrip('/')}"


def follow(cfg: ServeConfig, stop: threading.Event) -> None:
    """Until `stop`: when serve.model_path is a JSON that names the folder (a promotion record, a sweep's best.json),
    check it every serve.follow_interval_s and roll a newly named folder out in place.

    The rollout is Serve's in-place application update with surge (`ROLLOUT_SURGE_PERCENT`): replicas of the new
    model start and pass their health checks while the old ones go on serving, and only then do the old ones drain
    (up to serve.drain_timeout_s), so no request finds the application without a replica. The model id is the
    JSON's (its folder's name), the same before and after; /v1/models shows the folder as `root`. The cluster needs
    room for the second set of replicas (a CPU replica takes serve.num_cpus; an autoscaler adds a node for GPU ones);
    until it has it, the old ones serve."""
    from framework.hf_folder import resolve_model_path

    if not cfg.model_path.endswith(".json") or cfg.follow_interval_s <= 0:
        stop.wait()
        return
    serving = tried = resolve_model_path(cfg.model_path)
    rollout: Optional[threading.Thread] = None
    failed: List[str] = []
    while not stop.wait(cfg.follow_interval_s):
        if rollout is not None:  # one rollout at a time; a JSON changed meanwhile is read when it has ended
            if rollout.is_alive():
                continue
            rollout = None
            if failed:
                print(f"serve: {tried} not rolled out, still serving {serving}: {failed.pop()}", flush=True)
            else:
                serving = tried
                print(f"serve: now serving {serving}", flush=True)
        try:
            named = resolve_model_path(cfg.model_path)
        except ConfigError as exc:  # being rewritten, or broken: read again next time
            print(f"serve: cannot read {cfg.model_path} ({exc}); still serving {serving}", flush=True)
            continue
        if named == tried:
            continue
        tried = named  # a folder that fails to roll out is not tried again until the JSON names another
        print(f"serve: {cfg.model_path} names {named}: rolling it out in place of {serving}", flush=True)

        def roll_out() -> None:
            try:
                # Returns once the application runs the new replicas only: Serve waits for room for them (the old
                # ones serve meanwhile), so this runs beside the loop rather than in it.
                serve.run(build(cfg), name=cfg.app_name, route_prefix=cfg.route_prefix)
            except Exception as exc:  # noqa: BLE001 - the running model goes on serving; the reason in one line
                failed.append(one_line(exc))

        rollout = threading.Thread(target=roll_out, name="rollout", daemon=True)
        rollout.start()


def serve_model(serve_cfg: ServeConfig) -> int:
    """launch/serve.py: connect to Ray, deploy, and serve until SIGTERM or Ctrl-C; then drain and stop.

    On the signal, Serve deletes the application: its replicas stop taking requests and finish those in
    flight for up to serve.drain_timeout_s. Gives the exit status: 0 after SIGTERM, 130 after Ctrl-C.
    A local cluster started here inherits this process's environment, so its proxies apply the ingress
    checks (framework/serve/ingress.py); a cluster started elsewhere needs them in its nodes' environment."""
    from framework.cluster import connect

    os.environ.update(ingress_environment(serve_cfg.api_key_env, serve_cfg.route_prefix, serve_cfg.max_request_bytes))
    connect(serve_cfg.ray_address)
    stop, received = threading.Event(), []

    def on_signal(signum: int, _frame: Any) -> None:
        received.append(signum)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_signal)
    url = deploy(serve_cfg)
    print(f"serve: {served_model_id(serve_cfg)} at {url}/v1 (SIGTERM or Ctrl-C to stop)", flush=True)
    follow(serve_cfg, stop)
    print(f"serve: stopping; draining requests in flight (up to {serve_cfg.drain_timeout_s:g} s)", flush=True)
    serve.delete(serve_cfg.app_name)
    serve.shutdown()
    print("serve: stopped", flush=True)
    return 130 if received and received[0] == signal.SIGINT else 0
