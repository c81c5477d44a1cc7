"""Chat task sets: JSONL conversations sent to /v1/chat/completions (greedy), each answer scored against a reference.

A record is {"messages": [...], <field>: reference} or {"prompt": "...", <field>: reference} (the prompt sent as
the user's turn); the server lays the conversation out with the model's chat template, as it does for any
client. Scoring uses the reward functions GRPO trains on (framework/rl/rewards.py), so "last_number" is the
same number in a reward curve and in eval.json. The score is the mean over records, its standard error the
sample standard deviation over √n (as lm-eval reports a mean's).
"""

from __future__ import annotations

import json
import math
import statistics
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, List, Optional

from framework.config import ConfigError, RunError


def read_records(path: str, key: str, field: str) -> List[Dict[str, Any]]:
    records = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as exc:
                raise ConfigError(f"{key}.path={path}: line {number} is not JSON ({exc})") from None
            if not isinstance(record, dict) or not ("messages" in record or "prompt" in record) or field not in record:
                raise ConfigError(f"{key}.path={path}: line {number}: expected an object with \"messages\" (or \"prompt\") "
                                  f"and \"{field}\"")
            records.append(record)
    if not records:
        raise ConfigError(f"{key}.path={path}: no records")
    return records


def scoring_function(scoring: str) -> Callable[..., List[Optional[float]]]:
    from hydra.utils import get_method

    return get_method(scoring if "." in scoring else f"framework.rl.rewards.{scoring}")


def answer(url: str, model_id: str, messages: List[Dict[str, Any]], max_tokens: int, api_key: Optional[str]) -> str:
    import requests

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    body = {"model": model_id, "messages": messages, "max_tokens": max_tokens, "temperature": 0}
    response = requests.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=600)
    if response.status_code != 200:
        raise RunError(f"{url}/v1/chat/completions answered {response.status_code}: {response.text[:300]}")
    return response.json()["choices"][0]["message"]["content"] or ""


def run_chat_set(url: str, model_id: str, name: str, path: str, scoring: str, field: str, *, max_tokens: int,
                 num_concurrent: int, limit: Optional[int], api_key: Optional[str]) -> Dict[str, Dict[str, Any]]:
    """The set's score as {value, stderr, count, ...} under `eval/<name>/<scoring>`, with the answers it scored."""
    records = read_records(path, f"eval.chat_sets.{name}", field)[:limit]
    conversations = [r["messages"] if "messages" in r else [{"role": "user", "content": r["prompt"]}] for r in records]
    with ThreadPoolExecutor(num_concurrent) as pool:
        answers = list(pool.map(lambda m: answer(url, model_id, m, max_tokens, api_key), conversations))
    columns = {k: [r.get(k) for r in records] for k in {k for r in records for k in r} - {"messages", "prompt"}}
    prompts = [m[-1]["content"] if m else "" for m in conversations]
    try:
        values = scoring_function(scoring)(prompts, answers, [[] for _ in answers], field=field, **columns)
    except Exception as exc:  # noqa: BLE001 - a scoring failure is the set's, named in one line
        raise RunError(f"eval.chat_sets.{name}.scoring={scoring}: {type(exc).__name__}: {exc}") from None
    if len(values) != len(records) or any(v is None or not math.isfinite(float(v)) for v in values):
        raise RunError(f"eval.chat_sets.{name}.scoring={scoring}: expected a finite number for each of {len(records)} records")
    values = [float(v) for v in values]
    metric = scoring.rsplit(".", 1)[-1]
    return {f"eval/{name}/{metric}": {
        "value": statistics.fmean(values),
        "stderr": statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None,
        "count": len(values), "version": None, "n_shot": 0, "higher_is_better": True, "source": f"chat set {path}",
        "answers": answers,
    }}
