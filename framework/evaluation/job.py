"""launch/eval.py: score each model (perplexity in-process; lm-eval tasks and chat sets through a serving engine),
write each folder's eval.json, print one table, and plot the comparison.

A folder's tasks run through the project's own serving engine: the Ray Serve LLM application of
framework/serve/app.py (vLLM) deployed for the evaluation on a free port, with one replica, and deleted after
it; so a score is what a client of `launch/serve.py` would get. An endpoint is evaluated as it is served.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

from framework.cluster import free_port
from framework.config import RunError
from framework.evaluation.chat import run_chat_set
from framework.evaluation.config import EvalConfig, EvalPlan, Target, read_scores
from framework.evaluation.harness import lm_eval_version, run_tasks
from framework.evaluation.report import plot, print_table, write_scores

# The application name an evaluation deploys under (a serve of the user's on the same cluster keeps its own).
APP_NAME = "eval"


@contextlib.contextmanager
def engine(target: Target, c: EvalConfig) -> Iterator[Tuple[str, str]]:
    """(base URL, model id) of the serving engine for a folder, deployed for the block and deleted after it."""
    from ray import serve

    from framework.cluster import connect
    from framework.serve.app import deploy, served_model_id
    from framework.serve.config import compose_serve_config

    from framework.serve.ingress import ingress_environment

    cfg = compose_serve_config({"preset": c.serve_preset, "model_path": str(target.folder), "host": "127.0.0.1",
                                "port": free_port(), "app_name": APP_NAME, "route_prefix": "/", "api_key_env": None,
                                "min_replicas": 1, "max_replicas": 1})
    # The proxies of a local cluster started here apply this application's checks (no key), whatever the environment
    # this process inherited says (launch/serve.py sets the same variables the same way).
    os.environ.update(ingress_environment(cfg.api_key_env, cfg.route_prefix, cfg.max_request_bytes))
    connect(c.ray_address)
    deploy(cfg)
    # Serve may have been running on the cluster already, with its own proxy port: ask it which port it listens on.
    from ray.serve.context import _get_global_client

    url = f"http://127.0.0.1:{_get_global_client().http_config.port}"
    try:
        yield url, served_model_id(cfg)
    finally:
        serve.delete(APP_NAME)


def endpoint_model(url: str, c: EvalConfig, api_key: Optional[str]) -> str:
    """The model id to ask an endpoint for: eval.model_name, or the first its /v1/models lists."""
    import requests

    if c.model_name:
        return c.model_name
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    response = requests.get(f"{url}/v1/models", headers=headers, timeout=30)
    if response.status_code != 200:
        raise RunError(f"{url}/v1/models answered {response.status_code}: {response.text[:200]}")
    return response.json()["data"][0]["id"]


def served_scores(url: str, model_id: str, tokenizer: str, max_length: int, c: EvalConfig,
                  api_key: Optional[str]) -> Dict[str, Dict[str, Any]]:
    scores: Dict[str, Dict[str, Any]] = {}
    if c.tasks:
        scores.update(run_tasks(url, model_id, tokenizer, c.tasks, include_path=c.include_path, num_fewshot=c.num_fewshot,
                                limit=c.limit, num_concurrent=c.num_concurrent, max_length=max_length, api_key=api_key))
    for name, chat in c.chat_sets.items():
        scores.update(run_chat_set(url, model_id, name, chat.path, chat.scoring, chat.field, max_tokens=c.max_tokens,
                                   num_concurrent=c.num_concurrent, limit=c.limit, api_key=api_key))
    return scores


def perplexity(target: Target, c: EvalConfig) -> Dict[str, Dict[str, Any]]:
    """val/loss and val/perplexity as training reports them (framework/evaluate.py), on the folder's shards."""
    from framework.data.sampler import evaluation_rows
    from framework.data.shards import read_manifest
    from framework.evaluate import evaluate_folder

    manifest = read_manifest(target.data_dir)
    rows = len(evaluation_rows(manifest["splits"]["validation"]["rows"], c.eval_rows, manifest["seed"]))
    metrics = evaluate_folder(str(target.folder), target.data_dir, c.eval_rows, c.micro_batch)
    return {name: {"value": value, "stderr": None, "count": rows, "version": None, "n_shot": None,
                   "higher_is_better": False, "source": f"shards {target.data_dir}"} for name, value in metrics.items()}


