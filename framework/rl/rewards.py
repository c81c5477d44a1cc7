"""Rewards as config (`conf/reward/*.yaml`): functions that score sampled completions, combined with weights.

A reward function has TRL's signature (trl.GRPOTrainer's `reward_funcs`), so a function written for TRL works
here unchanged: it is called once per batch as

    fn(prompts=[...], completions=[...], completion_ids=[[...], ...], **columns) -> [float | None, ...]

where `columns` are the prompt records' other fields (`answer`, test cases, ...) as lists in the same order. A None
says "not scored by this function" (as in TRL); a sample that no function scores fails the run. Any function is
named by dotted path under `_target_` with its keyword arguments beside it (Hydra's grammar); the built-ins below
cover the common verifiable tasks:

    last_number     1 if the last number of the completion equals the record's `field` (GSM8K-style answers)
    exact_match     1 if the stripped completion equals the record's `field`
    contains        1 if the record's `field`, stripped, occurs in the completion
    regex           1 if `pattern` matches (search, or the whole completion with full=true); `{field}` in the
                    pattern is replaced by that field of the record, escaped (a format check, or "answer: {answer}")
    length_penalty  DAPO's soft overlong penalty: 0 up to max_tokens − soft_tokens, then falling linearly to −1 at
                    max_tokens, and −1 beyond

The step's reward of a sample is Σ weight × score over the functions that scored it (TRL's nansum). A function
that raises, returns the wrong count or a non-number fails the run in one line naming the function and the record.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

from omegaconf import MISSING

from framework.config import ConfigError, RunError, require


@dataclass
class RewardConfig:
    name: str = MISSING
    # name → {weight, _target_ (a dotted path), and the function's keyword arguments}.
    functions: Dict[str, Any] = MISSING


@dataclass(frozen=True)
class RewardFunction:
    name: str
    target: str
    weight: float
    fn: Callable[..., Sequence[Optional[float]]]


# What every call passes (TRL's reward function arguments); the prompt records' fields come as further keywords.
BATCH = ("prompts", "completions", "completion_ids")
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def _number(text: str) -> Optional[float]:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def _column(columns: Mapping[str, Sequence[Any]], field: str, fn: str) -> Sequence[Any]:
    if field not in columns:
        raise KeyError(f"{fn}: the prompt records have no field {field!r} (they have: {', '.join(sorted(columns)) or 'none'})")
    return columns[field]


def last_number(prompts: Sequence[str], completions: Sequence[str], completion_ids: Sequence[Sequence[int]], *,
                field: str = "answer", tolerance: float = 1e-6, **columns: Sequence[Any]) -> List[float]:
    """1.0 where the completion's last number equals the record's `field` (within `tolerance`), else 0.0."""
    answers = _column(columns, field, "last_number")
    scores = []
    for completion, answer in zip(completions, answers):
        found = NUMBER.findall(completion)
        got, want = (_number(found[-1]) if found else None), _number(str(answer))
        if want is None:
            raise ValueError(f"last_number: {field}={answer!r} is not a number")
        scores.append(float(got is not None and abs(got - want) <= tolerance))
    return scores


def exact_match(prompts: Sequence[str], completions: Sequence[str], completion_ids: Sequence[Sequence[int]], *,
                field: str = "answer", **columns: Sequence[Any]) -> List[float]:
    """1.0 where the completion, stripped, equals the record's `field`, stripped."""
    answers = _column(columns, field, "exact_match")
    return [float(c.strip() == str(a).strip()) for c, a in zip(completions, answers)]


def contains(prompts: Sequence[str], completions: Sequence[str], completion_ids: Sequence[Sequence[int]], *,
             field: str = "answer", **columns: Sequence[Any]) -> List[float]:
    """1.0 where the record's `field`, stripped, occurs in the completion."""
    answers = _column(columns, field, "contains")
    return [float(str(a).strip() in c) for c, a in zip(completions, answers)]


def regex(prompts: Sequence[str], completions: Sequence[str], completion_ids: Sequence[Sequence[int]], *,
          pattern: str, full: bool = False, **columns: Sequence[Any]) -> List[float]:
    """1.0 where `pattern` matches the completion (anywhere, or all of it with `full`); `{field}` in the pattern
    is the record's field, matched literally."""
    fields = re.findall(r"\{(\w+)\}", pattern)
    for name in fields:
        _column(columns, name, "regex")
    scores = []
    for i, completion in enumerate(completions):
        filled = re.sub(r"\{(\w+)\}", lambda m: re.escape(str(columns[m.group(1)][i])), pattern)
        match = re.fullmatch if full else re.search
        scores.append(float(match(filled, completion, flags=re.DOTALL) is not None))
    return scores


def length_penalty(prompts: Sequence[str], completions: Sequence[str], completion_ids: Sequence[Sequence[int]], *,
                   max_tokens: int, soft_tokens: int, **columns: Sequence[Any]) -> List[float]:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13) on the completion's token count."""
    if not 0 < soft_tokens <= max_tokens:
        raise ValueError(f"length_penalty: expected 0 < soft_tokens <= max_tokens, got {soft_tokens} and {max_tokens}")
    start = max_tokens - soft_tokens
    return [0.0 if len(ids) <= start else max(-1.0, (start - len(ids)) / soft_tokens) for ids in completion_ids]


