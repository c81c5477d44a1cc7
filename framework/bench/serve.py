"""Serving benchmark: the Serve application under load against plain `transformers` generate, in one run:
`python launch/bench.py bench=serve`.

Three figures, every request greedy so that both sides produce the same tokens:
(i) head of line: a short request's latency while `long_requests` long ones are decoding, ÷ its latency alone;
(ii) output tokens/s with `clients` concurrent clients (each sends its next request when the last one
ends), ÷ the same requests sent one at a time to `generate`;
(iii) time to first token, p50/p99, under that load.
"""

from __future__ import annotations

import asyncio
import json
import math
import socket
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from omegaconf import MISSING, DictConfig

from framework.bench.common import BENCHMARKS, Benchmark, folder_params, write_figures
from framework.cluster import machine
from framework.config import ConfigError, absolute, typed
from framework.data.sources import stdlib_prompts
from framework.testing import RandomModelConfig, random_model_folder


@dataclass
class HeadOfLineConfig:
    long_requests: int = MISSING
    long_tokens: int = MISSING
    short_tokens: int = MISSING


@dataclass
class LoadConfig:
    clients: int = MISSING
    requests: int = MISSING
    max_tokens: int = MISSING


@dataclass
class ServeBenchConfig:
    name: str = MISSING
    # An exported Hugging Face folder or best.json; null builds `random_model` into `model_dir`.
    model_path: Optional[str] = MISSING
    model_dir: str = MISSING
    random_model: RandomModelConfig = field(default_factory=RandomModelConfig)
    head_of_line: HeadOfLineConfig = field(default_factory=HeadOfLineConfig)
    load: LoadConfig = field(default_factory=LoadConfig)
    # Torch threads for both sides (the replica and the plain-transformers baseline).
    torch_threads: int = MISSING
    # CPUs of the local Ray cluster the benchmark starts.
    num_cpus: int = MISSING
    # serve.* keys over conf/serve/default.yaml for the application under test.
    serve: Dict[str, Any] = field(default_factory=dict)
    output: str = MISSING


def to_bench_config(cfg: DictConfig) -> ServeBenchConfig:
    return typed(ServeBenchConfig, cfg.bench, "bench")


def check(cfg: DictConfig) -> None:
    """Checks for launch/bench.py before any work: types, counts, and the serve.* overrides' keys."""
    from framework.serve.app import compose_serve_config

    bench = to_bench_config(cfg)
    counts = {"torch_threads": bench.torch_threads, "num_cpus": bench.num_cpus,
              **{f"head_of_line.{k}": v for k, v in asdict(bench.head_of_line).items()},
              **{f"load.{k}": v for k, v in asdict(bench.load).items()}}
    for key, value in counts.items():
        if value < 1:
            raise ConfigError(f"bench.{key}={value}: expected at least 1")
    longest = max(bench.head_of_line.long_tokens, bench.load.max_tokens)
    if bench.model_path is None and bench.random_model.context <= longest + 64:
        raise ConfigError(f"bench.random_model.context={bench.random_model.context}: leaves no room for prompts "
                          f"beside {longest} generated tokens")
    try:
        compose_serve_config({**bench.serve, "model_path": bench.model_path or "unused"})
    except ConfigError as exc:
        raise ConfigError(f"bench.{exc}") from None


# ---------------------------------------------------------------------------------------------
# The model and the requests

# ---------------------------------------------------------------------------------------------
# Plain transformers, one request at a time

@dataclass
class Timed:
    """One request as a client saw it: tokens received, time to the first and to the last one, the text."""

    tokens: int
    first_s: float
    last_s: float
    text: str


