"""The ingress checks, the API key and the request-size limit, as one ASGI middleware applied twice: in
Serve's HTTP proxy, before a request is routed to a replica or takes a place in its queue, and again in
the replica's FastAPI app (a cluster whose proxies were started without the callback still needs the key).

Serve's proxies take middlewares from the function that `RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`
names, read when a proxy starts; `FRAMEWORK_SERVE_INGRESS` tells that function the application's
checks. `ingress_environment(cfg)` gives both variables: `launch/serve.py` puts them in the
environment of the local cluster it starts, the KubeRay manifests in their pods'.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

from starlette.middleware import Middleware
from starlette.responses import JSONResponse

from framework.serve.protocol import APIError

PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
POLICY_ENV = "FRAMEWORK_SERVE_INGRESS"
# The one route of the application open without the key (for load balancers' and Kubernetes' probes).
HEALTH_ROUTE = "/health"
# Serve's own proxy routes (/-/healthz, /-/routes: KubeRay's probes), never the application's.
RAY_ROUTES = "/-/"

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class IngressPolicy:
    """What the middleware enforces: the key (if any), where the application lives, the largest body."""

    api_key_env: Optional[str]
    api_key: Optional[str]  # null with api_key_env set: the variable is missing here, so nothing passes
    route_prefix: str
    max_request_bytes: int


def read_api_key(env_name: str) -> Optional[str]:
    """The key in `env_name`, stripped (a Secret made from a file carries its trailing newline); null if unset or blank."""
    return os.environ.get(env_name, "").strip() or None


def ingress_environment(api_key_env: Optional[str], route_prefix: str, max_request_bytes: int) -> Dict[str, str]:
    """The environment variables that make Serve's proxies apply this application's ingress checks."""
    spec = {"api_key_env": api_key_env, "route_prefix": route_prefix, "max_request_bytes": max_request_bytes}
    return {PROXY_CALLBACK_ENV: f"{__name__}:proxy_middlewares", POLICY_ENV: json.dumps(spec)}


def policy_from_environment() -> Optional[IngressPolicy]:
    """The policy `FRAMEWORK_SERVE_INGRESS` describes, with the key read from this node's environment."""
    spec = os.environ.get(POLICY_ENV)
    if not spec:
        return None
    fields = json.loads(spec)
    key_env = fields["api_key_env"]
    return IngressPolicy(key_env, read_api_key(key_env) if key_env else None, fields["route_prefix"],
                         int(fields["max_request_bytes"]))


def proxy_middlewares() -> List[Middleware]:
    """Serve's HTTP proxy callback: the ingress middleware, when `FRAMEWORK_SERVE_INGRESS` is set."""
    from framework.serve.metrics import ingress_refusals

    policy = policy_from_environment()
    if policy is None:
        return []
    if policy.api_key_env and policy.api_key is None:
        logger.error("%s is not set on this node: its proxy refuses every request", policy.api_key_env)
    counter = ingress_refusals()
    return [Middleware(IngressChecks, policy=lambda: policy, refused=lambda reason: counter.inc(tags={"reason": reason}))]


def route_path(scope: Dict[str, Any], route_prefix: str = "/") -> str:
    """The request's path below the application's route prefix. In a replica ASGI keeps the prefix in both
    root_path and path; in the proxy, before routing, the path alone holds it."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if root and path.startswith(root):
        return path[len(root):]
    prefix = route_prefix.rstrip("/")
    if prefix and (path == prefix or path.startswith(prefix + "/")):
        return path[len(prefix):] or "/"
    return path


class IngressChecks:
    """ASGI middleware: 401 without the key (every route but /health and Serve's own), 413 past the size limit.

    `policy` gives the policy to apply (null: none yet, let everything through); `refused` is told the
    reason (the error code) of every request it turns away."""

    def __init__(self, app: Callable, policy: Callable[[], Optional[IngressPolicy]],
                 refused: Callable[[str], None]) -> None:
        self.app, self.policy, self.refused = app, policy, refused

    async def __call__(self, scope: Dict[str, Any], receive: Callable, send: Callable) -> None:
        policy = self.policy() if scope["type"] == "http" else None
        if policy is None or scope.get("path", "").startswith(RAY_ROUTES):
            return await self.app(scope, receive, send)
        refusal = self._check_key(scope, policy)
        if refusal is None:
            refusal, receive = await self._check_size(scope, receive, policy.max_request_bytes)
        if refusal is not None:
            self.refused(refusal.code or refusal.type)
            headers = {"WWW-Authenticate": "Bearer"} if refusal.status == 401 else None
            return await JSONResponse(refusal.body(), status_code=refusal.status, headers=headers)(scope, receive, send)
        return await self.app(scope, receive, send)

    @staticmethod
    def _check_key(scope: Dict[str, Any], policy: IngressPolicy) -> Optional[APIError]:
        if not policy.api_key_env or route_path(scope, policy.route_prefix) == HEALTH_ROUTE:
            return None
        if policy.api_key is None:
            return APIError(503, "This node has no API key configured; it serves no requests.",
                            type="server_error", code="api_key_not_configured")
        headers = dict(scope.get("headers") or [])
        scheme, _, given = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), policy.api_key.encode()):
            return APIError(401, "Incorrect or missing API key; send it as 'Authorization: Bearer <key>'.",
                            code="invalid_api_key")
        return None

    @staticmethod
    async def _check_size(scope: Dict[str, Any], receive: Callable, limit: int):  # noqa: ANN205 - (refusal, receive)
        """A 413 for a body past `limit` bytes, told by Content-Length or, without one, by reading up to the limit."""
        too_large = APIError(413, f"The request body is larger than this server's limit of {limit} bytes.",
                             code="request_too_large")
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            return (too_large if not length.isdigit() or int(length) > limit else None), receive
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > limit:
                return too_large, receive
            if not message.get("more_body"):
                break

        async def replay() -> Dict[str, Any]:
            return messages.pop(0) if messages else await receive()

        return None, replay
