"""Serving benchmark: the Serve application under concurrent load against plain `transformers` generate,
the same greedy requests sent one at a time, in one run: `python launch/bench.py bench=serve`.

Both sides decode the same prompts greedily to the same max_tokens on the same model with the same
torch threads, so they produce the same tokens; the figures are output tokens per second over the
whole run and per-request latency (p50/p99, from sending a request to its last token).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import socket
import statistics
import sysconfig
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from omegaconf import DictConfig

from framework.config import ConfigError, absolute, typed


@dataclass
class RandomModelConfig:
    """A small random Llama (and a BPE trained on stdlib sources), for when no trained export is at hand."""

    vocab_size: int = 4096
    hidden_size: int = 384
    intermediate_size: int = 1024
    num_hidden_layers: int = 6
    num_attention_heads: int = 6
    context: int = 512
    seed: int = 0


@dataclass
class ServeBenchConfig:
    name: str = "serve"
    # An exported Hugging Face folder or best.json; null builds `random_model` into `model_dir`.
    model_path: Optional[str] = None
    model_dir: str = "outputs/bench/serve-model"
    random_model: RandomModelConfig = field(default_factory=RandomModelConfig)
    requests: int = 32
    concurrency: int = 32  # requests in flight at once against the server
    max_tokens: int = 64
    # Torch threads for both sides (the replica and the plain-transformers baseline).
    torch_threads: int = 1
    # CPUs of the local Ray cluster the benchmark starts.
    num_cpus: int = 2
    # serve.* keys over conf/serve/default.yaml for the application under test.
    serve: Dict[str, Any] = field(default_factory=dict)
    output: str = "outputs/bench/serve.json"


def to_bench_config(cfg: DictConfig) -> ServeBenchConfig:
    return typed(ServeBenchConfig, cfg.bench, "bench")


def check(cfg: DictConfig) -> None:
    """Checks for launch/bench.py before any work: types, counts, and the serve.* overrides' keys."""
    from framework.serve.config import to_serve_config, validate_serve

    bench = to_bench_config(cfg)
    for key in ("requests", "concurrency", "max_tokens", "torch_threads", "num_cpus"):
        if getattr(bench, key) < 1:
            raise ConfigError(f"bench.{key}={getattr(bench, key)}: expected at least 1")
    if bench.random_model.context <= bench.max_tokens + 32:
        raise ConfigError(f"bench.max_tokens={bench.max_tokens}: leaves no room for prompts in context {bench.random_model.context}")
    try:
        validate_serve(to_serve_config({**bench.serve, "model_path": bench.model_path or "unused"}))
    except ConfigError as exc:
        raise ConfigError(f"bench.{exc}") from None


# ---------------------------------------------------------------------------------------------
# The model and the requests

def random_model_folder(out: Path, model: RandomModelConfig) -> Path:
    """Write a Hugging Face folder (safetensors, tokenizer, generation config) holding a random Llama."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    sources = [str(stdlib / name) for name in ("textwrap.py", "string.py", "shlex.py", "fnmatch.py", "argparse.py")]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    bpe.train(sources, trainers.BpeTrainer(
        vocab_size=model.vocab_size, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    ))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")
    eos = tokenizer.eos_token_id
    torch.manual_seed(model.seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=model.hidden_size, intermediate_size=model.intermediate_size,
        num_hidden_layers=model.num_hidden_layers, num_attention_heads=model.num_attention_heads,
        num_key_value_heads=model.num_attention_heads, max_position_embeddings=model.context,
        bos_token_id=eos, eos_token_id=eos,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    GenerationConfig(bos_token_id=eos, eos_token_id=eos, pad_token_id=eos).save_pretrained(out)
    return out


def bench_prompts(count: int) -> List[str]:
    """`count` prompts of varied length: consecutive stdlib source lines (so left padding is exercised)."""
    lines = [line for line in (Path(sysconfig.get_paths()["stdlib"]) / "json" / "decoder.py").read_text().splitlines()
             if line.strip()]
    return ["\n".join(lines[i * 3 : i * 3 + 1 + i % 4]) for i in range(count)]


# ---------------------------------------------------------------------------------------------
# The two sides

@dataclass
class Side:
    tokens: int
    seconds: float
    latencies: List[float]
    texts: List[str]
    batches: Optional[int] = None  # Serve side: batches the replica decoded

    def summary(self) -> Dict[str, float]:
        return {
            "output_tokens": self.tokens,
            "seconds": round(self.seconds, 3),
            "tokens_per_s": round(self.tokens / self.seconds, 1),
            "p50_latency_s": _percentile(self.latencies, 0.50),
            "p99_latency_s": _percentile(self.latencies, 0.99),
        }


def _percentile(values: List[float], q: float) -> float:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))], 3)


def run_transformers(folder: Path, prompts: List[str], max_tokens: int, threads: int) -> Side:
    """Plain `transformers`: each request alone through greedy `generate`, one after another."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True).eval()
    model.generate(**tokenizer("warm up", return_tensors="pt"), do_sample=False, max_new_tokens=4)
    tokens, latencies, texts = 0, [], []
    start = time.perf_counter()
    for prompt in prompts:
        t0 = time.perf_counter()
        ids = tokenizer(prompt, return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**ids, do_sample=False, max_new_tokens=max_tokens)
        new = out[0, ids["input_ids"].shape[1]:]
        latencies.append(time.perf_counter() - t0)
        tokens += int(new.shape[0])
        texts.append(tokenizer.decode(new, skip_special_tokens=True))
    return Side(tokens, time.perf_counter() - start, latencies, texts)