def _resolve(name: str, node: Mapping[str, Any]) -> RewardFunction:
    from hydra.utils import get_method

    key = f"reward.functions.{name}"
    require(isinstance(node, Mapping) and "_target_" in node, f"{key}._target_", None,
            "missing; expected a dotted path such as framework.rl.rewards.last_number")
    require("weight" in node, f"{key}.weight", None, "missing; expected a number (the function's weight in the reward)")
    weight, target = node["weight"], node["_target_"]
    require(isinstance(weight, (int, float)) and not isinstance(weight, bool) and math.isfinite(weight), f"{key}.weight", weight,
            "expected a finite number")
    try:
        fn = get_method(target)
    except Exception as exc:  # noqa: BLE001 - Hydra wraps import errors of every kind
        raise ConfigError(f"{key}._target_={target}: cannot be imported ({str(exc).splitlines()[0]})") from None
    kwargs = {k: v for k, v in node.items() if k not in ("_target_", "weight")}
    # Each argument the config gives must be a parameter the function names (a misspelt one would otherwise vanish
    # into its **columns), and each keyword-only parameter without a default must be given.
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        raise ConfigError(f"{key}._target_={target}: not a function") from None
    named = {n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    unknown = sorted(set(kwargs) - named)
    require(not unknown, f"{key}.{unknown[0] if unknown else ''}", kwargs.get(unknown[0]) if unknown else None,
            f"not an argument of {target} (it takes: {', '.join(sorted(named - set(BATCH))) or 'none'})")
    needed = sorted(n for n, p in params.items() if p.kind == p.KEYWORD_ONLY and p.default is p.empty and n not in kwargs)
    require(not needed, f"{key}.{needed[0] if needed else ''}", None, f"missing; {target} needs it")
    return RewardFunction(name=name, target=target, weight=float(weight), fn=functools.partial(fn, **kwargs))


def reward_functions(reward: RewardConfig) -> List[RewardFunction]:
    """The configured functions, imported and checked against their arguments (before any cluster work)."""
    functions = reward.functions
    require(bool(functions), "reward.functions", functions, "expected at least one reward function")
    return [_resolve(name, node) for name, node in functions.items()]


@dataclass
class Scores:
    total: List[float]                     # per sample: Σ weight × score over the functions that scored it
    by_function: Dict[str, List[float]]    # per function: its score of each sample (nan where it gave None)


def score(functions: Sequence[RewardFunction], prompts: Sequence[str], completions: Sequence[str],
          completion_ids: Sequence[Sequence[int]], records: Sequence[Mapping[str, Any]]) -> Scores:
    """Every function on the batch; the weighted total per sample. Fails in one line naming the function and the record."""
    n = len(completions)
    columns = {k: [r.get(k) for r in records] for k in sorted({k for r in records for k in r})}
    by_function: Dict[str, List[float]] = {}
    for f in functions:
        batch = dict(prompts=list(prompts), completions=list(completions), completion_ids=[list(c) for c in completion_ids], **columns)
        try:
            values = list(f.fn(**batch))
        except Exception as exc:  # noqa: BLE001 - a user's function may raise anything; the record it failed on is found below
            raise RunError(_failure(f, prompts, completions, completion_ids, records, columns, exc)) from None
        if len(values) != n:
            raise RunError(f"reward {f.name} ({f.target}) gave {len(values)} scores for {n} completions")
        for i, v in enumerate(values):
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v)):
                raise RunError(f"reward {f.name} ({f.target}) gave {v!r} for record {_describe(records[i], prompts[i])}: expected a number or None")
        by_function[f.name] = [math.nan if v is None else float(v) for v in values]
    total = []
    for i in range(n):
        scored = [(f.weight, by_function[f.name][i]) for f in functions if not math.isnan(by_function[f.name][i])]
        if not scored:
            raise RunError(f"no reward function scored record {_describe(records[i], prompts[i])} (each gave None)")
        total.append(sum(w * v for w, v in scored))
    return Scores(total=total, by_function=by_function)


def _describe(record: Mapping[str, Any], prompt: Any) -> str:
    """A record as an error names it: its prompt (text, or messages as JSON; cut to 60 characters) and its fields."""
    text = prompt if isinstance(prompt, str) else json.dumps(prompt, ensure_ascii=False)
    text = text if len(text) <= 60 else text[:57] + "..."
    return f"{text!r} {json.dumps(dict(record), ensure_ascii=False, default=str)[:120]}"


def _failure(f: RewardFunction, prompts: Sequence[str], completions: Sequence[str], completion_ids: Sequence[Sequence[int]],
             records: Sequence[Mapping[str, Any]], columns: Dict[str, List[Any]], exc: BaseException) -> str:
    """The one line for a function that raised: scored one record at a time to name the first it fails on."""
    for i in range(len(completions)):
        one = dict(prompts=[prompts[i]], completions=[completions[i]], completion_ids=[list(completion_ids[i])],
                   **{k: [v[i]] for k, v in columns.items()})
        try:
            f.fn(**one)
        except Exception as first:  # noqa: BLE001
            return f"reward {f.name} ({f.target}) raised {type(first).__name__} on record {_describe(records[i], prompts[i])}: {first}"
    return f"reward {f.name} ({f.target}) raised {type(exc).__name__} on the batch: {exc}"
