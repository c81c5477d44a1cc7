"""Serving behaviour on the real stack: Ray Serve on a local cluster, HTTP on localhost, the `openai` client.

One application (the tiny model trained under ZeRO-3 by the shared fixture, exported, behind a sweep's
best.json, with an API key and small queue limits) is deployed once for the module and shared by every
test. Engine-level tests load the same exported folder without Serve.
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
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parent.parent
# The served model's id: with serve.model_name unset, a best.json is served under its sweep's name.
MODEL_NAME = "tiny-sweep"
API_KEY = "sk-test-serve"
KEY_ENV = "FRAMEWORK_TEST_SERVE_KEY"
# Replicas read the key from their own environment, which they inherit from the process that started
# the local Ray cluster. Other test modules may start it first, so set it at collection time, before any.
os.environ[KEY_ENV] = API_KEY
# The trained tiny model's max positions (conf/model/tiny.yaml), so the context checks follow the model.
CONTEXT = OmegaConf.load(ROOT / "conf" / "model" / "tiny.yaml").hf_config.max_position_embeddings
# Small limits so that a burst of a few dozen requests overflows them. Requests wait in Serve's queue
# while the router picks a replica, so the queue must hold the 4 concurrent requests a test sends.
MAX_ONGOING, MAX_QUEUED, MAX_BATCH = 4, 4, 4


@pytest.fixture(scope="module")
def served_model_dir(trained_checkpoints: Dict[int, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Hugging Face folder served: the ZeRO-3 tiny run's final checkpoint, exported and verified
    (safetensors, the run's BPE with its ChatML template, generation config)."""
    from framework.export import export_checkpoint

    return Path(export_checkpoint(trained_checkpoints[3], str(tmp_path_factory.mktemp("export") / "tiny-zero3")))