def run_transformers(folder: Path, prompts: List[str], max_tokens: int, threads: int) -> Tuple[List[Timed], float]:
    """Plain `transformers`: each request alone through greedy `generate`, one after another; and the wall time."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True).eval()
    model.generate(**tokenizer("warm up", return_tensors="pt"), do_sample=False, max_new_tokens=4)
    timed = []
    start = time.perf_counter()
    for prompt in prompts:
        t0 = time.perf_counter()
        ids = tokenizer(prompt, return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**ids, do_sample=False, max_new_tokens=max_tokens)
        new = out[0, ids["input_ids"].shape[1]:]
        elapsed = time.perf_counter() - t0
        timed.append(Timed(int(new.shape[0]), math.nan, elapsed, tokenizer.decode(new, skip_special_tokens=True)))
    return timed, time.perf_counter() - start


# ---------------------------------------------------------------------------------------------
# The Serve application over HTTP

class Client:
    """Streams greedy completions from the server and times them."""

    def __init__(self, session: Any, url: str, model: str) -> None:
        self.session, self.url, self.model = session, url, model

    async def steps(self) -> int:
        """Forward passes the replica's engine has run (its /health counter)."""
        async with self.session.get(f"{self.url}/health") as response:
            return (await response.json())["steps"]

    async def complete(self, prompt: str, max_tokens: int, started: Optional[asyncio.Event] = None) -> Timed:
        """One streamed request; `started` is set when its first token arrives."""
        body = {"model": self.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}
        t0 = time.perf_counter()
        first, text, tokens = math.nan, "", 0
        async with self.session.post(f"{self.url}/v1/completions", json=body) as response:
            if response.status != 200:
                raise RuntimeError(f"server answered {response.status}: {await response.text()}")
            async for raw in response.content:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: "):])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                for choice in chunk["choices"]:
                    if math.isnan(first):
                        first = time.perf_counter() - t0
                        if started is not None:
                            started.set()
                    text += choice["text"]
        return Timed(tokens, first, time.perf_counter() - t0, text)


async def _head_of_line(client: Client, bench: ServeBenchConfig, prompts: List[str]) -> Dict[str, Any]:
    """The short request alone (median of 3), then behind `long_requests` requests that are decoding."""
    hol = bench.head_of_line
    short_prompt = prompts[0]
    before = await client.steps()
    alone = [await client.complete(short_prompt, hol.short_tokens) for _ in range(3)]
    steps_alone = (await client.steps() - before) / len(alone)
    started = [asyncio.Event() for _ in range(hol.long_requests)]
    longs = [asyncio.create_task(client.complete(prompts[1 + i], hol.long_tokens, started[i]))
             for i in range(hol.long_requests)]
    await asyncio.gather(*(event.wait() for event in started))  # every long request is decoding
    before = await client.steps()
    behind = await client.complete(short_prompt, hol.short_tokens)
    steps_behind = await client.steps() - before
    still_decoding = sum(not task.done() for task in longs)
    long_done = await asyncio.gather(*longs)
    alone_s = statistics.median(t.last_s for t in alone)
    return {
        "short_alone_s": round(alone_s, 3),
        "short_behind_long_s": round(behind.last_s, 3),
        "ratio": round(behind.last_s / alone_s, 2),
        # Forward passes while the short request ran: the same few either way when it joins the running decode.
        "engine_steps_alone": steps_alone,
        "engine_steps_behind": steps_behind,
        "long_requests_still_decoding_when_short_ended": still_decoding,
        "long_requests_s": round(max(t.last_s for t in long_done), 3),
    }


async def _load(client: Client, prompts: List[str], bench: ServeBenchConfig) -> Tuple[List[Timed], float]:
    """`clients` closed-loop clients over `prompts`: each sends its next request when the last one ends."""
    queue: asyncio.Queue = asyncio.Queue()
    for i, prompt in enumerate(prompts):
        queue.put_nowait((i, prompt))
    results: List[Optional[Timed]] = [None] * len(prompts)

    async def worker() -> None:
        while not queue.empty():
            i, prompt = queue.get_nowait()
            results[i] = await client.complete(prompt, bench.load.max_tokens)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(bench.load.clients)))
    return results, time.perf_counter() - start  # type: ignore[return-value]


async def _serve_side(url: str, bench: ServeBenchConfig, prompts: List[str]) -> Dict[str, Any]:
    import aiohttp

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3600)) as session:
        client = Client(session, url, "bench")
        await client.complete(prompts[0], 4)  # warm-up: the first request pays for lazy initialisation
        head_of_line = await _head_of_line(client, bench, prompts)
        load, seconds = await _load(client, prompts, bench)
    return {"head_of_line": head_of_line, "load": load, "load_seconds": seconds}


