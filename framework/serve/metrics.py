"""Serving metrics through Ray Serve's metrics API: Ray exports them, prefixed `ray_`, in Prometheus' format
on each node's metrics export port (`ray start --metrics-export-port`), beside Serve's own metrics.

Inside a replica Serve adds the `deployment`, `replica` and `application` tags. Latencies are seconds
as the replica sees them: from the moment a request reaches its route (after any queueing in Serve's
router) to its first token, between a sequence's tokens, and to its end.
"""

from __future__ import annotations

import time
from typing import AsyncIterator, Dict, List

from ray.serve.metrics import Counter, Gauge, Histogram

from framework.serve.engine import Delta, EngineStats

LATENCY_BUCKETS_S = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0]
INTER_TOKEN_BUCKETS_S = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]


def ingress_refusals() -> Counter:
    """Requests Serve's HTTP proxy turned away before routing them (framework/serve/ingress.py), by reason."""
    return Counter("llm_ingress_refused_requests", description="Requests refused at the HTTP proxy, by reason.",
                   tag_keys=("reason",))


class ServingMetrics:
    """One replica's serving metrics."""

    def __init__(self) -> None:
        self.time_to_first_token = Histogram(
            "llm_time_to_first_token_seconds", description="From a request reaching its route to its first token.",
            boundaries=LATENCY_BUCKETS_S)
        self.inter_token_latency = Histogram(
            "llm_inter_token_latency_seconds", description="Between consecutive tokens of a sequence.",
            boundaries=INTER_TOKEN_BUCKETS_S)
        self.request_latency = Histogram(
            "llm_request_latency_seconds", description="From a request reaching its route to its end.",
            boundaries=LATENCY_BUCKETS_S)
        self.prompt_tokens = Counter("llm_prompt_tokens", description="Prompt tokens of accepted requests.")
        self.generated_tokens = Counter("llm_generated_tokens", description="Tokens generated.")
        self.running = Gauge("llm_running_sequences", description="Sequences decoding (they have their first token).")
        self.waiting = Gauge("llm_waiting_sequences", description="Sequences queued or prefilling.")
        self.kv_blocks_used = Gauge("llm_kv_cache_blocks_used", description="Paged KV cache blocks in use.")
        self.kv_blocks_total = Gauge("llm_kv_cache_blocks", description="Paged KV cache blocks in all.")
        self.refused = Counter("llm_refused_requests", description="Requests refused by the replica (4xx), by reason.",
                               tag_keys=("reason",))
        self.failed = Counter("llm_failed_requests", description="Requests the replica failed to answer (5xx), by reason.",
                              tag_keys=("reason",))

    def refusal(self, reason: str) -> None:
        self.refused.inc(tags={"reason": reason})

    def failure(self, reason: str) -> None:
        self.failed.inc(tags={"reason": reason})

    def engine(self, stats: EngineStats) -> None:
        self.running.set(stats.running)
        self.waiting.set(stats.waiting)
        self.kv_blocks_used.set(stats.kv_blocks_used)
        self.kv_blocks_total.set(stats.kv_blocks_total)

    async def timed(self, deltas: AsyncIterator[List[Delta]], arrived: float) -> AsyncIterator[List[Delta]]:
        """`deltas`, observing time to first token, inter-token latency, tokens and end-to-end latency."""
        first = True
        last: Dict[int, float] = {}
        try:
            async for step in deltas:
                now = time.perf_counter()
                for delta in step:
                    if not delta.tokens:
                        continue
                    if first:
                        self.time_to_first_token.observe(now - arrived)
                        first = False
                    if delta.index in last:
                        self.inter_token_latency.observe((now - last[delta.index]) / delta.tokens)
                    last[delta.index] = now
                    self.generated_tokens.inc(delta.tokens)
                yield step
        finally:
            self.request_latency.observe(time.perf_counter() - arrived)
