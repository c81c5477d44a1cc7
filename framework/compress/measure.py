"""Measuring a folder: its size, its perplexity on the evaluation set, its greedy decoding through the serving engine."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Tuple

import torch

from framework.compress.plan import CompressPlan
from framework.model import DTYPES


@dataclass
class Figures:
    """One folder's figures, the source's or a compressed one's (`tokens` empty until its decoding is timed)."""

    weights_bytes: int
    loss: float
    perplexity: float
    rows: int  # validation rows scored
    tokens: List[List[int]] = field(default_factory=list)  # each prompt's greedy continuation
    decode_seconds: float = math.nan

    @property
    def tokens_per_s(self) -> float:
        return sum(len(t) for t in self.tokens) / self.decode_seconds


def weights_bytes(folder: Path) -> int:
    """Bytes of the folder's weights on disk (its safetensors files)."""
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def score(folder: Path, plan: CompressPlan) -> Figures:
    """The folder's size and its validation loss and perplexity on the plan's shards (framework/evaluate.py)."""
    from framework.data.sampler import evaluation_rows
    from framework.data.shards import read_manifest
    from framework.evaluate import evaluate_folder

    c = plan.compress
    manifest = read_manifest(plan.data_dir)
    rows = len(evaluation_rows(manifest["splits"]["validation"]["rows"], c.eval_rows, manifest["seed"]))
    scored = evaluate_folder(str(folder), plan.data_dir, c.eval_rows, c.micro_batch, c.device, DTYPES[c.dtype])
    return Figures(weights_bytes(folder), scored["val/loss"], scored["val/perplexity"], rows)


def fixed_prompts(count: int) -> List[str]:
    """The prompt set: `count` runs of consecutive stdlib source lines (the serving benchmark's too)."""
    from framework.data.sources import stdlib_prompts

    return stdlib_prompts(count)


def greedy_params(engine: Any, max_tokens: int) -> Any:
    """Greedy decoding of exactly `max_tokens` tokens (end of sequence suppressed), each token's id kept (logprobs=0)."""
    from framework.serve.sampling import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, top_p=1.0, logprobs=0,
                          logit_bias={eos: -100.0 for eos in engine.eos_ids})


async def _greedy(engine: Any, prompts: List[List[int]], max_tokens: int) -> Tuple[List[List[int]], float]:
    """Every prompt decoded at once through the engine; the continuations and the seconds from submitting them to the last token."""
    from framework.serve.engine import Sequence

    async def one(ids: List[int], tokens: int) -> List[int]:
        out: List[int] = []
        async for deltas in engine.generate([Sequence(ids, greedy_params(engine, tokens))]):
            for delta in deltas:
                out.extend(lp.token for lp in delta.logprobs)
        return out

    await one(prompts[0], 2)  # warm-up: the first step pays for lazy initialisation
    start = time.perf_counter()
    tokens = await asyncio.gather(*(one(ids, max_tokens) for ids in prompts))
    return list(tokens), time.perf_counter() - start


def time_decode(folder: Path, plan: CompressPlan, figures: Figures) -> Figures:
    """Fill `figures` with the fixed prompts' greedy continuations through the serving engine on `folder`, and their time."""
    from framework.serve.engine import load_engine

    c = plan.compress
    # The engine's start-up notes (paged cache sizes, no flash attention on CPU) say nothing about the figures.
    logging.getLogger("ContinuousBatchingLogger").setLevel(logging.WARNING)
    engine = load_engine(folder, plan.batching, c.dtype, c.device)
    try:
        prompts = [engine.prompts.encode(p) for p in fixed_prompts(c.prompts)]
        figures.tokens, figures.decode_seconds = asyncio.run(_greedy(engine, prompts, c.max_tokens))
    finally:
        engine.shutdown()
    return figures


def measure_source(plan: CompressPlan) -> Figures:
    """The source folder's figures, to compare every compression of it with (a benchmark measures them once)."""
    from framework.hf_folder import quiet_progress_bars

    set_threads(plan)
    with quiet_progress_bars():
        return time_decode(plan.source, plan, score(plan.source, plan))


def set_threads(plan: CompressPlan) -> None:
    if plan.compress.torch_threads is not None:
        torch.set_num_threads(plan.compress.torch_threads)


def agreement(source: List[List[int]], compressed: List[List[int]]) -> Dict[str, Any]:
    """How far the compressed model's greedy continuations follow the source's: prompts continued identically, and
    the mean share of each source continuation reproduced before the first token that differs."""
    shares = []
    for a, b in zip(source, compressed):
        same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        shares.append(same / max(len(a), 1))
    return {"prompts": len(source), "identical": sum(a == b for a, b in zip(source, compressed)),
            "token_agreement": round(sum(shares) / max(len(shares), 1), 4)}
