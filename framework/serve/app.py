"""The Ray Serve application: an OpenAI-compatible FastAPI ingress over the continuous-batching engine,
autoscaled, with its serving metrics.

Every replica loads the model once; its engine decodes every request the replica holds in one running
batch that requests join at the next step and leave when done (framework/serve/engine.py). The
routes prepare requests (tokenising, templates) off the event loop, after a size check that needs no
tokeniser, and turn the engine's deltas into JSON or server-sent events. Back-pressure is Serve's
own: a replica takes `max_ongoing_requests`, callers queue `max_queued_requests` more, and beyond that
the proxy answers `backpressure_status` at once. The API key and the body-size limit are checked at
the proxy, before a request takes a queue place, and again here (framework/serve/ingress.py). Serve
calls `check_health` every few seconds and replaces a replica whose model no longer runs.

Entry points: `run(cfg)` (launch/serve.py), and `build_app(args)` for `serve run` / a KubeRay
RayService `import_path: framework.serve.app:build_app`.
"""

# No `from __future__ import annotations` here: Serve's ingress rewrites the route signatures, and
# FastAPI must see the request models as classes, not strings, to read the JSON body into them.
import asyncio
import dataclasses
import logging
import os
import time
from typing import Any, AsyncIterator, Dict, List, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from framework.config import ConfigError
from framework.serve import routes
from framework.serve.config import ServeConfig, check_model_path, compose_serve_config, to_serve_config
from framework.serve.engine import Delta, GenerationFailed
from framework.hf_folder import default_model_id
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

api = FastAPI(title="framework: OpenAI-compatible LLM server")


class ReplicaState:
    """What this process's replica has set up, for the middleware and error handlers of the app it serves.

    `@serve.ingress` serves a pickled copy of `api`, so state set on `api` after import never reaches
    it; module-level functions and classes are pickled by reference, so they find this one by import."""

    policy: Optional[IngressPolicy] = None  # none yet: the middleware lets requests through
    metrics: Any = None  # framework.serve.metrics.ServingMetrics once the replica has made them


def _policy() -> Optional[IngressPolicy]:
    return ReplicaState.policy


def _refused(reason: str) -> None:
    """Count a refused request in the replica's metrics."""
    if ReplicaState.metrics is not None:
        ReplicaState.metrics.refusal(reason)


api.add_middleware(IngressChecks, policy=_policy, refused=_refused)


def _error(exc: APIError) -> JSONResponse:
    if exc.status >= 500:  # the server's failure, not the request's fault
        if ReplicaState.metrics is not None:
            ReplicaState.metrics.failure(exc.code or exc.type)
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


