"""The server's own metrics (its routes' and its HTTP proxies') through Ray Serve's metrics API; Ray exports them, prefixed `ray_`, in Prometheus'
format on each node's metrics export port (`ray start --metrics-export-port`), beside Serve's metrics and
vLLM's engine metrics (`ray_vllm_*`: time to first token, inter-token latency, tokens, running and
waiting requests, KV-cache use), which Ray Serve LLM exports (`log_engine_metrics`). docs/serving.md
lists them; k8s/grafana-dashboard.json charts them.
"""

from __future__ import annotations

from ray.serve.metrics import Counter


def ingress_refusals() -> Counter:
    """Requests Serve's HTTP proxy turned away before routing them (framework/serve/ingress.py), by reason."""
    return Counter("llm_ingress_refused_requests", description="Requests refused at the HTTP proxy, by reason.",
                   tag_keys=("reason",))


class IngressMetrics:
    """One replica's counts of the requests its routes refused (4xx), failed (5xx, and streams that failed part-way),
    and streams cancelled by their client."""

    def __init__(self) -> None:
        self.refused = Counter("llm_refused_requests", description="Requests refused by the server (4xx), by reason.",
                               tag_keys=("reason",))
        self.failed = Counter("llm_failed_requests",
                              description="Requests the server failed to answer (5xx, or a stream that failed part-way), by reason.",
                              tag_keys=("reason",))
        self.cancelled = Counter("llm_cancelled_requests",
                                 description="Streams whose client went before their end; the engine aborts them.")

    def refusal(self, reason: str) -> None:
        self.refused.inc(tags={"reason": reason})

    def failure(self, reason: str) -> None:
        self.failed.inc(tags={"reason": reason})
