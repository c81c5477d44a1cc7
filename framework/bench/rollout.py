"""Rollout latency (bench=rollout): request latency while a new model rolls out in place, against steady state.

launch/serve.py's path on a local cluster of `bench.cluster_cpus` logical CPUs (a rollout needs room for the new
replica beside the old one, as an autoscaler would give): the application serves a JSON naming the serving
benchmark's random-weight SmolLM2-135M-shaped folder, and `framework/serve/app.py: follow` watches it. Clients send
short completions the whole time. After `bench.steady_s` the JSON is rewritten to name a second folder (the same
weights under another path, so that only the rollout is measured), and the run goes on until the application runs
the new replicas only, then `bench.tail_s` more. Figures: p50/p99 latency before and during the swap, and every
request's status (a failed request is counted, never dropped).
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Tuple

from omegaconf import MISSING, DictConfig

from framework.bench.common import BENCHMARKS, Benchmark, random_model, write_figures
from framework.cluster import free_port, machine
from framework.config import absolute, require, typed


@dataclass
class RolloutBenchConfig:
    name: str = MISSING
    random_model: str = MISSING  # the conf/bench/ preset whose random_model and model_dir are the model
    cluster_cpus: int = MISSING  # logical CPUs of the local cluster: room for both replicas during the swap
    clients: int = MISSING  # threads sending requests back to back
    max_tokens: int = MISSING  # tokens per request
    steady_s: float = MISSING  # seconds measured before the rollout starts
    tail_s: float = MISSING  # seconds measured after it ends
    serve_preset: str = MISSING  # conf/serve/<preset>
    work_dir: str = MISSING  # the JSON and the second folder's links
    output: str = MISSING


def to_bench_config(cfg: DictConfig) -> RolloutBenchConfig:
    return typed(RolloutBenchConfig, cfg.bench, "bench")


def check(cfg: DictConfig) -> None:
    bench = to_bench_config(cfg)
    for key in ("cluster_cpus", "clients", "max_tokens"):
        require(getattr(bench, key) >= 1, f"bench.{key}", getattr(bench, key), "expected at least 1")
    for key in ("steady_s", "tail_s"):
        require(getattr(bench, key) > 0, f"bench.{key}", getattr(bench, key), "expected a positive number of seconds")
    from framework.serve.config import compose_serve_config

    compose_serve_config({"preset": bench.serve_preset, "model_path": "unchecked"})


def second_folder(folder: Path, target: Path) -> Path:
    """`folder`'s files under another path (symbolic links): a new model to the server, the same weights."""
    target.mkdir(parents=True, exist_ok=True)
    for file in folder.iterdir():
        link = target / file.name
        if not link.exists():
            link.symlink_to(file.resolve())
    return target


def percentiles(latencies: List[float]) -> Dict[str, Any]:
    import numpy as np

    if not latencies:
        return {"requests": 0}
    values = np.array(latencies)
    return {"requests": len(latencies), "p50_s": round(float(np.percentile(values, 50)), 3),
            "p99_s": round(float(np.percentile(values, 99)), 3), "max_s": round(float(values.max()), 3)}


def run(cfg: DictConfig) -> Dict[str, Any]:
    import ray
    import requests
    from ray import serve

    from framework.serve.app import deploy, follow
    from framework.serve.config import compose_serve_config

    bench = to_bench_config(cfg)
    first = random_model(bench.random_model)
    work = Path(absolute(bench.work_dir))
    second = second_folder(first, work / "second")
    record = work / "serving.json"
    record.write_text(json.dumps({"path": str(first)}))
    serve_cfg = compose_serve_config({"preset": bench.serve_preset, "model_path": str(record), "model_name": "bench",
                                      "host": "127.0.0.1", "port": free_port(), "app_name": "bench-rollout",
                                      "api_key_env": None, "min_replicas": 1, "max_replicas": 1, "follow_interval_s": 1})
    samples: List[Tuple[float, float, Any]] = []  # (start, latency, status)
    stop_clients, stop_follow = threading.Event(), threading.Event()
    ray.init(address="local", num_cpus=bench.cluster_cpus, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    try:
        url = deploy(serve_cfg)

        def client(n: int) -> None:
            body = {"model": "bench", "prompt": f"def f{n}(x):", "max_tokens": bench.max_tokens, "temperature": 0}
            while not stop_clients.is_set():
                started = time.monotonic()
                try:
                    status: Any = requests.post(url + "/v1/completions", json=body, timeout=600).status_code
                except requests.RequestException as exc:
                    status = type(exc).__name__
                samples.append((started, time.monotonic() - started, status))

        def root() -> str:
            return requests.get(url + "/v1/models", timeout=60).json()["data"][0]["root"]

        requests.post(url + "/v1/completions", json={"model": "bench", "prompt": "import", "max_tokens": 2}, timeout=600)  # warm-up
        threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(bench.clients)]
        watcher = threading.Thread(target=follow, args=(serve_cfg, stop_follow), daemon=True)
        for thread in [*threads, watcher]:
            thread.start()
        time.sleep(bench.steady_s)
        swap_started = time.monotonic()
        record.write_text(json.dumps({"path": str(second)}))
        while not (root() == str(second) and serve.status().applications[serve_cfg.app_name].status == "RUNNING"):
            time.sleep(0.5)
        swap_ended = time.monotonic()
        time.sleep(bench.tail_s)
        stop_clients.set()
        for thread in threads:
            thread.join(timeout=600)
    finally:
        stop_follow.set()
        serve.shutdown()
        ray.shutdown()
    steady = [lat for start, lat, _ in samples if start < swap_started]
    swap = [lat for start, lat, _ in samples if swap_started <= start < swap_ended]
    after = [lat for start, lat, _ in samples if start >= swap_ended]
    failed = [status for _, _, status in samples if status != 200]
    figures = {
        "machine": machine(), "model": str(first), "cluster_cpus": bench.cluster_cpus, "clients": bench.clients,
        "max_tokens": bench.max_tokens, "swap_s": round(swap_ended - swap_started, 1),
        "steady": percentiles(steady), "during_swap": percentiles(swap), "after": percentiles(after),
        "requests": len(samples), "failed": len(failed), "failed_statuses": sorted({str(s) for s in failed}),
        "serve": asdict(serve_cfg),
    }
    figures["p99_ratio_swap_over_steady"] = round(figures["during_swap"].get("p99_s", 0) / figures["steady"]["p99_s"], 2) \
        if figures["steady"].get("p99_s") else None
    print(f"bench rollout on {machine()}: {len(samples)} requests, {len(failed)} failed; the swap took {figures['swap_s']} s\n"
          f"  steady:      {figures['steady']}\n  during swap: {figures['during_swap']}\n  after:       {figures['after']}\n"
          f"  p99 during the swap ÷ steady: {figures['p99_ratio_swap_over_steady']}", flush=True)
    write_figures(figures, bench.output)
    return figures


BENCHMARKS.register("rollout")(Benchmark(check, run))