@serve.deployment(name="LLMServer")
@serve.ingress(api)
class LLMServer:
    """One replica: the model and its engine, the OpenAI routes, and the replica's serving metrics."""

    def __init__(self, serve_cfg: Dict[str, Any]) -> None:
        import torch

        from framework.serve.engine import Batching, load_engine
        from framework.serve.metrics import ServingMetrics

        cfg = to_serve_config(serve_cfg)
        key = None
        if cfg.api_key_env:
            key = read_api_key(cfg.api_key_env)
            if key is None:
                raise ConfigError(f"serve.api_key_env={cfg.api_key_env}: the variable is not set (or blank) on this "
                                  f"replica's node")
        if cfg.torch_threads:
            torch.set_num_threads(cfg.torch_threads)
        self.metrics = ReplicaState.metrics = ServingMetrics()
        ReplicaState.policy = IngressPolicy(cfg.api_key_env, key, cfg.route_prefix, cfg.max_request_bytes)
        batching = Batching(cfg.max_sequences, cfg.max_batch_tokens, cfg.kv_cache_blocks, cfg.kv_block_size)
        self.engine = load_engine(check_model_path(cfg), batching, cfg.dtype, "cuda" if cfg.num_gpus > 0 else "cpu")
        self.model_id = cfg.model_name or default_model_id(cfg.model_path)
        self.created = now()
        self.cfg = cfg
        self._gauges: Optional[asyncio.Task] = None

    def __del__(self) -> None:
        # Serve calls this when it stops the replica; the decode loop's thread is stopped with it.
        if hasattr(self, "engine"):
            self.engine.shutdown()

    async def _publish_gauges(self) -> None:
        while True:
            self.metrics.engine(self.engine.stats())
            await asyncio.sleep(self.cfg.metrics_interval_s)

    def _start_gauges(self) -> None:
        # Started from the replica's event loop (a route or a health check), which __init__ may not run on.
        if self._gauges is None:
            self._gauges = asyncio.get_running_loop().create_task(self._publish_gauges())

    async def check_health(self) -> None:
        """Serve calls this every few seconds; raising marks the replica unhealthy and Serve replaces it.

        The decode loop must be alive, and a one-token forward pass (off the event loop, between two decode
        steps) must give finite logits: the device and the weights still work, which a live actor alone does not show.
        """
        self._start_gauges()
        await asyncio.to_thread(self.engine.check)

    def _check_model(self, model: str) -> None:
        if model != self.model_id:
            raise APIError(404, f"The model '{model}' does not exist; this server serves '{self.model_id}'.",
                           param="model", code="model_not_found")

    async def _deltas(self, request: routes.GenerationRequest, arrived: float, rid: str) -> AsyncIterator[List[Delta]]:
        """The request's deltas, timed for the metrics; leaving early (a client gone) cancels its sequences."""
        try:
            async for step in self.metrics.timed(self.engine.generate(request.sequences), arrived):
                yield step
        except GenerationFailed as exc:
            raise routes.generation_failed(exc, rid) from None

    async def _accept(self, body: Any, prepare: Any) -> routes.GenerationRequest:
        """Check the model and the size, then prepare the request in a worker thread (tokenising blocks)."""
        self._start_gauges()
        self._check_model(body.model)
        routes.check_prompt_size(body, self.engine)
        request = await asyncio.to_thread(prepare, body, self.engine, self.cfg.default_max_tokens, self.cfg.max_sequences)
        self.metrics.prompt_tokens.inc(request.prompt_tokens)
        return request

    @api.get(HEALTH_ROUTE)
    async def health(self) -> Dict[str, Any]:
        return {"status": "ok", "model": self.model_id, **dataclasses.asdict(self.engine.stats())}

    @api.get("/v1/models")
    async def models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=self.model_id, created=self.created)])

    @api.get("/v1/models/{model}")
    async def model(self, model: str) -> ModelCard:
        self._check_model(model)
        return ModelCard(id=self.model_id, created=self.created)

    @api.post("/v1/completions")
    async def completions(self, body: CompletionRequest):  # noqa: ANN201 - JSON or a stream of events
        arrived = time.perf_counter()
        request = await self._accept(body, routes.completion_request)
        rid, created = new_id("cmpl"), now()
        deltas = self._deltas(request, arrived, rid)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = routes.completion_events(deltas, rid, created, self.model_id, request, self.engine, include_usage)
            return StreamingResponse(events, media_type="text/event-stream")
        scored = []
        if request.prompt_logprobs is not None:
            scored = [await asyncio.to_thread(self.engine.prompt_logprobs, ids, request.prompt_logprobs)
                      for ids in request.prompts]
        done = await routes.collect(deltas, len(request.sequences))
        return routes.completion_response(rid, created, self.model_id, request, done, self.engine, scored)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatCompletionRequest):  # noqa: ANN201
        arrived = time.perf_counter()
        request = await self._accept(body, routes.chat_request)
        rid, created = new_id("chatcmpl"), now()
        deltas = self._deltas(request, arrived, rid)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = routes.chat_events(deltas, rid, created, self.model_id, request, self.engine, include_usage)
            return StreamingResponse(events, media_type="text/event-stream")
        done = await routes.collect(deltas, len(request.sequences))
        return routes.chat_response(rid, created, self.model_id, request, done, self.engine)


# ---------------------------------------------------------------------------------------------
# Building and running the application

def deployment(cfg: ServeConfig) -> serve.Deployment:
    """The deployment for a checked ServeConfig: resources, autoscaling and back-pressure from config."""
    return LLMServer.options(
        ray_actor_options={"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus},
        autoscaling_config={
            "min_replicas": cfg.min_replicas,
            "initial_replicas": max(cfg.min_replicas, 1),
            "max_replicas": cfg.max_replicas,
            "target_ongoing_requests": cfg.target_ongoing_requests,
        },
        max_ongoing_requests=cfg.max_ongoing_requests,
        max_queued_requests=cfg.max_queued_requests,
        backpressure_config={"status_code": cfg.backpressure_status},
    )


def build(cfg: ServeConfig) -> serve.Application:
    """The application: the deployment bound to its config (plain data, so replicas can be rebuilt from it)."""
    return deployment(cfg).bind(dataclasses.asdict(cfg))


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


def serve_model(serve_cfg: ServeConfig) -> None:
    """launch/serve.py: connect to Ray, deploy, and serve until interrupted.

    A local cluster started here inherits this process's environment, so its proxies apply the
    ingress checks (framework/serve/ingress.py); a cluster started elsewhere needs them in its nodes' environment."""
    from framework.cluster import connect

    os.environ.update(ingress_environment(serve_cfg.api_key_env, serve_cfg.route_prefix, serve_cfg.max_request_bytes))
    connect(serve_cfg.ray_address)
    deploy(serve_cfg, blocking=True)