def run_served(folder: Path, bench: ServeBenchConfig, prompts: List[str]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """The Serve application on a local cluster; both scenarios over HTTP; and the serve config it ran with."""
    import ray
    from ray import serve

    from framework.serve.app import compose_serve_config, deploy

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    serve_cfg = compose_serve_config({
        **bench.serve, "model_path": str(folder), "model_name": "bench", "host": "127.0.0.1", "port": port,
        "torch_threads": bench.torch_threads, "app_name": "bench-serve", "api_key_env": None,
    })
    ray.init(address="local", num_cpus=bench.num_cpus, include_dashboard=False, logging_level="WARNING",
             log_to_driver=False)
    try:
        url = deploy(serve_cfg)
        served = asyncio.run(_serve_side(url, bench, prompts))
    finally:
        serve.shutdown()
        ray.shutdown()
    return served, asdict(serve_cfg)


# ---------------------------------------------------------------------------------------------
# The run and its report

def _percentile(values: List[float], q: float) -> float:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))], 3)


def run(cfg: DictConfig) -> Dict[str, Any]:
    """Run both sides, print the comparison, write it to `bench.output` as JSON; gives the figures."""
    from framework.hf_folder import check_model_folder, resolve_model_path

    bench = to_bench_config(cfg)
    if bench.model_path:
        folder = resolve_model_path(bench.model_path)
    else:
        folder = Path(absolute(bench.model_dir))
        if not (folder / "config.json").is_file():
            random_model_folder(folder, bench.random_model)
    check_model_folder(folder)
    prompts = stdlib_prompts(max(bench.load.requests, bench.head_of_line.long_requests + 1))
    load_prompts = prompts[: bench.load.requests]

    baseline, baseline_s = run_transformers(folder, load_prompts, bench.load.max_tokens, bench.torch_threads)
    served, serve_cfg = run_served(folder, bench, prompts)
    load = served["load"]
    base_tps = sum(t.tokens for t in baseline) / baseline_s
    served_tps = sum(t.tokens for t in load) / served["load_seconds"]
    result = {
        "machine": machine(),
        "model": {"path": str(folder), "parameters": folder_params(folder)},
        "torch_threads": bench.torch_threads, "cluster_cpus": bench.num_cpus,
        "head_of_line": {**asdict(bench.head_of_line), **served["head_of_line"]},
        "load": {
            **asdict(bench.load),
            "transformers_one_at_a_time": {"tokens_per_s": round(base_tps, 1),
                                           "p50_latency_s": _percentile([t.last_s for t in baseline], 0.5)},
            "serve": {
                "tokens_per_s": round(served_tps, 1),
                "ttft_p50_s": _percentile([t.first_s for t in load], 0.5),
                "ttft_p99_s": _percentile([t.first_s for t in load], 0.99),
                "p50_latency_s": _percentile([t.last_s for t in load], 0.5),
                "p99_latency_s": _percentile([t.last_s for t in load], 0.99),
            },
            "throughput_ratio": round(served_tps / base_tps, 2),
            "identical_texts": sum(a.text == b.text for a, b in zip(load, baseline)),
        },
        "serve": {k: v for k, v in serve_cfg.items() if k not in ("model_path", "host", "port", "api_key_env")},
    }
    out = write_figures(result, bench.output)
    print(_report(result))
    print(f"written to {out}")
    return result


def _report(r: Dict[str, Any]) -> str:
    hol, load = r["head_of_line"], r["load"]
    srv, base = load["serve"], load["transformers_one_at_a_time"]
    return "\n".join([
        f"model: {r['model']['parameters'] / 1e6:.1f}M parameters, {r['torch_threads']} torch thread(s)",
        f"(i)   {hol['short_tokens']}-token request: {hol['short_alone_s']} s alone, {hol['short_behind_long_s']} s "
        f"behind {hol['long_requests']} decoding {hol['long_tokens']}-token requests: {hol['ratio']}x",
        f"(ii)  {load['clients']} clients, {load['requests']} requests of {load['max_tokens']} tokens: "
        f"{srv['tokens_per_s']} tokens/s against {base['tokens_per_s']} one at a time through generate: "
        f"{load['throughput_ratio']}x (identical texts {load['identical_texts']}/{load['requests']})",
        f"(iii) time to first token under that load: p50 {srv['ttft_p50_s']} s, p99 {srv['ttft_p99_s']} s",
    ])


BENCHMARKS.register("serve")(Benchmark(check, run))
