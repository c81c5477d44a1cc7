"""Batch generation: a JSONL or Parquet file of prompts or conversations → a Parquet file of completions, through
Ray Data LLM (`ray.data.llm`, the vLLM engine processor) on the engine and folder serving uses.

The rows are read and checked here first. A record that is not an object, has neither `prompt` (text) nor
`messages` (a chat), has both, or is too long for the context is a bad record: it is counted, reported,
and written to the output with its `error`, never dropped, so the output has one row per input row, in
input order (`row`). Chats are laid out as serving lays them out (framework/serve/prompts.py: message
text never becomes a control token) and go to the engine as token ids, as text prompts do; a row the
engine fails gets the engine's error and no completion. The output is written beside its final name and
moved into place whole; an existing file is never overwritten.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from omegaconf import MISSING, DictConfig

from framework.config import ConfigError, Job, register, require, typed
from framework.serve.config import ServeConfig, check_model_path, to_serve_config, validate_serve
from framework.serve.protocol import ROLES

INPUT_SUFFIXES = (".jsonl", ".parquet")


@dataclass
class GenerateConfig:
    """The `generate.*` keys: types here, values in conf/generate.yaml."""

    input: str = MISSING
    output: str = MISSING
    batch_size: int = MISSING
    concurrency: int = MISSING
    max_tokens: Optional[int] = MISSING  # null: serve.default_max_tokens
    temperature: float = MISSING
    top_p: float = MISSING
    seed: Optional[int] = MISSING
    stop: List[str] = MISSING


@dataclass
class GenerateRoot:
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)


register("generate_schema", GenerateRoot)


@dataclass
class GeneratePlan:
    generate: GenerateConfig
    serve: ServeConfig
    folder: Path


def load_generate(cfg: DictConfig) -> GeneratePlan:
    """`launch/generate.py`'s plan: both config nodes, the folder, the input and output paths (before Ray starts)."""
    g = typed(GenerateConfig, cfg["generate"], "generate", example="PATH")
    serve = validate_serve(to_serve_config(cfg["serve"]))
    folder = check_model_path(serve)
    source = Path(g.input)
    require(source.suffix in INPUT_SUFFIXES, "generate.input", g.input, f"expected a file ending in {' or '.join(INPUT_SUFFIXES)}")
    require(source.is_file(), "generate.input", g.input, "no such file")
    out = Path(g.output)
    require(out.suffix == ".parquet", "generate.output", g.output, "expected a file ending in .parquet")
    require(not out.exists(), "generate.output", g.output, "exists already; name a new file (nothing is overwritten)")
    require(g.batch_size >= 1, "generate.batch_size", g.batch_size, "expected at least 1")
    require(g.concurrency >= 1, "generate.concurrency", g.concurrency, "expected at least 1")
    require(g.max_tokens is None or g.max_tokens >= 1, "generate.max_tokens", g.max_tokens, "expected at least 1, or null")
    require(0 <= g.temperature <= 2, "generate.temperature", g.temperature, "expected 0 to 2")
    require(0 < g.top_p <= 1, "generate.top_p", g.top_p, "expected a fraction in (0, 1]")
    require(len(g.stop) <= 4 and all(g.stop), "generate.stop", list(g.stop), "expected at most 4 non-empty strings")
    return GeneratePlan(g, serve, folder)


GENERATE = Job("generate", load=load_generate)


# ---------------------------------------------------------------------------------------------
# Reading and checking the records

def read_records(path: Path) -> List[Any]:
    """The input's records in order: a JSONL line that is not JSON stays as an error message in its place."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    records: List[Any] = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except ValueError as exc:
                records.append(BadRecord(f"line {number}: not JSON ({exc})"))
    return records


@dataclass
class BadRecord:
    error: str


def _messages_error(messages: Any) -> Optional[str]:
    if not isinstance(messages, list) or not messages:
        return "`messages` must be a non-empty list of {role, content}"
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            return f"messages[{i}] must be {{role: one of {', '.join(ROLES)}, content: text}}"
    return None


def prepare(record: Any, prompts: Any, max_tokens: int, context: int) -> Tuple[Optional[Dict[str, Any]], Optional[str]]:
    """A record's engine input (token ids, stop strings and stop tokens), or why it is a bad record."""
    from jinja2 import TemplateError

    from framework.serve.prompts import ControlTokenInContent

    if isinstance(record, BadRecord):
        return None, record.error
    if not isinstance(record, dict):
        return None, "a record must be an object with `prompt` or `messages`"
    prompt, messages = record.get("prompt"), record.get("messages")
    if (prompt is None) == (messages is None):
        return None, "a record needs exactly one of `prompt` (text) and `messages` (a chat)"
    if prompt is not None:
        if not isinstance(prompt, str) or not prompt:
            return None, "`prompt` must be non-empty text"
        ids, stops, stop_ids = prompts.encode(prompt), (), ()
    else:
        problem = _messages_error(messages)
        if problem:
            return None, problem
        try:
            ids, stops, stop_ids = prompts.chat([{"role": m["role"], "content": m["content"]} for m in messages])
        except (TemplateError, ControlTokenInContent) as exc:
            return None, f"`messages` do not fit the model's chat template: {exc}"
    if len(ids) + max_tokens > context:
        return None, f"{len(ids)} prompt tokens + max_tokens {max_tokens} is more than the model's context of {context}"
    return {"tokenized_prompt": ids, "stops": list(stops), "stop_ids": list(stop_ids)}, None


