"""Serving behaviour on the real stack: Ray Serve on a local cluster, HTTP on localhost, the `openai` client.

One application (a tiny random Llama behind a best.json, with an API key and small queue limits) is
deployed once for the module and shared by every test.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest
import requests

ROOT = Path(__file__).resolve().parent.parent
MODEL_NAME = "tiny-served"
API_KEY = "sk-test-serve"
KEY_ENV = "FRAMEWORK_TEST_SERVE_KEY"
# Replicas read the key from their own environment, which they inherit from the process that started
# the local Ray cluster. Other test modules may start it first, so set it at collection time, before any.
os.environ[KEY_ENV] = API_KEY
CONTEXT = 256
# Small limits so that a burst of a few dozen requests overflows them. Requests wait in Serve's queue
# while the router picks a replica, so the queue must hold the 4 concurrent requests a test sends.
MAX_ONGOING, MAX_QUEUED, MAX_BATCH = 4, 4, 4


@pytest.fixture(scope="module")
def served_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Hugging Face folder to serve: byte-level BPE (~1000 tokens, eos <|endoftext|>) trained on stdlib
    sources and a tiny random Llama (hidden 64, 2 layers, 4 heads, 256 positions), safetensors."""
    from framework.serve.bench import RandomModelConfig, random_model_folder

    tiny = RandomModelConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, context=CONTEXT)
    return random_model_folder(tmp_path_factory.mktemp("served_model"), tiny)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(served_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """Base URL of the application, deployed from a sweep-style best.json that points at the folder."""
    import ray
    from ray import serve

    from framework.serve.app import config_from_args, deploy

    sweep = tmp_path_factory.mktemp("sweep")
    best = sweep / "best.json"
    relative = os.path.relpath(served_model_dir, sweep)
    best.write_text(json.dumps({"trial": "t0", "metric": "val_loss", "value": 1.0, "overrides": [], "path": relative}))

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    cfg = config_from_args({
        "model_path": str(best), "model_name": MODEL_NAME, "host": "127.0.0.1", "port": _free_port(),
        "api_key_env": KEY_ENV, "app_name": "test-serve", "min_replicas": 1, "max_replicas": 1,
        "max_ongoing_requests": MAX_ONGOING, "max_queued_requests": MAX_QUEUED, "max_batch_size": MAX_BATCH,
        "batch_wait_timeout_s": 0.05, "default_max_tokens": 16,
    })
    url = deploy(cfg)
    yield url
    serve.shutdown()
    if started:
        ray.shutdown()


def _post(url: str, path: str, body: Any = None, key: str | None = API_KEY, raw: bytes | None = None) -> requests.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if raw is not None:
        return requests.post(url + path, data=raw, headers={**headers, "Content-Type": "application/json"}, timeout=60)
    return requests.post(url + path, json=body, headers=headers, timeout=60)


def _client(url: str):
    from openai import OpenAI

    return OpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


def _reference(folder: Path, prompt: str, max_new_tokens: int) -> str:
    """What plain `transformers` greedy generation gives for the same folder and prompt."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = tokenizer(prompt, return_tensors="pt")
    out = model.generate(**ids, do_sample=False, max_new_tokens=max_new_tokens)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


# ---------------------------------------------------------------------------------------------
# The OpenAI API

def test_openai_client_gets_completion_chat_and_stream(server: str) -> None:
    client = _client(server)
    assert [m.id for m in client.models.list().data] == [MODEL_NAME]

    completion = client.completions.create(model=MODEL_NAME, prompt="def wrap(text):", max_tokens=12, temperature=0)
    choice = completion.choices[0]
    assert completion.object == "text_completion" and choice.finish_reason in ("stop", "length")
    assert 1 <= completion.usage.completion_tokens <= 12 and completion.usage.prompt_tokens > 0

    chat = client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        max_tokens=8, temperature=0,
    )
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    assert isinstance(chat.choices[0].message.content, str) and chat.usage.completion_tokens >= 1

    stream = client.completions.create(
        model=MODEL_NAME, prompt="def wrap(text):", max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    assert streamed == choice.text  # the stream carries exactly the non-streamed text
    assert chunks[-1].usage.completion_tokens == completion.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason

    chat_stream = client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        max_tokens=8, temperature=0, stream=True,
    )
    deltas = [c.choices[0].delta for c in chat_stream]
    assert deltas[0].role == "assistant"
    assert "".join(d.content or "" for d in deltas) == chat.choices[0].message.content


def test_stream_is_server_sent_events_ending_with_done(server: str) -> None:
    body = {"model": MODEL_NAME, "prompt": "import os", "max_tokens": 6, "stream": True}
    with requests.post(server + "/v1/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"},
                       stream=True, timeout=60) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines(decode_unicode=True) if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][len("data: "):])["choices"][0]["finish_reason"] in ("stop", "length")


def test_seeded_requests_repeat_and_greedy_matches_transformers_generate(server: str, served_model_dir: Path) -> None:
    client = _client(server)
    prompt = "class Template:\n    delimiter = '$'"
    greedy = [
        client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=24, temperature=0, seed=7).choices[0].text
        for _ in range(2)
    ]
    assert greedy[0] == greedy[1]
    assert greedy[0] == _reference(served_model_dir, prompt, 24)

    sampled = [
        [c.text for c in client.completions.create(
            model=MODEL_NAME, prompt=prompt, max_tokens=24, temperature=1.0, top_p=0.9, seed=11, n=2).choices]
        for _ in range(2)
    ]
    assert sampled[0] == sampled[1]  # same seed, same text
    assert sampled[0][0] != sampled[0][1]  # choice i samples with seed + i
    assert sampled[0][0] != greedy[0]


def test_stop_string_cuts_the_text_before_it(server: str) -> None:
    client = _client(server)
    full = client.completions.create(model=MODEL_NAME, prompt="def f(x):", max_tokens=24, temperature=0).choices[0]
    words = [w for w in full.text.split() if w.isascii() and len(w) >= 2 and full.text.find(w) > 0]
    assert words, f"greedy text has no usable stop word: {full.text!r}"
    stop = words[0]
    cut = client.completions.create(model=MODEL_NAME, prompt="def f(x):", max_tokens=24, temperature=0, stop=[stop])
    assert cut.choices[0].text == full.text[: full.text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_concurrent_requests_share_batches_and_match_sequential(server: str) -> None:
    prompts = ["import re", "def main():", "x = 1", "for i in range(3):"]
    body = lambda p: {"model": MODEL_NAME, "prompt": p, "max_tokens": 16, "temperature": 0}  # noqa: E731
    alone = [_post(server, "/v1/completions", body(p)).json()["choices"][0]["text"] for p in prompts]
    before = requests.get(server + "/health", timeout=10).json()

    async def together() -> List[Tuple[int, Dict]]:
        import aiohttp

        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {API_KEY}"}) as session:
            async def one(p: str) -> Tuple[int, Dict]:
                async with session.post(server + "/v1/completions", json=body(p)) as r:
                    return r.status, await r.json()

            return await asyncio.gather(*(one(p) for p in prompts))

    results = asyncio.run(together())
    after = requests.get(server + "/health", timeout=10).json()
    assert [status for status, _ in results] == [200] * len(prompts)
    assert [r["choices"][0]["text"] for _, r in results] == alone  # left padding changes nothing
    batches, sequences = after["batches"] - before["batches"], after["sequences"] - before["sequences"]
    assert sequences == len(prompts) and batches < len(prompts)  # decoded together, not one by one


# ---------------------------------------------------------------------------------------------
# Bad input and overload

LONG_PROMPT = "def f(x): return x\n" * 200  # well past 256 tokens

BAD_REQUESTS = [
    # (case, path, json body or raw bytes, key, status, param, code)
    ("malformed json", "/v1/completions", b'{"model": "tiny-served", "prompt": ', API_KEY, 400, None, "invalid_json"),
    ("not an object", "/v1/completions", b'[1, 2]', API_KEY, 400, None, None),
    ("missing prompt", "/v1/completions", {"model": MODEL_NAME}, API_KEY, 400, "prompt", None),
    ("missing model", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, API_KEY, 400, "model", None),
    ("max_tokens a string", "/v1/completions", {"model": MODEL_NAME, "prompt": "a", "max_tokens": "many"}, API_KEY, 400, "max_tokens", None),
    ("temperature a string", "/v1/completions", {"model": MODEL_NAME, "prompt": "a", "temperature": "hot"}, API_KEY, 400, "temperature", None),
    ("temperature out of range", "/v1/completions", {"model": MODEL_NAME, "prompt": "a", "temperature": 5}, API_KEY, 400, "temperature", None),
    ("messages not a list", "/v1/chat/completions", {"model": MODEL_NAME, "messages": "hi"}, API_KEY, 400, "messages", None),
    ("bad role", "/v1/chat/completions", {"model": MODEL_NAME, "messages": [{"role": "robot", "content": "hi"}]}, API_KEY, 400, "messages[0].role", None),
    ("unknown model", "/v1/completions", {"model": "gpt-9", "prompt": "a"}, API_KEY, 404, "model", "model_not_found"),
    ("empty prompt", "/v1/completions", {"model": MODEL_NAME, "prompt": ""}, API_KEY, 400, "prompt", "empty_prompt"),
    ("empty chat", "/v1/chat/completions", {"model": MODEL_NAME, "messages": []}, API_KEY, 400, "messages", None),
    ("prompt longer than context", "/v1/completions", {"model": MODEL_NAME, "prompt": LONG_PROMPT}, API_KEY, 400, "prompt", "context_length_exceeded"),
    ("max_tokens beyond context", "/v1/completions", {"model": MODEL_NAME, "prompt": "a", "max_tokens": CONTEXT}, API_KEY, 400, "max_tokens", "context_length_exceeded"),
    ("token id outside vocabulary", "/v1/completions", {"model": MODEL_NAME, "prompt": [5, 10**6]}, API_KEY, 400, "prompt", None),
    ("more sequences than a batch", "/v1/completions", {"model": MODEL_NAME, "prompt": "a", "n": MAX_BATCH + 1}, API_KEY, 400, "n", None),
    ("empty stop string", "/v1/completions", {"model": MODEL_NAME, "prompt": "a", "stop": [""]}, API_KEY, 400, "stop", None),
    ("no api key", "/v1/completions", {"model": MODEL_NAME, "prompt": "a"}, None, 401, None, "invalid_api_key"),
    ("wrong api key", "/v1/models", None, "sk-wrong", 401, None, "invalid_api_key"),
    ("unknown route", "/v1/embeddings", {"model": MODEL_NAME, "input": "a"}, API_KEY, 404, None, "not_found"),
]


@pytest.mark.parametrize("case,path,body,key,status,param,code", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_input_gets_openai_style_4xx(server: str, case: str, path: str, body: Any, key: str, status: int,
                                         param: str, code: str) -> None:
    if path == "/v1/models":
        response = requests.get(server + path, headers={"Authorization": f"Bearer {key}"}, timeout=30)
    elif isinstance(body, bytes):
        response = _post(server, path, raw=body, key=key)
    else:
        response = _post(server, path, body, key=key)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param and (code is None or error["code"] == code)


def test_replica_keeps_serving_after_bad_input(server: str) -> None:
    for raw in (b"{", b"null", b'{"model": 3}'):
        assert _post(server, "/v1/chat/completions", raw=raw).status_code == 400
    assert requests.get(server + "/health", timeout=10).status_code == 200  # no key needed for probes
    ok = _post(server, "/v1/completions", {"model": MODEL_NAME, "prompt": "a", "max_tokens": 2})
    assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_burst_past_queue_limit_is_rejected_fast_and_server_recovers(server: str) -> None:
    burst = 32  # far more than MAX_ONGOING + MAX_QUEUED

    async def fire() -> List[Tuple[int, float]]:
        import aiohttp

        body = {"model": MODEL_NAME, "prompt": "def f(x):", "max_tokens": 48, "temperature": 0}
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {API_KEY}"}) as session:
            async def one() -> Tuple[int, float]:
                start = time.perf_counter()
                async with session.post(server + "/v1/completions", json=body) as r:
                    await r.read()
                    return r.status, time.perf_counter() - start

            return await asyncio.gather(*(one() for _ in range(burst)))

    results = asyncio.run(fire())
    served = [t for status, t in results if status == 200]
    rejected = [t for status, t in results if status in (429, 503)]
    assert len(served) + len(rejected) == burst, results
    assert len(served) >= 1 and len(rejected) >= burst - (MAX_ONGOING + MAX_QUEUED) * 2
    # Refused at once, not after waiting for work: faster than any request that was decoded.
    assert statistics.median(rejected) < min(served) and max(rejected) < max(served), results
    assert requests.get(server + "/health", timeout=10).status_code == 200
    ok = _post(server, "/v1/completions", {"model": MODEL_NAME, "prompt": "a", "max_tokens": 2})
    assert ok.status_code == 200


# ---------------------------------------------------------------------------------------------
# Start-up checks (before Serve starts)

def _launch(*overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "launch" / "serve.py"), *overrides],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )


def test_missing_model_folder_fails_in_one_line_before_serve(tmp_path: Path) -> None:
    result = _launch(f"serve.model_path={tmp_path / 'nowhere'}")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert result.stderr.startswith("ConfigError: serve.model_path") and "nowhere" in result.stderr


def test_corrupt_model_folder_fails_with_the_file_named(served_model_dir: Path, tmp_path: Path) -> None:
    from framework.config import ConfigError
    from framework.serve.config import check_serve_config
    from framework.config import compose

    broken = tmp_path / "broken"
    shutil.copytree(served_model_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # a truncated export
    with pytest.raises(ConfigError, match="model.safetensors: corrupt or missing weights"):
        check_serve_config(compose([f"serve.model_path={broken}"], "serve"))

    (broken / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json: unreadable model config"):
        check_serve_config(compose([f"serve.model_path={broken}"], "serve"))

    best = tmp_path / "best.json"
    best.write_text(json.dumps({"trial": "t1", "metric": "loss", "value": 2.0, "overrides": []}))
    result = _launch(f"serve.model_path={best}")
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0
    assert "best.json" in result.stderr and '"path"' in result.stderr


def test_client_that_disconnects_stops_costing(server: str) -> None:
    body = {"model": MODEL_NAME, "prompt": "def f(x):", "max_tokens": 200, "temperature": 0, "stream": True}
    start = time.perf_counter()
    whole = _post(server, "/v1/completions", {**body, "stream": False})
    full_decode = time.perf_counter() - start
    assert whole.json()["usage"]["completion_tokens"] > 100, "needs a long decode to measure against"

    with requests.post(server + "/v1/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"},
                       stream=True, timeout=60) as response:
        next(response.iter_lines())  # the first event: decoding has started
    start = time.perf_counter()
    short = _post(server, "/v1/completions", {"model": MODEL_NAME, "prompt": "a", "max_tokens": 2})
    assert short.status_code == 200
    # The abandoned stream's rows left the batch, so the next batch did not wait for 200 tokens.
    assert time.perf_counter() - start < full_decode / 2


CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_chat_uses_the_tokenizer_template_or_the_documented_fallback(served_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from framework.serve.engine import FALLBACK_STOPS, Engine

    tokenizer = AutoTokenizer.from_pretrained(served_model_dir)
    model = AutoModelForCausalLM.from_pretrained(served_model_dir)
    engine = Engine(model, tokenizer, GenerationConfig(eos_token_id=tokenizer.eos_token_id))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]

    ids, stops, stop_ids = engine.chat_prompt(messages)  # the served folder has no template
    assert tokenizer.decode(ids) == "system: Be brief.\nuser: hi\nassistant:"
    assert stops == FALLBACK_STOPS and stop_ids == ()

    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML
    engine = Engine(model, tokenizer, GenerationConfig(eos_token_id=tokenizer.eos_token_id))
    ids, stops, stop_ids = engine.chat_prompt(messages)
    assert tokenizer.decode(ids) == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert stops == () and stop_ids == (tokenizer.convert_tokens_to_ids("<|im_end|>"),)  # the turn ends there


def test_deployment_takes_resources_autoscaling_and_limits_from_config(served_model_dir: Path) -> None:
    from framework.serve.app import config_from_args, deployment

    cpu = deployment(config_from_args({"model_path": str(served_model_dir)}))
    assert cpu.ray_actor_options == {"num_cpus": 1.0, "num_gpus": 0.0}
    gpu_cfg = config_from_args({"preset": "gpu", "model_path": str(served_model_dir), "max_replicas": "6"})
    gpu = deployment(gpu_cfg)
    assert gpu.ray_actor_options["num_gpus"] == 1 and gpu_cfg.dtype == "auto"  # bf16 on the replica's GPU
    assert (gpu.max_ongoing_requests, gpu.max_queued_requests) == (gpu_cfg.max_ongoing_requests, gpu_cfg.max_queued_requests)
    autoscaling = gpu._deployment_config.autoscaling_config  # no public getter in Ray 2.60
    assert (autoscaling.min_replicas, autoscaling.max_replicas, autoscaling.target_ongoing_requests) == (1, 6, 24)
