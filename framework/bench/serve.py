"""Serving benchmark: our endpoint (launch/serve.py's application: Ray Serve LLM running vLLM) against vLLM's
own OpenAI server on the same folder, engine arguments and CPUs, and against plain `transformers` generate,
in one run: `python launch/bench.py bench=serve`.

Every request greedy, so that every side produces the same tokens:
(i) head of line: a short request's latency while `long_requests` long ones are decoding, ÷ its latency alone
    (goal ≤ 1.5×), with how many long requests were still decoding when it ended;
(ii) output tokens/s with `clients` concurrent clients (each sends its next request when the last one
    ends): ours ÷ vLLM's own server (goal ≥ 0.9×), and ÷ the same requests one at a time through `generate`;
(iii) time to first token, p50/p99, under that load: ours ÷ vLLM's (goal p99 ≤ 1.2×).
"""

from __future__ import annotations

import asyncio
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from omegaconf import MISSING, DictConfig

from framework.bench.common import BENCHMARKS, Benchmark, folder_params, write_figures
from framework.cluster import free_port, machine
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
    # CPUs of the local Ray cluster the benchmark starts.
    num_cpus: int = MISSING
    # serve.* keys over conf/serve/default.yaml for the application under test; vLLM's own server gets the same
    # engine arguments and serve.num_cpus threads, and so does the transformers baseline.
    serve: Dict[str, Any] = field(default_factory=dict)
    output: str = MISSING


def to_bench_config(cfg: DictConfig) -> ServeBenchConfig:
    return typed(ServeBenchConfig, cfg.bench, "bench")


def check(cfg: DictConfig) -> None:
    """Checks for launch/bench.py before any work: types, counts, and the serve.* overrides' keys."""
    from framework.serve.app import compose_serve_config

    bench = to_bench_config(cfg)
    counts = {"num_cpus": bench.num_cpus,
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
    alone = [await client.complete(short_prompt, hol.short_tokens) for _ in range(3)]
    started = [asyncio.Event() for _ in range(hol.long_requests)]
    longs = [asyncio.create_task(client.complete(prompts[1 + i], hol.long_tokens, started[i]))
             for i in range(hol.long_requests)]
    await asyncio.gather(*(event.wait() for event in started))  # every long request is decoding
    behind = await client.complete(short_prompt, hol.short_tokens)
    still_decoding = sum(not task.done() for task in longs)
    long_done = await asyncio.gather(*longs)
    alone_s = statistics.median(t.last_s for t in alone)
    return {
        "short_alone_s": round(alone_s, 3),
        "short_behind_long_s": round(behind.last_s, 3),
        "ratio": round(behind.last_s / alone_s, 2),
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


def bench_serve_config(folder: Path, bench: ServeBenchConfig, port: int) -> Any:
    from framework.serve.config import compose_serve_config

    return compose_serve_config({**bench.serve, "model_path": str(folder), "model_name": "bench", "host": "127.0.0.1",
                                 "port": port, "app_name": "bench-serve", "api_key_env": None})


def run_served(folder: Path, bench: ServeBenchConfig, prompts: List[str]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """Our application on a local cluster; both scenarios over HTTP; and the serve config it ran with."""
    import ray
    from ray import serve

    from framework.serve.app import deploy

    serve_cfg = bench_serve_config(folder, bench, free_port())
    ray.init(address="local", num_cpus=bench.num_cpus, include_dashboard=False, logging_level="WARNING",
             log_to_driver=False)
    try:
        url = deploy(serve_cfg)
        served = asyncio.run(_serve_side(url, bench, prompts))
    finally:
        serve.shutdown()
        ray.shutdown()
    return served, asdict(serve_cfg)


def run_vllm_server(folder: Path, bench: ServeBenchConfig, prompts: List[str], log: Path) -> Dict[str, Any]:
    """vLLM's own OpenAI server (`python -m vllm.entrypoints.openai.api_server`) on the same folder, engine
    arguments and environment as our replica's engine; both scenarios over HTTP; stopped with SIGTERM."""
    import os
    import signal
    import subprocess
    import sys
    import urllib.request

    from framework.serve.llm import engine_cli, engine_env

    port = free_port()
    serve_cfg = bench_serve_config(folder, bench, port)
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder),
               "--served-model-name", "bench", "--host", "127.0.0.1", "--port", str(port), *engine_cli(serve_cfg)]
    with open(log, "w") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **engine_env(serve_cfg)})
    try:
        deadline = time.monotonic() + 900
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"vLLM's server exited with {server.returncode}; see {log}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"vLLM's server did not start in 900 s; see {log}")
            time.sleep(2)
        return asyncio.run(_serve_side(f"http://127.0.0.1:{port}", bench, prompts))
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=120)


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

    threads = max(int(bench.serve.get("num_cpus", 1)), 1)
    baseline, baseline_s = run_transformers(folder, load_prompts, bench.load.max_tokens, threads)
    served, serve_cfg = run_served(folder, bench, prompts)
    own = run_vllm_server(folder, bench, prompts, Path(absolute(bench.output)).with_suffix(".vllm.log"))
    base_tps = sum(t.tokens for t in baseline) / baseline_s
    sides = {name: _side(side) for name, side in (("serve", served), ("vllm_server", own))}
    result = {
        "machine": machine(),
        "model": {"path": str(folder), "parameters": folder_params(folder)},
        "engine_cpus": threads, "cluster_cpus": bench.num_cpus,
        "head_of_line": {**asdict(bench.head_of_line), "serve": served["head_of_line"], "vllm_server": own["head_of_line"]},
        "load": {
            **asdict(bench.load),
            "transformers_one_at_a_time": {"tokens_per_s": round(base_tps, 1),
                                           "p50_latency_s": _percentile([t.last_s for t in baseline], 0.5)},
            **sides,
            "serve_vs_vllm_server": {
                "tokens_per_s": round(sides["serve"]["tokens_per_s"] / sides["vllm_server"]["tokens_per_s"], 3),
                "ttft_p50": round(sides["serve"]["ttft_p50_s"] / sides["vllm_server"]["ttft_p50_s"], 3),
                "ttft_p99": round(sides["serve"]["ttft_p99_s"] / sides["vllm_server"]["ttft_p99_s"], 3),
            },
            "serve_vs_transformers": round(sides["serve"]["tokens_per_s"] / base_tps, 2),
            "identical_texts": {"serve": sum(a.text == b.text for a, b in zip(served["load"], baseline)),
                                "vllm_server": sum(a.text == b.text for a, b in zip(own["load"], baseline))},
        },
        "serve": {k: v for k, v in serve_cfg.items() if k not in ("model_path", "host", "port", "api_key_env")},
    }
    out = write_figures(result, bench.output)
    print(_report(result))
    print(f"written to {out}")
    return result


