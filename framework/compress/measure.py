"""Measuring a folder: its size, its perplexity on the evaluation set, its greedy decoding (transformers' generate)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Tuple

import torch

from framework.compress.plan import CompressPlan
from framework.model import dtype_named


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
    scored = evaluate_folder(str(folder), plan.data_dir, c.eval_rows, c.micro_batch, c.device, dtype_named(c.dtype))
    return Figures(weights_bytes(folder), scored["val/loss"], scored["val/perplexity"], rows)


def fixed_prompts(count: int) -> List[str]:
    """The prompt set: `count` runs of consecutive stdlib source lines (the serving benchmark's too)."""
    from framework.data.sources import stdlib_prompts

    return stdlib_prompts(count)


def _greedy(model: Any, tokenizer: Any, prompts: List[str], max_tokens: int, device: str) -> Tuple[List[List[int]], float]:
    """Every prompt decoded greedily at once (one left-padded batch, end of sequence suppressed, exactly `max_tokens`
    tokens each); the continuations and the seconds from the first step to the last token."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    batch = tokenizer(prompts, return_tensors="pt", padding=True).to(device)
    eos = model.generation_config.eos_token_id
    settings = dict(do_sample=False, max_new_tokens=max_tokens, min_new_tokens=max_tokens, pad_token_id=tokenizer.pad_token_id,
                    suppress_tokens=[eos] if isinstance(eos, int) else list(eos or []))
    with torch.no_grad():
        model.generate(**tokenizer(prompts[:1], return_tensors="pt").to(device), **{**settings, "max_new_tokens": 2,
                                                                                     "min_new_tokens": 2})  # warm-up
        start = time.perf_counter()
        out = model.generate(**batch, **settings)
        seconds = time.perf_counter() - start
    width = batch["input_ids"].shape[1]
    return [row[width:].tolist() for row in out], seconds


def time_decode(folder: Path, plan: CompressPlan, figures: Figures) -> Figures:
    """Fill `figures` with the fixed prompts' greedy continuations from `folder` (transformers' generate, one batch), and their time."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    c = plan.compress
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype_named(c.dtype)).to(c.device).eval()
    figures.tokens, figures.decode_seconds = _greedy(model, tokenizer, fixed_prompts(c.prompts), c.max_tokens, c.device)
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