@pytest.fixture(scope="module")
def random_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The benchmark's random-weight folder, small: its tokenizer has no chat template (the fallback layout)."""
    from framework.serve.bench import RandomModelConfig, random_model_folder

    tiny = RandomModelConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, context=256,
                             corpus_mb=0.3, seed=0)
    return random_model_folder(tmp_path_factory.mktemp("random_model"), tiny)


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

    sweep = tmp_path_factory.mktemp("sweeps") / MODEL_NAME  # as outputs/sweeps/<tune.name>/ from a sweep
    sweep.mkdir()
    best = sweep / "best.json"
    relative = os.path.relpath(served_model_dir, sweep)
    best.write_text(json.dumps({"trial": "t0", "metric": "val_loss", "value": 1.0, "overrides": [], "path": relative}))

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    cfg = config_from_args({
        "model_path": str(best), "host": "127.0.0.1", "port": _free_port(),
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


def _tokens(folder: Path, text: str) -> int:
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(folder)(text, add_special_tokens=False)["input_ids"])


async def _concurrently(url: str, path: str, bodies: List[Dict[str, Any]]) -> List[Tuple[int, Dict]]:
    """POST every body at once (so they can share a batch); each one's status and JSON body, in order."""
    import aiohttp

    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {API_KEY}"}) as session:
        async def one(body: Dict[str, Any]) -> Tuple[int, Dict]:
            async with session.post(url + path, json=body) as r:
                text = await r.text()  # Serve's own back-pressure answer is plain text, not JSON
                try:
                    return r.status, json.loads(text)
                except ValueError:
                    return r.status, {"text": text}

        return await asyncio.gather(*(one(b) for b in bodies))


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

def test_openai_client_gets_completion_chat_and_stream(server: str, served_model_dir: Path) -> None:
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
    # The prompt was laid out by the trained tokenizer's ChatML template, not the plain fallback.
    chatml = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert chat.usage.prompt_tokens == _tokens(served_model_dir, chatml)

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


def _stop_inside(text: str) -> str:
    """A two-character piece of `text` that first occurs past its start (so the cut text is not empty)."""
    for k in range(1, len(text) - 1):
        if text.find(text[k : k + 2]) == k:
            return text[k : k + 2]
    raise AssertionError(f"greedy text has no usable stop string: {text!r}")


def test_stop_string_cuts_the_text_before_it(server: str) -> None:
    client = _client(server)
    full = client.completions.create(model=MODEL_NAME, prompt="def f(x):", max_tokens=24, temperature=0).choices[0]
    stop = _stop_inside(full.text)
    cut = client.completions.create(model=MODEL_NAME, prompt="def f(x):", max_tokens=24, temperature=0, stop=[stop])
    assert cut.choices[0].text == full.text[: full.text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_concurrent_requests_share_batches_and_match_sequential(server: str) -> None:
    prompts = ["import re", "def main():", "x = 1", "for i in range(3):"]
    body = lambda p: {"model": MODEL_NAME, "prompt": p, "max_tokens": 16, "temperature": 0}  # noqa: E731
    alone = [_post(server, "/v1/completions", body(p)).json()["choices"][0]["text"] for p in prompts]
    before = requests.get(server + "/health", timeout=10).json()
    results = asyncio.run(_concurrently(server, "/v1/completions", [body(p) for p in prompts]))
    after = requests.get(server + "/health", timeout=10).json()
    assert [status for status, _ in results] == [200] * len(prompts)
    assert [r["choices"][0]["text"] for _, r in results] == alone  # left padding changes nothing
    batches, sequences = after["batches"] - before["batches"], after["sequences"] - before["sequences"]
    assert sequences == len(prompts) and batches < len(prompts)  # decoded together, not one by one


def test_usage_counts_each_prompt_once_whatever_n(server: str, served_model_dir: Path) -> None:
    def usage(prompt: Any, n: int) -> Dict[str, int]:
        body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": 2, "n": n, "seed": 3}
        return _post(server, "/v1/completions", body).json()["usage"]

    tokens = _tokens(served_model_dir, "import os")
    one, three = usage("import os", 1), usage("import os", 3)
    assert one["prompt_tokens"] == three["prompt_tokens"] == tokens  # as OpenAI: not multiplied by n
    assert three["total_tokens"] == tokens + three["completion_tokens"] and three["completion_tokens"] >= 3
    two_prompts = usage(["import os", "x = 1"], 2)
    assert two_prompts["prompt_tokens"] == tokens + _tokens(served_model_dir, "x = 1")


def test_extreme_sampling_values_are_served_or_refused_and_spare_their_batch(server: str) -> None:
    body = lambda **kw: {"model": MODEL_NAME, "prompt": "import os", "max_tokens": 8, **kw}  # noqa: E731
    greedy = _post(server, "/v1/completions", body(temperature=0)).json()["choices"][0]["text"]
    # Past OpenAI's int64 seed: refused, not a sampler crash.
    refused = _post(server, "/v1/completions", body(temperature=1.0, seed=2**64))
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "seed", refused.text
    # Four at once (what the queue limits hold), so that they share a batch.
    results = asyncio.run(_concurrently(server, "/v1/completions", [
        body(temperature=0),  # an ordinary request beside the others
        body(temperature=1e-300),  # logits divided by this overflow: decoded greedily instead
        body(temperature=1.0, seed=2**63 - 1, n=2),  # the largest int64 seed; choice 1's seed + 1 wraps
        body(temperature=1.0, seed=-(2**63)),
    ]))
    assert [status for status, _ in results] == [200, 200, 200, 200], results
    assert results[0][1]["choices"][0]["text"] == greedy
    assert results[1][1]["choices"][0]["text"] == greedy
    assert len(results[2][1]["choices"]) == 2


def test_only_the_health_route_is_open_without_the_key(server: str) -> None:
    from framework.serve.app import route_path

    assert requests.get(server + "/health", timeout=10).status_code == 200
    for path in ("/v1/models/health", "/v1/health", "/health/x"):
        response = requests.get(server + path, timeout=10)
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key", path
    # Under a route prefix the application sees it in root_path, and path keeps it (ASGI).
    assert route_path({"path": "/llm/health", "root_path": "/llm"}) == "/health"
    assert route_path({"path": "/llm/v1/models/health", "root_path": "/llm"}) == "/v1/models/health"


def test_health_check_runs_the_model_and_fails_when_it_gives_nan(server: str, served_model_dir: Path) -> None:
    import torch
    from ray import serve

    from framework.serve.engine import load_engine

    # What Serve calls every few seconds, called the same way on the live replica.
    assert serve.get_app_handle("test-serve").check_health.remote().result(timeout_s=60) is None
    engine = load_engine(served_model_dir, device="cpu")
    engine.check()
    with torch.no_grad():
        next(engine.model.parameters()).fill_(float("nan"))  # weights (or a device) gone bad
    with pytest.raises(RuntimeError, match="non-finite logits"):
        engine.check()


# ---------------------------------------------------------------------------------------------
# Bad input and overload

LONG_PROMPT = "def f(x): return x\n" * 400  # ~3000 tokens: well past the context

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


STRICT_TEMPLATE = (
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_chat_uses_the_tokenizer_template_or_the_documented_fallback(served_model_dir: Path, random_model_dir: Path) -> None:
    from framework.serve.engine import FALLBACK_STOPS, load_engine

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    engine = load_engine(served_model_dir, device="cpu")  # the trained tokenizer carries ChatML
    ids, stops, stop_ids = engine.chat_prompt(messages)
    tokenizer = engine.tokenizer
    assert tokenizer.decode(ids) == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert stops == () and stop_ids == (tokenizer.convert_tokens_to_ids("<|im_end|>"),)  # the turn ends there

    engine = load_engine(random_model_dir, device="cpu")  # the benchmark's random folder has no template
    ids, stops, stop_ids = engine.chat_prompt(messages)
    assert engine.tokenizer.decode(ids) == "system: Be brief.\nuser: hi\nassistant:"
    assert stops == FALLBACK_STOPS and stop_ids == ()


def test_batched_greedy_decoding_equals_transformers_generate_row_by_row(random_model_dir: Path) -> None:
    """Left-padded prompts of different lengths decoded in one batch give, row for row, what `generate`
    gives for each prompt alone. Random weights make every continuation different (the 20-step trained
    model answers most prompts alike), so a row mixed up with another, or a position off by one, shows."""
    from framework.serve.engine import Job, Row, SamplingParams, load_engine

    prompts = ["import os", "def parse(text, *, strict=True):", "x = [i * i for i in range(10)]", "class A:"]
    engine = load_engine(random_model_dir, device="cpu")
    jobs = [Job([Row(engine.encode(p), SamplingParams(max_tokens=12, temperature=0))]) for p in prompts]
    batch, texts = engine.start(jobs), [""] * len(jobs)
    while not batch.done:
        for j, out in enumerate(batch.step()):
            if out is not StopIteration:
                texts[j] += "".join(d.text for d in out)
    assert texts == [_reference(random_model_dir, p, 12) for p in prompts]
    assert len(set(texts)) == len(texts), texts


def test_chat_the_template_refuses_is_a_400_on_messages(served_model_dir: Path) -> None:
    from framework.serve import routes
    from framework.serve.protocol import APIError, ChatCompletionRequest
    from framework.serve.engine import load_engine

    engine = load_engine(served_model_dir, device="cpu")
    engine.tokenizer.chat_template = STRICT_TEMPLATE
    alternating = ChatCompletionRequest(model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}])
    assert routes.chat_job(alternating, engine, 16, MAX_BATCH).prompt_tokens > 0
    twice = ChatCompletionRequest(model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}])
    with pytest.raises(APIError) as refused:
        routes.chat_job(twice, engine, 16, MAX_BATCH)
    assert (refused.value.status, refused.value.param) == (400, "messages")
    assert "roles must alternate" in refused.value.message


