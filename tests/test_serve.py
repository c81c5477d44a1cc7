"""Serving behaviour on the real stack: Ray Serve LLM running vLLM's CPU build on a local cluster, HTTP on
localhost, the `openai` client, lm-evaluation-harness.

One application (the tiny model trained under ZeRO-3 by the shared fixture, exported, behind a sweep's
best.json, with an API key and small queue limits) is deployed once for the module and shared by every
test: one vLLM engine start. Prompt layout and config checks that need no engine are in test_serve_prompts.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest
import requests
from omegaconf import OmegaConf

from conftest import SERVE_API_KEY, SERVE_KEY_ENV, SERVE_MAX_REQUEST_BYTES, free_port, greedy_reference

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
# The served model's id: with serve.model_name unset, a best.json is served under its sweep's name.
MODEL_NAME = "tiny-sweep"
API_KEY, KEY_ENV, MAX_REQUEST_BYTES = SERVE_API_KEY, SERVE_KEY_ENV, SERVE_MAX_REQUEST_BYTES  # conftest sets the policy
# The trained tiny model's max positions (conf/model/tiny.yaml), so the context checks follow the model.
CONTEXT = OmegaConf.load(ROOT / "conf" / "model" / "tiny.yaml").hf_config.max_position_embeddings
# Small limits so that a burst of a few dozen requests overflows them. Requests wait in Serve's queue
# while the router picks a replica, so the queue must hold the 4 concurrent requests a test sends.
MAX_ONGOING, MAX_QUEUED, MAX_SEQUENCES = 4, 4, 4
# An adapter named in serve.adapters itself (a PEFT folder); the sweep's trials are served by serve.adapters_from.
DIRECT = "tiny-lora-direct"


@pytest.fixture(scope="module")
def served_model_dir(exports: Dict[int, str]) -> Path:
    """The Hugging Face folder served: the ZeRO-3 tiny run's final checkpoint, exported once for the session and
    verified (safetensors, the run's BPE with its ChatML template, generation config)."""
    return Path(exports[3])


@pytest.fixture(scope="module")
def lora_sweep(served_model_dir: Path, prepared_data: str, ray_session, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA sweep on the served folder (two learning rates, 10 steps each on the session's shards), then the same
    command with tune.export_trials=true: its tune.output_dir, whose trials/<trial>/ are each trial's merged export with
    its adapter/."""
    from conftest import VAL_FRACTION
    from framework.tune.plan import plan_sweep
    from framework.tune.runner import run_sweep

    root = tmp_path_factory.mktemp("lora-sweep")
    overrides = [
        "model=hf-local", "model/lora=default", f"model.pretrained_path={served_model_dir}", "deepspeed=zero1",
        f"data.output_dir={prepared_data}", "data.seq_len=64", f"data.val_fraction={VAL_FRACTION}", "run.num_workers=1",
        "run.max_steps=10", "run.global_batch_size=8", "run.micro_batch_size=8", "run.eval_interval=10",
        "run.checkpoint_interval=10", "run.max_failures=0", "optim.warmup_steps=0",
        "tune=grid", "~tune/space", '+tune.space.optim.lr="choice(1e-2,5e-2)"', "tune.scheduler=fifo", "tune.name=tiny-lora",
        f"tune.storage_path={root}", f"tune.output_dir={root / 'results'}", "tune.max_concurrent_trials=2",
        "tune.promote=false", "tune.verbose=0",
    ]
    run_sweep(plan_sweep(overrides))
    assert not (root / "results" / "trials").exists()
    # The same sweep again with tune.export_trials=true: resumed, nothing trained, every trial exported.
    again = run_sweep(plan_sweep(overrides + ["tune.export_trials=true"]))
    assert again.resumed and len(list((root / "results" / "trials").iterdir())) == 2
    return root / "results"


@pytest.fixture(scope="module")
def adapters(lora_sweep: Path) -> Dict[str, Tuple[Path, Path]]:
    """Each adapter id served → (its PEFT folder, its merged export): the sweep's trials by name, and DIRECT, the first
    trial's adapter folder named in serve.adapters."""
    trials = sorted(p for p in (lora_sweep / "trials").iterdir() if p.is_dir())
    assert len(trials) == 2
    return {DIRECT: (trials[0] / "adapter", trials[0]), **{t.name: (t / "adapter", t) for t in trials}}


@pytest.fixture(scope="module")
def server(served_model_dir: Path, lora_sweep: Path, adapters: Dict[str, Tuple[Path, Path]], tmp_path_factory: pytest.TempPathFactory):
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
        "model_path": str(best), "host": "127.0.0.1", "port": free_port(),
        "api_key_env": KEY_ENV, "app_name": "test-serve", "min_replicas": 1, "max_replicas": 1,
        "max_ongoing_requests": MAX_ONGOING, "max_queued_requests": MAX_QUEUED, "max_sequences": MAX_SEQUENCES,
        "default_max_tokens": 16, "max_request_bytes": MAX_REQUEST_BYTES,
        "adapters": {DIRECT: str(adapters[DIRECT][0])}, "adapters_from": str(lora_sweep),
    })
    url = deploy(cfg)
    yield url
    serve.shutdown()
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def no_eos(served_model_dir: Path) -> Dict[str, float]:
    """A logit_bias that keeps the model from ending early, so that a request decodes all of its max_tokens."""
    from transformers import AutoTokenizer

    return {str(AutoTokenizer.from_pretrained(served_model_dir).eos_token_id): -100}


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


# ---------------------------------------------------------------------------------------------
# The OpenAI API

def test_openai_client_gets_completion_chat_and_stream(server: str, served_model_dir: Path, adapters: Dict[str, Tuple[Path, Path]]) -> None:
    client = _client(server)
    assert [m.id for m in client.models.list().data] == [MODEL_NAME, *sorted(adapters)]

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
    assert greedy[0] == greedy_reference(served_model_dir, prompt, 24)

    sampled = [
        [c.text for c in client.completions.create(
            model=MODEL_NAME, prompt=prompt, max_tokens=24, temperature=1.0, top_p=0.9, seed=11, n=2).choices]
        for _ in range(2)
    ]
    assert sampled[0] == sampled[1]  # same seed, same text
    assert sampled[0][0] != sampled[0][1]  # choice i samples with seed + i
    assert sampled[0][0] != greedy[0]


def test_each_adapter_is_its_own_model_and_answers_as_its_merged_export(server: str, adapters: Dict[str, Tuple[Path, Path]]) -> None:
    """Multi-LoRA on one base: every trial of a LoRA sweep (serve.adapters_from) and an adapter named in serve.adapters
    are models of their own; a request for one gives the greedy text of its merged export."""
    client = _client(server)
    prompt = "def wrap(text):"
    texts = {}
    for name, (_, merged) in adapters.items():
        assert client.models.retrieve(name).id == name
        texts[name] = client.completions.create(model=name, prompt=prompt, max_tokens=12, temperature=0).choices[0].text
        assert texts[name] == greedy_reference(merged, prompt, 12), name
    # The base and the two trials are three models: their log-probs of the same greedy tokens differ (a short run's
    # greedy texts may all be one repeated character).
    def logprobs(model: str) -> tuple:
        choice = client.completions.create(model=model, prompt=prompt, max_tokens=4, temperature=0, logprobs=1).choices[0]
        return tuple(round(x, 4) for x in choice.logprobs.token_logprobs)

    trials = sorted(set(adapters) - {DIRECT})
    assert len({logprobs(model) for model in (MODEL_NAME, *trials)}) == 3
    assert texts[DIRECT] == texts[trials[0]] and logprobs(DIRECT) == logprobs(trials[0])  # one adapter, two ids
    chat = client.chat.completions.create(model=DIRECT, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0)
    assert chat.model == DIRECT and chat.usage.completion_tokens >= 1


def test_a_sweeps_adapters_must_have_trained_on_the_served_base(lora_sweep: Path, served_model_dir: Path, exports: Dict[int, str],
                                                                tmp_path: Path) -> None:
    """serve.adapters_from on another base, on a folder that is no sweep's, with a trial exported without its adapter,
    or beside a serve.adapters id it also serves, fails before Ray in one line."""
    from framework.config import ConfigError
    from framework.serve.config import compose_serve_config

    with pytest.raises(ConfigError, match=r"^serve.adapters_from=.*: trial \S+'s adapter trained on .*, not on the served base "):
        compose_serve_config({"model_path": exports[1], "adapters_from": str(lora_sweep)})
    with pytest.raises(ConfigError, match=r"^serve.adapters_from=.*: expected a sweep's tune.output_dir holding trials/"):
        compose_serve_config({"model_path": exports[1], "adapters_from": exports[1]})
    trial = sorted((lora_sweep / "trials").iterdir())[0]
    with pytest.raises(ConfigError, match=rf"^serve.adapters.{trial.name}=.*: serve.adapters_from=.* serves trial {trial.name} under this id already"):
        compose_serve_config({"model_path": str(served_model_dir), "adapters_from": str(lora_sweep),
                              "adapters": {trial.name: str(trial / "adapter")}})
    copy = tmp_path / "results"
    shutil.copytree(lora_sweep, copy)
    shutil.rmtree(copy / "trials" / trial.name / "adapter")
    with pytest.raises(ConfigError, match=rf"^serve.adapters_from=.*: trial {trial.name} has no adapter/adapter_config.json"):
        compose_serve_config({"model_path": str(served_model_dir), "adapters_from": str(copy)})


def _stop_inside(text: str) -> str:
    """A two-character piece of `text` that first occurs past its start (so the cut text is not empty)."""
    for k in range(1, len(text) - 1):
        if text.find(text[k : k + 2]) == k:
            return text[k : k + 2]
    raise AssertionError(f"greedy text has no usable stop string: {text!r}")


def test_stop_string_cuts_the_text_before_it(server: str) -> None:
    # Seeded sampling, not greedy: the 20-step tiny model's greedy text can be one character repeated.
    client = _client(server)
    full = client.completions.create(model=MODEL_NAME, prompt="def f(x):", max_tokens=24, temperature=1.0, seed=7).choices[0]
    stop = _stop_inside(full.text)
    cut = client.completions.create(model=MODEL_NAME, prompt="def f(x):", max_tokens=24, temperature=1.0, seed=7, stop=[stop])
    assert cut.choices[0].text == full.text[: full.text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_concurrent_requests_match_the_same_requests_sent_one_by_one(server: str) -> None:
    prompts = ["import re", "def main():", "x = 1", "for i in range(3):"]
    body = lambda p: {"model": MODEL_NAME, "prompt": p, "max_tokens": 16, "temperature": 0}  # noqa: E731
    alone = [_post(server, "/v1/completions", body(p)).json()["choices"][0]["text"] for p in prompts]
    results = asyncio.run(_concurrently(server, "/v1/completions", [body(p) for p in prompts]))
    assert [status for status, _ in results] == [200] * len(prompts)
    assert [r["choices"][0]["text"] for _, r in results] == alone  # sharing the decode changes nothing


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


def test_extreme_sampling_values_are_served_or_refused_and_spare_their_neighbours(server: str) -> None:
    body = lambda **kw: {"model": MODEL_NAME, "prompt": "import os", "max_tokens": 8, **kw}  # noqa: E731
    greedy = _post(server, "/v1/completions", body(temperature=0)).json()["choices"][0]["text"]
    # Past OpenAI's int64 seed: refused, not a sampler crash.
    refused = _post(server, "/v1/completions", body(temperature=1.0, seed=2**64))
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "seed", refused.text
    # Four at once (what the queue limits hold), so that they decode together.
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


# ---------------------------------------------------------------------------------------------
# logprobs, echo, the sampling fields, lm-evaluation-harness

def _log_softmax(folder: Path, ids: List[int]):  # noqa: ANN202 - a [len(ids), vocab] tensor
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


def test_completion_logprobs_and_echo_equal_transformers_log_softmax(server: str, served_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(served_model_dir)
    client = _client(server)
    prompt = "def wrap(text, width):"
    ids = tokenizer(prompt)["input_ids"]
    scored = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=0, echo=True, logprobs=2)
    [choice] = scored.choices
    assert choice.text == prompt and scored.usage.completion_tokens == 0
    expected = _log_softmax(served_model_dir, ids)
    logprobs = choice.logprobs
    assert len(logprobs.tokens) == len(ids) and logprobs.token_logprobs[0] is None
    for i in range(1, len(ids)):
        assert logprobs.token_logprobs[i] == pytest.approx(float(expected[i - 1, ids[i]]), abs=1e-4)
        top = dict(logprobs.top_logprobs[i])
        best = int(expected[i - 1].argmax())
        assert top[tokenizer.decode([best])] == pytest.approx(float(expected[i - 1, best]), abs=1e-4)

    generated = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=5, temperature=0, logprobs=2)
    lp = generated.choices[0].logprobs
    assert len(lp.tokens) == generated.usage.completion_tokens
    continuation = tokenizer(prompt + generated.choices[0].text)["input_ids"]
    expected = _log_softmax(served_model_dir, continuation)
    first = float(expected[len(ids) - 1].max())  # greedy: the first token is the most likely one
    assert lp.token_logprobs[0] == pytest.approx(first, abs=1e-4)
    assert max(lp.top_logprobs[0].values()) == pytest.approx(first, abs=1e-4)


def test_prompts_scored_beside_other_requests_on_a_lora_server_are_scored_as_alone(server: str, no_eos: Dict[str, float]) -> None:
    """vLLM 0.29's CPU LoRA kernels fail a batch that mixes a prompt being scored with other requests (the engine
    dies); the ingress runs a scoring request alone (framework/serve/gate.py): every request of a mixed burst is
    served, and each score is the one the prompt gets on its own."""
    # Four requests at once (two scored, a base and an adapter generation): MAX_ONGOING, so none waits in Serve's queue,
    # which requests of earlier tests still finishing can fill on a loaded machine (six met a 503 there).
    prompts = ["def wrap(text, width):", "import os\nimport sys\n"]
    alone = [_post(server, "/v1/completions", {"model": MODEL_NAME, "prompt": p, "max_tokens": 0, "echo": True, "logprobs": 0}).json()
             for p in prompts]
    bodies = []
    for i, p in enumerate(prompts):
        bodies.append({"model": MODEL_NAME, "prompt": p, "max_tokens": 0, "echo": True, "logprobs": 0})
        bodies.append({"model": DIRECT if i else MODEL_NAME, "prompt": p, "max_tokens": 24, "logit_bias": no_eos})
    results = asyncio.run(_concurrently(server, "/v1/completions", bodies))
    assert [status for status, _ in results] == [200] * len(bodies), results
    for i in range(len(prompts)):
        got, want = results[2 * i][1]["choices"][0]["logprobs"], alone[i]["choices"][0]["logprobs"]
        assert got["tokens"] == want["tokens"]
        assert got["token_logprobs"][1:] == pytest.approx(want["token_logprobs"][1:], abs=1e-4)
    assert _post(server, "/v1/completions", {"model": MODEL_NAME, "prompt": "x", "max_tokens": 0, "echo": True, "logprobs": 0,
                                             "n": 2}).status_code == 400
    assert requests.get(server + "/health", timeout=60).status_code == 200


def test_chat_logprobs_carry_top_logprobs(server: str) -> None:
    chat = _client(server).chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0,
        logprobs=True, top_logprobs=3,
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    for token in content:
        assert len(token.top_logprobs) == 3
        assert token.logprob == pytest.approx(token.top_logprobs[0].logprob, abs=1e-6)  # greedy
        assert bytes(token.bytes).decode("utf-8", errors="replace") == token.token


def test_logit_bias_and_penalties_change_the_greedy_text(server: str, served_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(served_model_dir)
    body = {"model": MODEL_NAME, "prompt": "def f(x):", "max_tokens": 6, "temperature": 0}
    plain = _post(server, "/v1/completions", body).json()["choices"][0]["text"]
    forced_id = tokenizer(" return", add_special_tokens=False)["input_ids"][0]
    forced = _post(server, "/v1/completions", {**body, "logit_bias": {str(forced_id): 100}}).json()
    assert forced["choices"][0]["text"] == tokenizer.decode([forced_id] * 6)
    penalised = _post(server, "/v1/completions", {**body, "max_tokens": 16, "frequency_penalty": 2.0}).json()
    unpenalised = _post(server, "/v1/completions", {**body, "max_tokens": 16}).json()
    assert penalised["choices"][0]["text"] != unpenalised["choices"][0]["text"], plain


LM_EVAL_TASKS = ROOT / "tests" / "data" / "lm_eval"


def test_lm_evaluation_harness_scores_the_served_model(server: str, served_model_dir: Path, tmp_path: Path) -> None:
    """`lm_eval --model local-completions` by hand: a loglikelihood task (echo + logprobs) and a generate_until task;
    then launch/eval.py against the same endpoint (its key from the environment) gives the same scores."""
    from framework.evaluation.config import EVAL
    from framework.evaluation.job import run_eval

    model_args = ",".join([
        f"model={MODEL_NAME}", f"base_url={server}/v1/completions", "tokenizer_backend=huggingface",
        f"tokenizer={served_model_dir}", "num_concurrent=2", "max_retries=1", f"max_length={CONTEXT}",
    ])
    env = {**os.environ, "OPENAI_API_KEY": API_KEY, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args", model_args,
         "--tasks", "serve_snippets_choice,serve_snippets_generate", "--include_path", str(LM_EVAL_TASKS),
         "--output_path", str(tmp_path / "results")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    [results_file] = (tmp_path / "results").rglob("results_*.json")
    scores = json.loads(results_file.read_text())["results"]
    assert 0.0 <= scores["serve_snippets_choice"]["acc,none"] <= 1.0
    assert 0.0 <= scores["serve_snippets_generate"]["exact_match,none"] <= 1.0

    [record] = run_eval(EVAL.from_overrides([
        f"eval.model={server}", "eval.perplexity=false", f"eval.tokenizer={served_model_dir}", f"eval.api_key_env={KEY_ENV}",
        f"eval.output={tmp_path / 'served.json'}", f"eval.include_path={LM_EVAL_TASKS}",
        "eval.tasks=[serve_snippets_choice,serve_snippets_generate]",
        f"+eval.chat_sets.arith={{path: {ROOT / 'tests' / 'data' / 'arith_chat.jsonl'}, scoring: last_number, field: answer}}",
    ]))
    written = json.loads((tmp_path / "served.json").read_text())
    assert written["scores"].keys() == record["scores"].keys() and written["model_id"] == MODEL_NAME
    assert written["scores"]["eval/serve_snippets_choice/acc"]["value"] == scores["serve_snippets_choice"]["acc,none"]
    assert written["scores"]["eval/serve_snippets_generate/exact_match"]["value"] == scores["serve_snippets_generate"]["exact_match,none"]
    assert written["scores"]["eval/arith/last_number"]["count"] == 4

    # A task lm-eval does not know is refused by name, before any request (the task index for this include_path is
    # built by now: lm-eval's own index costs 12 s per process).
    from framework.config import ConfigError

    with pytest.raises(ConfigError, match=r"^eval.tasks=no_such_task: lm-eval knows no such task \(nor is it under .*lm_eval\)"):
        EVAL.from_overrides([f"eval.model={server}", "eval.perplexity=false", f"eval.tokenizer={served_model_dir}",
                             f"eval.output={tmp_path / 'x.json'}", f"eval.include_path={LM_EVAL_TASKS}", "eval.tasks=[no_such_task]"])


# ---------------------------------------------------------------------------------------------
# Keys, probes, health

def test_the_key_from_the_environment_is_stripped(server: str) -> None:
    assert os.environ[KEY_ENV].endswith("\n")  # as a Secret made from a file gives it
    assert requests.get(server + "/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30).status_code == 200


def test_only_the_health_route_is_open_without_the_key(server: str) -> None:
    from framework.serve.ingress import route_path

    assert requests.get(server + "/health", timeout=10).status_code == 200
    for path in ("/v1/models/health", "/v1/health", "/health/x"):
        response = requests.get(server + path, timeout=10)
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key", path
    # Under a route prefix a replica sees it in root_path, and path keeps it (ASGI); the proxy sees the path alone.
    assert route_path({"path": "/llm/health", "root_path": "/llm"}) == "/health"
    assert route_path({"path": "/llm/v1/models/health", "root_path": "/llm"}) == "/v1/models/health"
    assert route_path({"path": "/llm/health"}, "/llm") == "/health"
    assert route_path({"path": "/llmx/health"}, "/llm") == "/llmx/health"


def test_health_check_runs_on_the_live_engine(server: str) -> None:
    from ray import serve

    # What Serve calls every few seconds on the engine's replica (vLLM's own check), called the same way.
    llm = serve.get_deployment_handle("LLMServer:engine", "test-serve")
    assert llm.check_health.remote().result(timeout_s=60) is None
    assert requests.get(server + "/health", timeout=30).json() == {"status": "ok", "model": MODEL_NAME}


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
    ("empty stop string", "/v1/completions", {"model": MODEL_NAME, "prompt": "a", "stop": [""]}, API_KEY, 400, "stop", None),
    ("unsupported field", "/v1/chat/completions", {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, API_KEY, 400, "tools", "unsupported_parameter"),
    ("unsupported completion field", "/v1/completions", {"model": MODEL_NAME, "prompt": "a", "suffix": "b"}, API_KEY, 400, "suffix", "unsupported_parameter"),
    ("logprobs past 5", "/v1/completions", {"model": MODEL_NAME, "prompt": "a", "logprobs": 6}, API_KEY, 400, "logprobs", None),
    ("max_tokens 0 without echo", "/v1/completions", {"model": MODEL_NAME, "prompt": "a", "max_tokens": 0}, API_KEY, 400, "max_tokens", None),
    ("top_logprobs without logprobs", "/v1/chat/completions", {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, API_KEY, 400, "top_logprobs", None),
    ("logit_bias on no token", "/v1/completions", {"model": MODEL_NAME, "prompt": "a", "logit_bias": {"x": 1}}, API_KEY, 400, "logit_bias", None),
    ("logit_bias on a digit that is no integer", "/v1/completions", {"model": MODEL_NAME, "prompt": "a", "logit_bias": {"\u00b2": 1}}, API_KEY, 400, "logit_bias", None),
    ("a participant's name", "/v1/chat/completions", {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi", "name": "ann"}]}, API_KEY, 400, "messages[0].name", "unsupported_parameter"),
    ("stream_options without stream", "/v1/completions", {"model": MODEL_NAME, "prompt": "a", "stream_options": {"include_usage": True}}, API_KEY, 400, None, None),
    ("penalty out of range", "/v1/completions", {"model": MODEL_NAME, "prompt": "a", "presence_penalty": 3}, API_KEY, 400, "presence_penalty", None),
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


def _stream_lines(url: str, body: Dict[str, Any], first_line: threading.Event, lines: List[str], key: str | None = API_KEY) -> None:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    with requests.post(url + "/v1/completions", json=body, headers=headers, stream=True, timeout=120) as response:
        for line in response.iter_lines(decode_unicode=True):
            if line:
                lines.append(line)
                first_line.set()


def test_a_huge_body_is_refused_413_while_streams_go_on(server: str) -> None:
    """A 50 MB prompt is refused by its size before anyone reads or tokenises it; a running stream is untouched."""
    started, lines = threading.Event(), []
    body = {"model": MODEL_NAME, "prompt": "def f(x):", "max_tokens": 64, "temperature": 0, "stream": True}
    stream = threading.Thread(target=_stream_lines, args=(server, body, started, lines))
    stream.start()
    assert started.wait(60)
    huge = json.dumps({"model": MODEL_NAME, "prompt": "x" * 50_000_000}).encode()
    refused = _post(server, "/v1/completions", raw=huge)
    stream.join(120)
    assert refused.status_code == 413 and refused.json()["error"]["code"] == "request_too_large"
    assert lines[-1] == "data: [DONE]" and json.loads(lines[-2][6:])["choices"][0]["finish_reason"] in ("stop", "length")
    # Under the body limit but over what the context holds, counted in characters: refused before tokenising.
    chars = _post(server, "/v1/completions", {"model": MODEL_NAME, "prompt": "x" * (MAX_REQUEST_BYTES // 2)})
    assert chars.status_code == 400 and "characters" in chars.json()["error"]["message"]


def test_burst_past_queue_limit_is_rejected_at_once_and_server_recovers(server: str, no_eos: Dict[str, float]) -> None:
    burst = 32  # far more than MAX_ONGOING + MAX_QUEUED

    async def fire() -> List[Tuple[int, int]]:
        import aiohttp

        finished: List[int] = []
        body = {"model": MODEL_NAME, "prompt": "def f(x):", "max_tokens": 48, "temperature": 0, "logit_bias": no_eos}
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {API_KEY}"}) as session:
            async def one(i: int) -> Tuple[int, int]:
                async with session.post(server + "/v1/completions", json=body) as r:
                    await r.read()
                    finished.append(i)
                    return r.status, i

            statuses = await asyncio.gather(*(one(i) for i in range(burst)))
        order = {i: k for k, i in enumerate(finished)}
        return [(status, order[i]) for status, i in statuses]

    results = asyncio.run(fire())
    served = [k for status, k in results if status == 200]
    rejected = [k for status, k in results if status in (429, 503)]
    assert len(served) + len(rejected) == burst, results
    assert len(served) >= 1 and len(rejected) >= burst - (MAX_ONGOING + MAX_QUEUED) * 2
    # Refused at once, not after waiting for work: every refusal came back before the first decoded request did.
    assert max(rejected) < min(served), results
    assert requests.get(server + "/health", timeout=10).status_code == 200
    ok = _post(server, "/v1/completions", {"model": MODEL_NAME, "prompt": "a", "max_tokens": 2})
    assert ok.status_code == 200


def test_client_that_disconnects_stops_costing(server: str, no_eos: Dict[str, float]) -> None:
    """The engine aborts a stream's request when its client goes: counted as cancelled, it ends before its max_tokens."""
    max_tokens = CONTEXT - 16
    body = {"model": MODEL_NAME, "prompt": "def f(x):", "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "logit_bias": no_eos}  # no early end: it would decode all of max_tokens
    cancelled, tokens = "ray_llm_cancelled_requests_total", "ray_vllm_generation_tokens_total"
    assert _post(server, "/v1/completions", {"model": MODEL_NAME, "prompt": "a", "max_tokens": 2}).status_code == 200
    before = _scrape_until(lambda m: tokens in m)
    for _ in range(20):  # until every earlier request's tokens have been exported (Ray exports every few seconds)
        time.sleep(6)
        now = _scrape_until(lambda m: tokens in m)
        if now[tokens] == before[tokens]:
            break
        before = now
    with requests.post(server + "/v1/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"},
                       stream=True, timeout=60) as response:
        next(response.iter_lines())  # the first event: decoding has started
    after = _scrape_until(lambda m: m.get(cancelled, 0) >= before.get(cancelled, 0) + 1)
    assert after.get(cancelled, 0) == before.get(cancelled, 0) + 1
    # Long enough for the whole request to have decoded had it not been aborted; then the engine's count.
    for _ in range(3):
        time.sleep(5)
        latest = _scrape_until(lambda m: tokens in m)
    # Aborted before its end. (How far it got depends on how soon the cancellation reaches the engine: on the
    # loaded 2-core VM a 512-token request was stopped after 465.)
    assert latest[tokens] - before[tokens] < max_tokens


def _scrape() -> Dict[str, float]:
    """Ray's Prometheus endpoint on this node: every ray_llm_*, ray_serve_* and ray_vllm* sample summed over its labels
    but `reason`, by name (and name{reason=...})."""
    import ray
    from prometheus_client.parser import text_string_to_metric_families

    [node] = [n for n in ray.nodes() if n["Alive"]]
    text = requests.get(f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics", timeout=10).text
    totals: Dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith(("ray_llm_", "ray_serve_", "ray_vllm")):
                names = [sample.name] + [f"{sample.name}{{{label}={sample.labels[label]}}}"
                                         for label in ("reason", "finished_reason") if label in sample.labels]
                for name in names:
                    totals[name] = totals.get(name, 0.0) + sample.value
    return totals


def _scrape_until(check) -> Dict[str, float]:  # noqa: ANN001 - Ray exports application metrics every few seconds
    for _ in range(60):
        metrics = _scrape()
        if check(metrics):
            return metrics
        time.sleep(1)
    return metrics


# vLLM's engine metrics as Ray Serve LLM exports them (docs/serving.md lists them; k8s/grafana-dashboard.json charts them).
ENGINE_HISTOGRAMS = ("ray_vllm_time_to_first_token_seconds", "ray_vllm_e2e_request_latency_seconds",
                     "ray_vllm_inter_token_latency_seconds")
# vLLM's gauges, set from the engine's scheduler stats after its steps.
ENGINE_GAUGES = ("ray_vllm_num_requests_running", "ray_vllm_num_requests_waiting", "ray_vllm_kv_cache_usage_perc")


def test_serving_metrics_reach_the_prometheus_endpoint(server: str, no_eos: Dict[str, float]) -> None:
    body = {"model": MODEL_NAME, "prompt": "import os", "max_tokens": 8, "temperature": 0, "logit_bias": no_eos}
    assert _post(server, "/v1/completions", body).status_code == 200
    tokens = "ray_vllm_generation_tokens_total"
    before = _scrape_until(lambda m: m.get(tokens, 0) > 0 and all(f"{h}_count" in m for h in ENGINE_HISTOGRAMS))
    for _ in range(3):
        assert _post(server, "/v1/completions", body).status_code == 200
    assert _post(server, "/v1/completions", {**body, "temperature": "hot"}).status_code == 400
    after = _scrape_until(lambda m: m.get(tokens, 0) >= before[tokens] + 24
                          and m.get("ray_llm_refused_requests_total{reason=invalid_value}", 0) >= 1
                          and all(m.get(f"{h}_count", 0) >= before[f"{h}_count"] + 3 for h in ENGINE_HISTOGRAMS[:2]))
    assert after[tokens] - before[tokens] >= 24
    assert after["ray_vllm_prompt_tokens_total"] > before["ray_vllm_prompt_tokens_total"]
    for histogram in ENGINE_HISTOGRAMS[:2]:
        assert after[f"{histogram}_count"] >= before[f"{histogram}_count"] + 3
    assert after["ray_vllm_inter_token_latency_seconds_count"] > before["ray_vllm_inter_token_latency_seconds_count"]
    assert after["ray_llm_refused_requests_total{reason=invalid_value}"] >= 1
    assert after["ray_vllm_request_success_total{finished_reason=length}"] >= before.get("ray_vllm_request_success_total{finished_reason=length}", 0) + 3
    # The gauges of running and waiting requests and of KV-cache use reach the endpoint too (one engine: a share ≤ 1).
    gauges = _scrape_until(lambda m: all(g in m for g in ENGINE_GAUGES))
    assert all(g in gauges for g in ENGINE_GAUGES), sorted(gauges)
    assert gauges["ray_vllm_num_requests_running"] >= 0 and gauges["ray_vllm_num_requests_waiting"] >= 0
    assert 0 <= gauges["ray_vllm_kv_cache_usage_perc"] <= 1


def test_requests_without_the_key_are_refused_at_the_proxy_before_a_queue_place(server: str) -> None:
    """Counted on both sides: the proxy refuses them, and no replica ever sees one (none is routed to it)."""
    proxy, replica = "ray_llm_ingress_refused_requests_total", "ray_llm_refused_requests_total{reason=invalid_api_key}"
    before = _scrape()
    for _ in range(20):
        response = _post(server, "/v1/completions", {"model": MODEL_NAME, "prompt": "a", "max_tokens": 2}, key=None)
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    after = _scrape_until(lambda m: m.get(proxy, 0) >= before.get(proxy, 0) + 20)
    assert after.get(proxy, 0) - before.get(proxy, 0) >= 20
    # Every request without the key in this module met the proxy first: the replica's count stays at none.
    assert after.get(replica, 0) == 0 and "ray_llm_refused_requests_total" in after


# (SIGTERM draining is tested in test_compress.py, on the one launch/serve.py process the suite starts.)

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
    from framework.serve.config import SERVE

    broken = tmp_path / "broken"
    shutil.copytree(served_model_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # a truncated export
    with pytest.raises(ConfigError, match="model.safetensors: corrupt or missing weights"):
        SERVE.from_overrides([f"serve.model_path={broken}"])

    (broken / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json: unreadable model config"):
        SERVE.from_overrides([f"serve.model_path={broken}"])

    best = tmp_path / "best.json"
    best.write_text(json.dumps({"trial": "t1", "metric": "loss", "value": 2.0, "overrides": []}))
    result = _launch(f"serve.model_path={best}")
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0
    assert "best.json" in result.stderr and '"path"' in result.stderr


def test_a_context_longer_than_the_model_fails_in_one_line(served_model_dir: Path) -> None:
    result = _launch(f"serve.model_path={served_model_dir}", f"serve.max_model_len={CONTEXT + 1}")
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0
    assert result.stderr.startswith(f"ConfigError: serve.max_model_len={CONTEXT + 1}:") and str(CONTEXT) in result.stderr


def test_the_engine_of_a_local_folder_starts_without_ray_serve_llms_download_task(server: str) -> None:
    """Ray Serve LLM runs a "download" task before each engine (a new process in the engine's environment that imports
    torch and transformers, and for a local folder returns its path); framework/serve/callbacks.py skips it. The
    engine replica's log says which executor it started and never that it ran the download tasks."""
    import ray

    logs = Path(ray._private.worker._global_node.get_logs_dir_path()) / "serve"
    text = "".join(p.read_text() for p in logs.glob("replica_test-serve_LLMServer_*.log"))
    assert "Using executor class" in text
    assert "download model files" not in text


def test_the_engine_and_deployments_take_resources_autoscaling_and_limits_from_config(served_model_dir: Path) -> None:
    from framework.serve.app import config_from_args
    from framework.serve.llm import llm_config

    cpu_cfg = config_from_args({"model_path": str(served_model_dir), "kv_cache_gib": "3"})
    cpu = llm_config(cpu_cfg, served_model_dir, "m")
    assert cpu.accelerator_config.kind == "cpu" and cpu.placement_group_config == {"bundles": [{"CPU": 1.0}]}
    assert cpu.runtime_env["env_vars"]["VLLM_CPU_KVCACHE_SPACE"] == "3"
    assert (cpu.engine_kwargs["dtype"], cpu.engine_kwargs["max_num_seqs"], cpu.engine_kwargs["enforce_eager"]) == ("float32", 16, True)
    gpu_cfg = config_from_args({"preset": "gpu", "model_path": str(served_model_dir), "max_replicas": "6"})
    gpu = llm_config(gpu_cfg, served_model_dir, "m")
    assert gpu.placement_group_config == {"bundles": [{"CPU": 2.0, "GPU": 1.0}]} and gpu.engine_kwargs["dtype"] == "bfloat16"
    assert gpu.engine_kwargs["gpu_memory_utilization"] == gpu_cfg.gpu_memory_utilization and gpu.runtime_env["env_vars"] == {}
    autoscaling = gpu.deployment_config["autoscaling_config"]
    assert (autoscaling["min_replicas"], autoscaling["max_replicas"], autoscaling["target_ongoing_requests"]) == (1, 6, 24)
    assert gpu.deployment_config["max_ongoing_requests"] == gpu_cfg.max_ongoing_requests
    assert gpu.deployment_config["max_queued_requests"] == gpu_cfg.max_queued_requests
    assert gpu.deployment_config["backpressure_config"] == {"status_code": gpu_cfg.backpressure_status}
    assert gpu.deployment_config["graceful_shutdown_timeout_s"] == gpu_cfg.drain_timeout_s
    assert (cpu.experimental_configs["stream_batching_interval_ms"], gpu.experimental_configs["stream_batching_interval_ms"]) == (0, 50)