def _side(side: Dict[str, Any]) -> Dict[str, Any]:
    load = side["load"]
    return {"tokens_per_s": round(sum(t.tokens for t in load) / side["load_seconds"], 1),
            "ttft_p50_s": _percentile([t.first_s for t in load], 0.5), "ttft_p99_s": _percentile([t.first_s for t in load], 0.99),
            "p50_latency_s": _percentile([t.last_s for t in load], 0.5), "p99_latency_s": _percentile([t.last_s for t in load], 0.99)}


def _report(r: Dict[str, Any]) -> str:
    hol, load = r["head_of_line"], r["load"]
    ours, own, base, vs = load["serve"], load["vllm_server"], load["transformers_one_at_a_time"], load["serve_vs_vllm_server"]
    return "\n".join([
        f"model: {r['model']['parameters'] / 1e6:.1f}M parameters; engine on {r['engine_cpus']} CPU(s) for each side",
        f"(i)   {hol['short_tokens']}-token request behind {hol['long_requests']} decoding {hol['long_tokens']}-token requests, "
        f"÷ alone: ours {hol['serve']['ratio']}x ({hol['serve']['long_requests_still_decoding_when_short_ended']} still decoding "
        f"when it ended), vLLM's server {hol['vllm_server']['ratio']}x",
        f"(ii)  {load['clients']} clients, {load['requests']} requests of {load['max_tokens']} tokens: ours {ours['tokens_per_s']} "
        f"tokens/s, vLLM's server {own['tokens_per_s']}: {vs['tokens_per_s']}x; one at a time through generate "
        f"{base['tokens_per_s']}: {load['serve_vs_transformers']}x (identical texts: ours "
        f"{load['identical_texts']['serve']}/{load['requests']}, vLLM's {load['identical_texts']['vllm_server']}/{load['requests']})",
        f"(iii) time to first token under that load: ours p50 {ours['ttft_p50_s']} s / p99 {ours['ttft_p99_s']} s, vLLM's "
        f"p50 {own['ttft_p50_s']} s / p99 {own['ttft_p99_s']} s: {vs['ttft_p50']}x / {vs['ttft_p99']}x",
    ])


BENCHMARKS.register("serve")(Benchmark(check, run))