# ---------------------------------------------------------------------------------------------
# Running it

def processor_config(plan: GeneratePlan) -> Any:
    """Ray Data LLM's vLLM processor on the serving engine's settings (framework/serve/llm.py)."""
    from ray.data.llm import vLLMEngineProcessorConfig

    from framework.serve.llm import engine_bundle, engine_env, engine_kwargs

    return vLLMEngineProcessorConfig(
        model_source=str(plan.folder),
        engine_kwargs=engine_kwargs(plan.serve),
        runtime_env={"env_vars": engine_env(plan.serve)},
        placement_group_config={"bundles": [engine_bundle(plan.serve)]},
        batch_size=plan.generate.batch_size,
        concurrency=plan.generate.concurrency,
        # Prompts arrive as token ids laid out here; the engine's text is the completion.
        chat_template_stage=False,
        tokenize_stage=False,
        detokenize_stage=False,
        should_continue_on_error=True,
    )


def generate(plan: GeneratePlan) -> Dict[str, int]:
    """Run the plan; gives the counts: rows read, completed, bad records, engine failures."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray
    from ray.data.llm import build_processor
    from transformers import AutoTokenizer

    from framework.cluster import connect
    from framework.hf_folder import model_context
    from framework.serve.prompts import PromptEncoder

    g, serve = plan.generate, plan.serve
    context = serve.max_model_len or model_context(plan.folder)
    prompts = PromptEncoder(AutoTokenizer.from_pretrained(plan.folder), context)
    max_tokens = g.max_tokens or serve.default_max_tokens
    records = read_records(Path(g.input))
    good, rows = [], []
    for index, record in enumerate(records):
        engine_input, error = prepare(record, prompts, max_tokens, context)
        shown = record if isinstance(record, dict) else {}
        rows.append({"row": index, "prompt": _text(shown.get("prompt")), "messages": _json(shown.get("messages")),
                     "completion": None, "finish_reason": None, "prompt_tokens": None, "completion_tokens": None,
                     "error": error})
        if engine_input is not None:
            sampling = {"max_tokens": max_tokens, "temperature": g.temperature, "top_p": g.top_p, "seed": g.seed,
                        "stop": list(g.stop) + engine_input["stops"], "stop_token_ids": engine_input["stop_ids"],
                        "skip_special_tokens": True}
            good.append({"row": index, "tokenized_prompt": engine_input["tokenized_prompt"], "sampling_params": sampling})
    bad = sum(r["error"] is not None for r in rows)
    if bad:
        print(f"generate: {bad} of {len(rows)} records are bad; each is in the output with its error", flush=True)
    if good:
        connect(serve.ray_address)
        processor = build_processor(processor_config(plan))
        for output in processor(ray.data.from_items(good)).take_all():
            result = _result(output, max_tokens)
            row = rows[result["row"]]
            row.update({k: result[k] for k in ("completion", "finish_reason", "prompt_tokens", "completion_tokens")})
            row["error"] = result["error"]
    failed = sum(r["error"] is not None for r in rows) - bad
    out = Path(g.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    staged = out.with_name(f".{out.name}.partial")
    pq.write_table(pa.Table.from_pandas(pd.DataFrame(rows), preserve_index=False), staged)
    os.replace(staged, out)
    return {"rows": len(rows), "completed": len(rows) - bad - failed, "bad_records": bad, "engine_failures": failed}


def _result(row: Dict[str, Any], max_tokens: int) -> Dict[str, Any]:
    """An engine output row as the output's columns; `length` when the completion used every token it was allowed,
    else `stop` (an end token or a stop string)."""
    error = row.get("__inference_error__") or None
    generated = None if error else int(row["num_generated_tokens"])
    return {"row": int(row["row"]), "completion": None if error else row["generated_text"],
            "finish_reason": None if error else ("length" if generated == max_tokens else "stop"),
            "prompt_tokens": row.get("num_input_tokens"), "completion_tokens": generated, "error": error}


def _text(value: Any) -> Optional[str]:
    return value if isinstance(value, str) else None


def _json(value: Any) -> Optional[str]:
    return None if value is None else json.dumps(value)


__all__ = ["GENERATE", "ConfigError", "GenerateConfig", "GeneratePlan", "generate", "load_generate"]