def test_a_row_that_cannot_be_sampled_ends_only_its_request(served_model_dir: Path) -> None:
    from framework.serve.engine import Job, JobFailed, Row, SamplingParams, load_engine

    engine = load_engine(served_model_dir, device="cpu")
    prompt = engine.encode("import os")

    def decode(jobs: List[Job]) -> Tuple[List[str], List[Any]]:
        """Every job's text and its failure (None if it had none), one batch run to the end."""
        batch = engine.start(jobs)
        texts, failures = [""] * len(jobs), [None] * len(jobs)
        while not batch.done:
            for j, out in enumerate(batch.step()):
                if isinstance(out, JobFailed):
                    failures[j] = out.error
                elif out is not StopIteration:
                    texts[j] += "".join(d.text for d in out)
        return texts, failures

    greedy = lambda: Row(prompt, SamplingParams(max_tokens=8, temperature=0))  # noqa: E731
    (alone,), _ = decode([Job([greedy()])])
    # A seed past what torch's generator takes (the schema refuses it; the engine must survive it anyway).
    bad = Row(prompt, SamplingParams(max_tokens=8, temperature=1.0, seed=2**64))
    texts, failures = decode([Job([greedy(), bad]), Job([greedy()])])
    assert isinstance(failures[0], ValueError) and texts[0] == ""
    assert failures[1] is None and texts[1] == alone


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
