"""The `eval.*` schema (conf/eval.yaml) and every check an evaluation can make before a model is loaded or an engine starts.

What is evaluated (`eval.model`, and each of `eval.compare`) is one of:
    a folder          an exported or compressed Hugging Face folder: perplexity in-process, tasks and chat sets
                      through a serving engine started for it (Ray Serve LLM running vLLM, conf/serve/<preset>)
    a best.json       a sweep's winner: the folder it names
    an endpoint       http(s)://host:port of a running OpenAI-compatible server (ours, or vLLM's own): tasks and
                      chat sets only (a server gives no token loss over the shards)
    an eval.json      (eval.compare only) scores written earlier, read as they are
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import MISSING, DictConfig

from framework.config import ConfigError, Job, register, require, typed
from framework.tracking import TrackingConfig, check_tracking

# What launch/eval.py writes beside the model: the scores, and the key that tells them from a file of someone else's.
EVAL_FILE = "eval.json"
EVAL_KIND = "framework.eval"
SCORINGS = ("exact_match", "contains", "last_number")


@dataclass
class ChatSet:
    """One chat task set: JSONL records of `messages` (or a `prompt` string, sent as the user's turn) and a reference."""

    path: str = MISSING
    # exact_match | contains | last_number (framework/rl/rewards.py, as GRPO's rewards score), or a dotted path
    # to a function with TRL's reward signature.
    scoring: str = MISSING
    field: str = MISSING  # the record's reference field the scoring compares with


@dataclass
class EvalConfig:
    """The `eval.*` keys: types here, values in conf/eval.yaml."""

    model: str = MISSING  # folder | best.json | http(s)://host:port
    compare: List[str] = field(default_factory=list)  # more models (or their eval.json) in the same table and plot
    model_name: Optional[str] = MISSING  # an endpoint's model id; null: the first it lists at /v1/models
    tokenizer: Optional[str] = MISSING  # an endpoint's tokenizer folder (lm-eval counts and cuts tokens with it)
    api_key_env: Optional[str] = MISSING  # an endpoint's API key, from this environment variable
    output: Optional[str] = MISSING  # the eval.json to write; null: <folder>/eval.json (an endpoint needs one)
    plot: Optional[str] = MISSING  # the comparison plot; null: eval-compare.png beside the output (with eval.compare)
    perplexity: bool = MISSING  # validation loss and perplexity on the shards (folders only)
    data_dir: Optional[str] = MISSING  # null: the shards the folder was trained on (its export.json's checkpoint)
    eval_rows: Optional[int] = MISSING
    micro_batch: int = MISSING
    tasks: List[str] = field(default_factory=list)  # lm-evaluation-harness task (or group) names
    include_path: Optional[str] = MISSING  # a local directory of task YAMLs (read offline)
    num_fewshot: Optional[int] = MISSING
    limit: Optional[int] = MISSING  # the first N documents of each task; null: all
    num_concurrent: int = MISSING  # requests in flight to the engine
    # name → {path, scoring, field}: typed as ChatSet by `load_eval` (an override may add a set whole).
    chat_sets: Dict[str, Any] = field(default_factory=dict)
    max_tokens: int = MISSING  # a chat answer's token budget (greedy)
    serve_preset: str = MISSING  # conf/serve/<preset>: the engine started for a folder
    ray_address: Optional[str] = MISSING  # null: RAY_ADDRESS, else a local cluster


@dataclass
class EvalRoot:
    """The root of conf/eval.yaml."""

    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


register("eval_schema", EvalRoot)


def is_endpoint(model: str) -> bool:
    return model.startswith(("http://", "https://"))


def is_scores_file(model: str) -> bool:
    return Path(model).name == EVAL_FILE


@dataclass
class Target:
    """One thing to evaluate, resolved: `folder` for a folder or best.json, `url` for an endpoint, `scores` for an eval.json."""

    spec: str  # as the config names it
    key: str  # the config key that names it
    folder: Optional[Path] = None
    url: Optional[str] = None
    scores: Optional[str] = None
    data_dir: Optional[str] = None  # the shards perplexity is measured on
    output: Optional[str] = None  # where its eval.json goes


def read_scores(path: str, key: str) -> Dict[str, Any]:
    """An eval.json written by launch/eval.py, checked to be one."""
    try:
        scores = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{key}={path}: no such file") from None
    except ValueError as exc:
        raise ConfigError(f"{key}={path}: not JSON ({exc})") from None
    require(isinstance(scores, dict) and scores.get("kind") == EVAL_KIND and isinstance(scores.get("scores"), dict), key, path,
            f"expected an {EVAL_FILE} written by launch/eval.py")
    return scores


def check_output(path: str, key: str) -> None:
    """An eval.json may be replaced only if launch/eval.py wrote it."""
    if os.path.exists(path):
        try:
            ours = json.loads(Path(path).read_text()).get("kind") == EVAL_KIND
        except (OSError, ValueError, AttributeError):
            ours = False
        require(ours, key, path, "exists and was not written by launch/eval.py; choose another eval.output")
    parent = os.path.dirname(os.path.abspath(path))
    require(os.access(parent, os.W_OK), key, path, f"cannot write into {parent}")


def compressed_from(folder: Path) -> Optional[str]:
    """For a compressed folder (launch/compress.py): the shards its report scored it on, which are its source's."""
    from framework.compress.plan import COMPRESS_MARKER

    try:
        return json.loads((folder / COMPRESS_MARKER).read_text())["perplexity"]["data_dir"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def resolve_target(c: EvalConfig, spec: str, key: str, output: Optional[str]) -> Target:
    from framework.export import scoring_shards
    from framework.hf_folder import check_model_folder, resolve_model_path

    if is_scores_file(spec):
        require(key != "eval.model", key, spec, "expected a model to evaluate (an eval.json can be compared: eval.compare)")
        read_scores(spec, key)
        return Target(spec, key, scores=spec)
    if is_endpoint(spec):
        require(not c.perplexity, "eval.perplexity", True,
                f"{key}={spec} is an endpoint, which gives no token loss over the shards; set eval.perplexity=false")
        require(c.tokenizer is not None or not c.tasks, "eval.tokenizer", None,
                f"lm-eval tasks through the endpoint {spec} need its tokenizer: a folder holding it")
        require(output is not None, "eval.output", None, f"{key}={spec} is an endpoint: name the eval.json to write")
        return Target(spec, key, url=spec.rstrip("/"), output=output)
    folder = resolve_model_path(spec, key)
    check_model_folder(folder, key)
    data_dir = scoring_shards(c.data_dir or compressed_from(folder), folder, "eval.data_dir") if c.perplexity else None
    return Target(spec, key, folder=folder, data_dir=data_dir, output=output or str(folder / EVAL_FILE))


def check_values(c: EvalConfig) -> None:
    require(c.micro_batch >= 1, "eval.micro_batch", c.micro_batch, "expected at least 1")
    require(c.eval_rows is None or c.eval_rows >= 1, "eval.eval_rows", c.eval_rows, "expected at least 1, or null (every row)")
    require(c.num_concurrent >= 1, "eval.num_concurrent", c.num_concurrent, "expected at least 1")
    require(c.max_tokens >= 1, "eval.max_tokens", c.max_tokens, "expected at least 1")
    require(c.limit is None or c.limit >= 1, "eval.limit", c.limit, "expected at least 1, or null (every document)")
    require(c.num_fewshot is None or c.num_fewshot >= 0, "eval.num_fewshot", c.num_fewshot, "expected 0 or more, or null")
    require(c.perplexity or c.tasks or c.chat_sets, "eval.tasks", c.tasks,
            "nothing to score: name lm-eval tasks, eval.chat_sets, or set eval.perplexity=true")
    if c.api_key_env is not None:
        from framework.serve.ingress import read_api_key

        require(read_api_key(c.api_key_env) is not None, "eval.api_key_env", c.api_key_env,
                f"environment variable {c.api_key_env} is not set (or blank)")
    require(c.include_path is None or os.path.isdir(c.include_path), "eval.include_path", c.include_path, "no such directory")
    if c.tokenizer is not None:
        require(os.path.isfile(os.path.join(c.tokenizer, "tokenizer_config.json")), "eval.tokenizer", c.tokenizer,
                "expected a folder holding a Hugging Face tokenizer (tokenizer_config.json)")
    for name, chat in c.chat_sets.items():
        key = f"eval.chat_sets.{name}"
        require(os.path.isfile(chat.path), f"{key}.path", chat.path, "no such file")
        require(chat.scoring in SCORINGS or "." in chat.scoring, f"{key}.scoring", chat.scoring,
                f"expected one of {SCORINGS} or a dotted path to a reward function")
        from framework.evaluation.chat import read_records, scoring_function

        read_records(chat.path, key, chat.field)
        try:
            scoring_function(chat.scoring)
        except Exception as exc:  # noqa: BLE001 - Hydra wraps import errors of every kind
            raise ConfigError(f"{key}.scoring={chat.scoring}: cannot be imported ({str(exc).splitlines()[0]})") from None
    from framework.serve.config import compose_serve_config

    # The engine's preset, composed now so that a misspelt one fails before any model is read.
    compose_serve_config({"preset": c.serve_preset, "model_path": "unchecked"})


def check_tasks(c: EvalConfig) -> None:
    """Every task name lm-eval knows (its own, and those under eval.include_path)."""
    if not c.tasks:
        return
    from framework.evaluation.harness import task_manager

    known = set(task_manager(c.include_path).all_subtasks) | set(task_manager(c.include_path).all_groups)
    unknown = [t for t in c.tasks if t not in known]
    require(not unknown, "eval.tasks", unknown[0] if unknown else None,
            "lm-eval knows no such task" + (f" (nor is it under {c.include_path})" if c.include_path else
                                             "; a local task directory goes in eval.include_path"))


@dataclass
class EvalPlan:
    cfg: EvalConfig
    targets: List[Target]
    plot: Optional[str]
    tracking: TrackingConfig


def load_eval(cfg: DictConfig) -> EvalPlan:
    """`launch/eval.py`'s plan: schema, values, every model and file it names, the task names; no model loaded."""
    c: EvalConfig = typed(EvalConfig, cfg["eval"], "eval", example="outputs/export/RUN")
    c.chat_sets = {name: typed(ChatSet, node if isinstance(node, dict) else {"path": node}, f"eval.chat_sets.{name}",
                               example="data/arith.jsonl") for name, node in c.chat_sets.items()}
    check_values(c)
    require(not is_scores_file(c.model), "eval.model", c.model, "expected a model to evaluate (an eval.json goes in eval.compare)")
    if not any(is_endpoint(spec) for spec in [c.model, *c.compare]):
        for key in ("model_name", "tokenizer", "api_key_env"):
            require(getattr(c, key) is None, f"eval.{key}", getattr(c, key),
                    "applies to an endpoint (http://...) only; a folder is served under its own name, with its own tokenizer")
    main = resolve_target(c, c.model, "eval.model", c.output)
    if main.output is not None:
        check_output(main.output, "eval.output")
    others = []
    for i, spec in enumerate(c.compare):
        key = f"eval.compare.{i}"
        require(not is_endpoint(spec) or c.tokenizer is not None or not c.tasks, key, spec,
                "an endpoint to compare needs eval.tokenizer for lm-eval tasks")
        target = resolve_target(c, spec, key, None) if not is_endpoint(spec) else Target(spec, key, url=spec.rstrip("/"))
        if target.folder is not None:
            check_output(target.output, key)
        others.append(target)
    check_tasks(c)
    plot = c.plot
    if plot is None and others:
        plot = os.path.join(os.path.dirname(os.path.abspath(main.output or ".")), "eval-compare.png")
    tracking = typed(TrackingConfig, cfg["tracking"], "tracking")
    check_tracking(tracking)
    return EvalPlan(c, [main, *others], plot, tracking)


EVAL = Job("eval", load=load_eval)