async def _load(url: str, model: str, prompts: List[str], max_tokens: int, concurrency: int) -> Side:
    import aiohttp

    gate = asyncio.Semaphore(concurrency)
    timeout = aiohttp.ClientTimeout(total=3600)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def one(prompt: str) -> Tuple[int, float, str]:
            body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
            async with gate:
                t0 = time.perf_counter()
                async with session.post(f"{url}/v1/completions", json=body) as response:
                    reply = await response.json()
                    if response.status != 200:
                        raise RuntimeError(f"server answered {response.status}: {reply}")
                return reply["usage"]["completion_tokens"], time.perf_counter() - t0, reply["choices"][0]["text"]

        async def health() -> Dict[str, Any]:
            async with session.get(f"{url}/health") as response:
                return await response.json()

        # Warm-up, so that the first batch does not pay for lazy initialisation.
        await one(prompts[0])
        before = await health()
        start = time.perf_counter()
        results = await asyncio.gather(*(one(p) for p in prompts))
        seconds = time.perf_counter() - start
        batches = (await health())["batches"] - before["batches"]
    side = Side(sum(r[0] for r in results), seconds, [r[1] for r in results], [r[2] for r in results])
    side.batches = batches
    return side


def run_served(folder: Path, bench: ServeBenchConfig, prompts: List[str]) -> Tuple[Side, Dict[str, Any]]:
    """The Serve application on a local cluster, all requests sent with `concurrency` in flight."""
    import ray
    from ray import serve

    from framework.serve.app import config_from_args, deploy

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    serve_cfg = config_from_args({
        **bench.serve, "model_path": str(folder), "model_name": "bench", "host": "127.0.0.1", "port": port,
        "torch_threads": bench.torch_threads, "app_name": "bench-serve", "api_key_env": None,
    })
    ray.init(address="local", num_cpus=bench.num_cpus, include_dashboard=False, logging_level="WARNING",
             log_to_driver=False)
    try:
        url = deploy(serve_cfg)
        side = asyncio.run(_load(url, "bench", prompts, bench.max_tokens, bench.concurrency))
    finally:
        serve.shutdown()
        ray.shutdown()
    return side, asdict(serve_cfg)


def run(cfg: DictConfig) -> Dict[str, Any]:
    """Run both sides, print the comparison, write it to `bench.output` as JSON; gives the figures."""
    from framework.serve.folder import check_model_folder, resolve_model_path

    bench = to_bench_config(cfg)
    if bench.model_path:
        folder = resolve_model_path(bench.model_path)
    else:
        folder = Path(absolute(bench.model_dir))
        if not (folder / "config.json").is_file():
            random_model_folder(folder, bench.random_model)
    check_model_folder(folder)
    prompts = bench_prompts(bench.requests)

    baseline = run_transformers(folder, prompts, bench.max_tokens, bench.torch_threads)
    served, serve_cfg = run_served(folder, bench, prompts)

    params = _count_params(folder)
    queued = list(itertools.accumulate(baseline.latencies))
    result = {
        "model": {"path": str(folder), "parameters": params},
        "requests": bench.requests, "concurrency": bench.concurrency, "max_tokens": bench.max_tokens,
        "torch_threads": bench.torch_threads, "cluster_cpus": bench.num_cpus,
        "transformers_one_at_a_time": baseline.summary(),
        # The same burst arriving at once at a one-at-a-time server: request i also waits for the i before it.
        "transformers_burst_queued": {
            "p50_latency_s": _percentile(queued, 0.50), "p99_latency_s": _percentile(queued, 0.99),
        },
        "serve_concurrent": {**served.summary(), "batches": served.batches},
        "throughput_ratio": round((served.tokens / served.seconds) / (baseline.tokens / baseline.seconds), 2),
        "p50_latency_ratio": round(statistics.median(served.latencies) / statistics.median(baseline.latencies), 2),
        "identical_texts": sum(a == b for a, b in zip(served.texts, baseline.texts)),
        "serve": {k: serve_cfg[k] for k in ("max_batch_size", "batch_wait_timeout_s", "max_ongoing_requests",
                                             "max_queued_requests", "num_cpus", "min_replicas", "max_replicas")},
    }
    out = Path(absolute(bench.output))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(_table(result))
    print(f"written to {out}")
    return result


def _count_params(folder: Path) -> int:
    from safetensors import safe_open

    total = 0
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as handle:
            total += sum(math.prod(handle.get_slice(key).get_shape()) for key in handle.keys())
    return total


def _table(r: Dict[str, Any]) -> str:
    base, queued, srv = r["transformers_one_at_a_time"], r["transformers_burst_queued"], r["serve_concurrent"]
    rows = [
        ("", "tokens/s", "p50 latency s", "p99 latency s", "output tokens", "wall s"),
        ("transformers, one at a time", base["tokens_per_s"], base["p50_latency_s"], base["p99_latency_s"],
         base["output_tokens"], base["seconds"]),
        ("  the burst queued for it", "", queued["p50_latency_s"], queued["p99_latency_s"], "", ""),
        (f"Serve, {r['concurrency']} concurrent", srv["tokens_per_s"], srv["p50_latency_s"], srv["p99_latency_s"],
         srv["output_tokens"], srv["seconds"]),
    ]
    lines = ["  ".join(f"{str(c):>16}" if i else f"{str(c):<28}" for i, c in enumerate(row)) for row in rows]
    lines.append(f"throughput ratio (Serve / transformers): {r['throughput_ratio']}x; "
                 f"identical texts: {r['identical_texts']}/{r['requests']}; Serve batches: {srv['batches']}")
    return "\n".join(lines)
