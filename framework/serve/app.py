"""The Ray Serve application: an OpenAI-compatible FastAPI ingress over the batched engine, autoscaled.

Every replica loads the model once and decodes the requests it holds together: `@serve.batch`
gathers them (up to `serve.max_batch_size` rows, waiting at most `serve.batch_wait_timeout_s`) and its
async generator yields one token per row per step, which the routes turn into JSON or server-sent
events. Back-pressure is Serve's own: a replica takes `max_ongoing_requests`, callers queue
`max_queued_requests` more, and beyond that the proxy answers `backpressure_status` at once. Serve
calls `check_health` every few seconds, and replaces a replica whose model no longer runs.

Entry points: `run(cfg)` (launch/serve.py), and `build_app(args)` for `serve run` / a KubeRay
RayService `import_path: framework.serve.app:build_app`.
"""

# No `from __future__ import annotations` here: Serve's ingress rewrites the route signatures, and
# FastAPI must see the request models as classes, not strings, to read the JSON body into them.
import asyncio
import dataclasses
import os
import secrets
from typing import Any, AsyncGenerator, AsyncIterator, Dict, List

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from omegaconf import DictConfig
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from framework.config import ConfigError
from framework.serve import routes
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
from framework.serve.config import ServeConfig, compose_serve_config, to_serve_config, validate_serve
from framework.serve.engine import Delta, Job, JobFailed, StepOutput
from framework.serve.folder import check_model_folder, default_model_id, resolve_model_path

api = FastAPI(title="framework: OpenAI-compatible LLM server")
# Set by the replica at start-up; the middleware below compares every /v1 request with it.
api.state.api_key = None
# The one route open without the key (for load balancers' and Kubernetes' probes).
HEALTH_ROUTE = "/health"


def _error(exc: APIError) -> JSONResponse:
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
async def _internal_error(_: Request, exc: Exception) -> JSONResponse:
    return _error(APIError(500, f"internal error: {type(exc).__name__}", type="server_error"))


def route_path(scope: Dict[str, Any]) -> str:
    """The request's path below the application's route prefix (ASGI keeps the prefix, root_path, in path)."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


@api.middleware("http")
async def _require_api_key(request: Request, call_next):  # noqa: ANN001, ANN202 - Starlette's signature
    """401 for any route but /health when a key is configured and the request lacks it (Bearer, as OpenAI)."""
    key = request.app.state.api_key
    if key and route_path(request.scope) != HEALTH_ROUTE:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), key.encode()):
            return _error(APIError(401, "Incorrect or missing API key; send it as 'Authorization: Bearer <key>'.",
                                   code="invalid_api_key"))
    return await call_next(request)


def _rows(jobs: List[Job]) -> int:
    # A batch is measured in sequences decoded, not requests: one request may carry several prompts × n.
    return sum(len(job.rows) for job in jobs)


@serve.deployment(name="LLMServer")
@serve.ingress(api)
class LLMServer:
    """One replica: the model on its device, the OpenAI routes, and the batch that decodes their requests."""

    def __init__(self, serve_cfg: Dict[str, Any]) -> None:
        import torch

        from framework.serve.engine import load_engine

        cfg = to_serve_config(serve_cfg)
        if cfg.api_key_env:
            key = os.environ.get(cfg.api_key_env, "")
            if not key:
                raise ConfigError(f"serve.api_key_env={cfg.api_key_env}: the variable is not set on this replica's node")
            api.state.api_key = key
        if cfg.torch_threads:
            torch.set_num_threads(cfg.torch_threads)
        folder = resolve_model_path(cfg.model_path)
        self.engine = load_engine(folder, cfg.dtype, "cuda" if cfg.num_gpus > 0 else "cpu")
        self.model_id = cfg.model_name or default_model_id(cfg.model_path)
        self.created = now()
        self.cfg = cfg
        # Batches decoded and sequences in them since start-up: /health shows them (is batching happening?).
        self.batches = self.sequences = 0
        self._generate.set_max_batch_size(cfg.max_batch_size)
        self._generate.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02, batch_size_fn=_rows)
    async def _generate(self, jobs: List[Job]) -> AsyncGenerator[StepOutput, None]:
        batch = self.engine.start(jobs)
        self.batches, self.sequences = self.batches + 1, self.sequences + _rows(jobs)
        while not batch.done:
            # The forward pass runs off the event loop so that the replica keeps accepting requests.
            yield await asyncio.to_thread(batch.step)

    async def _deltas(self, job: Job) -> AsyncIterator[List[Delta]]:
        """This job's deltas, step by step; leaving early (a client gone) drops its rows from the batch."""
        try:
            async for step in self._generate(job):
                if isinstance(step, JobFailed):  # only this request ends; the rest of its batch goes on
                    raise APIError(500, f"generation failed for this request ({type(step.error).__name__}: "
                                        f"{step.error})", type="server_error")
                yield step
        finally:
            job.cancelled = True

    async def check_health(self) -> None:
        """Serve calls this every few seconds; raising marks the replica unhealthy and Serve replaces it.

        A one-token forward pass (off the event loop, beside any batch being decoded) shows that the
        device and the weights still give finite logits, which a live actor alone does not.
        """
        await asyncio.to_thread(self.engine.check)

    def _check_model(self, model: str) -> None:
        if model != self.model_id:
            raise APIError(404, f"The model '{model}' does not exist; this server serves '{self.model_id}'.",
                           param="model", code="model_not_found")

    @api.get(HEALTH_ROUTE)
    async def health(self) -> Dict[str, Any]:
        return {"status": "ok", "model": self.model_id, "batches": self.batches, "sequences": self.sequences}

    @api.get("/v1/models")
    async def models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=self.model_id, created=self.created)])

    @api.get("/v1/models/{model}")
    async def model(self, model: str) -> ModelCard:
        self._check_model(model)
        return ModelCard(id=self.model_id, created=self.created)

    @api.post("/v1/completions")
    async def completions(self, body: CompletionRequest):  # noqa: ANN201 - JSON or a stream of events
        self._check_model(body.model)
        prepared = routes.completion_job(body, self.engine, self.cfg.default_max_tokens, self.cfg.max_batch_size)
        rid, created = new_id("cmpl"), now()
        deltas = self._deltas(prepared.job)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = routes.completion_events(deltas, rid, created, self.model_id, prepared.prompt_tokens, include_usage)
            return StreamingResponse(events, media_type="text/event-stream")
        done = await routes.collect(deltas, len(prepared.job.rows))
        return routes.completion_response(rid, created, self.model_id, done, prepared.prompt_tokens)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatCompletionRequest):  # noqa: ANN201
        self._check_model(body.model)
        prepared = routes.chat_job(body, self.engine, self.cfg.default_max_tokens, self.cfg.max_batch_size)
        rid, created = new_id("chatcmpl"), now()
        deltas = self._deltas(prepared.job)
        rows = len(prepared.job.rows)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = routes.chat_events(deltas, rid, created, self.model_id, rows, prepared.prompt_tokens, include_usage)
            return StreamingResponse(events, media_type="text/event-stream")
        done = await routes.collect(deltas, rows)
        return routes.chat_response(rid, created, self.model_id, done, prepared.prompt_tokens)


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
    check_model_folder(resolve_model_path(cfg.model_path))
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


def run(cfg: DictConfig) -> None:
    """launch/serve.py: connect to Ray, deploy, and serve until interrupted."""
    from framework.cluster import connect

    serve_cfg = validate_serve(to_serve_config(cfg))
    connect(serve_cfg.ray_address)
    deploy(serve_cfg, blocking=True)
