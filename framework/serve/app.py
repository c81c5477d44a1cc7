"""The Ray Serve application: one deployment, Ray Serve LLM's `LLMServer` running vLLM with the project's
OpenAI-compatible routes as its ingress (framework/serve/server.py), configured by framework/serve/llm.py.

It autoscales on ongoing requests; past `max_ongoing_requests` on every replica and `max_queued_requests` waiting,
Serve's proxy answers `backpressure_status` at once. The API key and the body-size limit are checked at the proxy
before a request takes a queue place (framework/serve/ingress.py).

Entry points: `serve_model(cfg)` (launch/serve.py: deploys, serves until SIGTERM or Ctrl-C, then drains),
and `build_app(args)` for `serve run` / a KubeRay RayService `import_path: framework.serve.app:build_app`.
"""

import dataclasses
import os
import signal
import threading
from typing import Any, Dict, List, Optional

from ray import serve

from framework.config import ConfigError, one_line
from framework.hf_folder import default_model_id
from framework.serve.config import ServeConfig, check_model_path, compose_serve_config
from framework.serve.ingress import ingress_environment


def served_model_id(cfg: ServeConfig) -> str:
    return cfg.model_name or default_model_id(cfg.model_path)


# ---------------------------------------------------------------------------------------------
# Building and running the application

def build(cfg: ServeConfig) -> serve.Application:
    """The application: the engine replica (framework/serve/server.py) bound to its config (plain data) and folder."""
    from ray.serve.llm import build_llm_deployment

    from framework.serve.llm import llm_config
    from framework.serve.lora import local_adapter_loader
    from framework.serve.server import Server

    folder = check_model_path(cfg)
    model_id = served_model_id(cfg)
    bind = {"serve_cfg": dataclasses.asdict(cfg), "folder": str(folder), "model_id": model_id}
    if cfg.adapters:
        bind["model_downloader"] = local_adapter_loader()
    # Named "LLMServer:engine" as Ray Serve LLM names its own deployment (KubeRay's serveConfigV2 refers to it).
    return build_llm_deployment(llm_config(cfg, folder, model_id), name_prefix="LLMServer:", bind_kwargs=bind,
                                deployment_cls=Server)


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