def evaluate(target: Target, c: EvalConfig) -> Dict[str, Any]:
    """The eval.json record of one model (read, for an eval.json in eval.compare)."""
    from framework.hf_folder import default_model_id, model_context

    if target.scores is not None:
        return read_scores(target.scores, target.key)
    from framework.serve.ingress import read_api_key

    api_key = read_api_key(c.api_key_env) if c.api_key_env else None  # stripped, as the server strips it
    scores: Dict[str, Dict[str, Any]] = {}
    engine_name = None
    if target.folder is not None:
        if c.perplexity:
            print(f"eval: {target.spec}: perplexity on {target.data_dir}", flush=True)
            scores.update(perplexity(target, c))
        if c.tasks or c.chat_sets:
            print(f"eval: {target.spec}: starting the serving engine (conf/serve/{c.serve_preset}.yaml)", flush=True)
            with engine(target, c) as (url, model_id):
                scores.update(served_scores(url, model_id, str(target.folder), model_context(target.folder), c, None))
            engine_name = f"Ray Serve LLM (vLLM), conf/serve/{c.serve_preset}.yaml"
    else:
        model_id = endpoint_model(target.url, c, api_key)
        tokenizer = c.tokenizer or ""
        context = model_context(Path(tokenizer)) if tokenizer and (Path(tokenizer) / "config.json").is_file() else 2048
        scores.update(served_scores(target.url, model_id, tokenizer, context, c, api_key))
        engine_name = target.url
    model_id = default_model_id(target.spec) if target.folder is not None else model_id
    return {
        "model": str(target.folder or target.url), "model_id": model_id, "spec": target.spec,
        "evaluated": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "engine": engine_name, "lm_eval": lm_eval_version() if c.tasks else None,
        "tasks": list(c.tasks), "include_path": os.path.abspath(c.include_path) if c.include_path else None,
        "num_fewshot": c.num_fewshot, "limit": c.limit,
        "chat_sets": {name: {"path": os.path.abspath(s.path), "scoring": s.scoring, "field": s.field} for name, s in c.chat_sets.items()},
        "scores": scores,
    }


def track_eval(plan: EvalPlan, target: Target, record: Dict[str, Any]) -> Dict[str, str]:
    """The evaluation as an MLflow run, its scores as metrics; a child of the export run that wrote the folder."""
    import dataclasses

    from framework import tracking as track
    from framework.export import EXPORT_MARKER

    parent = track.parent_of(str(target.folder / EXPORT_MARKER)) if target.folder is not None else None
    ref = track.record_run(plan.tracking, "eval", record["model_id"], {"eval": {**dataclasses.asdict(plan.cfg), "model": target.spec}},
                           {name: score["value"] for name, score in record["scores"].items()}, parent=parent,
                           tags={"framework.model": record["model"]})
    return ref.as_dict()


def run_eval(plan: EvalPlan) -> List[Dict[str, Any]]:
    """Evaluate every model of the plan in turn; each folder's eval.json written as soon as it is scored."""
    import ray

    records = []
    connected = ray.is_initialized()
    try:
        for target in plan.targets:
            record = evaluate(target, plan.cfg)
            if target.scores is None and plan.tracking.backend != "none":
                record["mlflow"] = track_eval(plan, target, record)
            if target.output is not None and target.scores is None:
                write_scores(target.output, record)
                print(f"eval: wrote {target.output}", flush=True)
            records.append(record)
    finally:
        # Leaves a cluster it joined as it found it (its own application is deleted already); a local one it started goes.
        if ray.is_initialized() and not connected:
            ray.shutdown()
    print_table(records)
    if plan.plot is not None:
        plot(records, plan.plot)
        print(f"eval: plot {plan.plot}", flush=True)
    return records
