"""GRPO's rollout and weight sync inside the loop vs the same engine alone: `python launch/bench.py bench=rl`.

The benchmark makes its own task: sums "What is a + b?" with their answers (data=prompts) and a random-weight Llama of
`bench.model`'s shape with a byte-level BPE trained on those prompts (the ChatML template), prepares them and runs
`experiment=grpo` on them through Ray Train on a local Ray cluster of `num_cpus` CPUs. Then the same rollout engine
(same spec, the starting weights) alone samples the same prompts of the same steps with the same seeds. Reported:

    loop_rollout_tokens_per_s   completion tokens ÷ time in rollout, over the run's steps after `skip_steps`
    alone_tokens_per_s          the same prompts, n, max_tokens and seeds on the engine alone
    rollout_ratio               loop ÷ alone (goal ≥ 0.8: what the loop's calls and data movement cost the engine)
    sync_share                  Σ weight-sync seconds ÷ Σ step seconds (goal ≤ 0.10)
    step_s, rollout_s, train_s, sync_s   mean seconds per step in each part

for each of `placements` (rl.engine.placement: the engine on CPUs of its own, or colocated on the trainer's), the
same job and task; the engine alone runs the first placement's steps.
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
from omegaconf import MISSING, DictConfig

from framework.bench.common import BENCHMARKS, Benchmark, folder_params, fresh_storage, write_figures
from framework.cluster import machine
from framework.config import ConfigError, typed


@dataclass
class RLModelConfig:
    hidden_size: int = MISSING
    intermediate_size: int = MISSING
    num_hidden_layers: int = MISSING
    num_attention_heads: int = MISSING
    vocab_size: int = MISSING
    seed: int = MISSING


@dataclass
class RLBenchConfig:
    name: str = MISSING
    model: RLModelConfig = field(default_factory=RLModelConfig)
    prompts: int = MISSING            # sums written to the task's JSONL
    num_cpus: int = MISSING           # the local Ray cluster's CPUs
    skip_steps: int = MISSING         # first steps left out of the averages (engine and caches warming up)
    placements: List[str] = MISSING   # rl.engine.placement of each run: separate, colocated
    overrides: List[str] = MISSING    # the GRPO job (conf/config.yaml overrides); model, data and storage are the bench's
    storage_path: str = MISSING
    output: str = MISSING


def to_bench_config(cfg: DictConfig) -> RLBenchConfig:
    return typed(RLBenchConfig, cfg.bench, "bench")


def job_overrides(bench: RLBenchConfig, root: str, placement: str) -> List[str]:
    return [
        "experiment=grpo", f"model.pretrained_path={root}/model", f"data.sources.0.path={root}/sums.jsonl",
        f"data.output_dir={root}/data", f"run.storage_path={root}/runs", f"run.name=grpo-{placement}", *bench.overrides,
        f"rl.engine.placement={placement}",
    ]


def check(cfg: DictConfig) -> None:
    bench = to_bench_config(cfg)
    for key in ("prompts", "num_cpus"):
        if getattr(bench, key) < 1:
            raise ConfigError(f"bench.{key}={getattr(bench, key)}: expected at least 1")
    if bench.skip_steps < 0:
        raise ConfigError(f"bench.skip_steps={bench.skip_steps}: expected 0 or more")
    from framework.rl.config import PLACEMENTS

    if not bench.placements or any(p not in PLACEMENTS for p in bench.placements):
        raise ConfigError(f"bench.placements={list(bench.placements)}: expected some of {', '.join(PLACEMENTS)}")


def make_task(bench: RLBenchConfig, root: str) -> None:
    """The sums JSONL, and a random Llama of bench.model's shape with a BPE (ChatML) trained on them."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from framework.data.config import TokenizerConfig
    from framework.data.tokenizer import train_bpe_tokenizer

    rng = random.Random(bench.model.seed)
    records = []
    for _ in range(bench.prompts):
        a, b = rng.randrange(100), rng.randrange(100)
        records.append({"prompt": f"What is {a} + {b}? Think step by step, then give the answer.", "answer": str(a + b)})
    with open(os.path.join(root, "sums.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    m = bench.model
    tokenizer = train_bpe_tokenizer([json.dumps(r) for r in records] * 4, TokenizerConfig(path=None, vocab_size=m.vocab_size, min_frequency=2))
    torch.manual_seed(m.seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
        num_hidden_layers=m.num_hidden_layers, num_attention_heads=m.num_attention_heads, num_key_value_heads=m.num_attention_heads,
        max_position_embeddings=2048, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(os.path.join(root, "model"))
    tokenizer.save_pretrained(os.path.join(root, "model"))


def engine_alone(cfg: Any, plan: Any, steps: List[Dict[str, Any]]) -> Dict[str, float]:
    """The run's rollout engine spec, alone, on the prompts of `steps` (their rows and seeds): tokens and seconds."""
    import ray

    from framework.data.prompts import prompt_rows
    from framework.data.stream import ShardReader
    from framework.rl.rollout import EngineSpec, start_engine
    from framework.train.rl_loop import TRAIN_STREAM, prompt_seed

    rl = cfg.rl
    spec = EngineSpec.of(rl.engine, cfg.model.pretrained_path, plan.manifest["seq_len"] + rl.max_tokens, None, cfg.run.seed)
    actor = start_engine(spec)
    reader = ShardReader(plan.data_dir, plan.manifest, "train", cache_groups=8)
    tokens, seconds = 0, 0.0
    try:
        for record in steps:
            rows = prompt_rows(reader.read(np.asarray(record["rows"], dtype=np.int64)))
            seeds = [prompt_seed(cfg.run.seed, TRAIN_STREAM, record["step"] - 1, r) for r in record["rows"]]
            started = time.perf_counter()
            groups = ray.get(actor.generate.remote([r.ids for r in rows], rl.group_size, rl.max_tokens, rl.temperature, seeds))
            seconds += time.perf_counter() - started
            tokens += sum(len(s.token_ids) for g in groups for s in g)
    finally:
        ray.kill(actor)
    return {"tokens": tokens, "seconds": seconds}


def read_run(root: str, placement: str, skip: int) -> tuple:
    """The run's metrics and rollout records after the first `skip` steps."""
    logs = os.path.join(root, "runs", f"grpo-{placement}", "logs")
    with open(os.path.join(logs, "metrics.jsonl")) as f:
        records = [r for r in map(json.loads, f) if r["step"] > skip]
    with open(os.path.join(logs, "rollouts.jsonl")) as f:
        steps = [r for r in map(json.loads, f) if r["step"] > skip]
    return records, steps


def step_figures(records: List[Dict[str, Any]], completions: int) -> Dict[str, float]:
    totals = {k: sum(r[f"perf/{k}"] for r in records) for k in ("rollout_s", "train_s", "sync_s", "step_s")}
    tokens = sum(r["train/completion_length"] * completions for r in records)
    return {
        "loop_rollout_tokens_per_s": round(tokens / totals["rollout_s"], 1),
        "sync_share": round(totals["sync_s"] / totals["step_s"], 4),
        **{f"{k.removesuffix('_s')}_s_per_step": round(v / len(records), 3) for k, v in totals.items()},
    }


def run(cfg: DictConfig) -> Dict[str, Any]:
    import ray

    from framework.data.prepare import prepare_shards
    from framework.train.config import TRAIN
    from framework.train.plan import make_plan
    from framework.train.trainer import train

    bench = to_bench_config(cfg)
    root = fresh_storage(bench.storage_path)
    make_task(bench, root)
    configs = {p: TRAIN.from_overrides(job_overrides(bench, root, p)) for p in bench.placements}
    first = bench.placements[0]
    ray.init(address="local", num_cpus=bench.num_cpus, include_dashboard=False, logging_level="WARNING")
    try:
        prepare_shards(configs[first].data)
        plan = make_plan(configs[first])
        for config in configs.values():
            train(config)
        runs = {p: read_run(root, p, bench.skip_steps) for p in bench.placements}
        alone = engine_alone(plan.config, plan, runs[first][1])
    finally:
        ray.shutdown()
    rl, run_cfg = plan.config.rl, plan.config.run
    completions = run_cfg.global_batch_size * rl.group_size
    by_placement = {p: step_figures(records, completions) for p, (records, _) in runs.items()}
    alone_rate = alone["tokens"] / alone["seconds"]
    main = by_placement[first]
    figures = {
        "machine": f"{machine()}; local Ray cluster of {bench.num_cpus} CPUs",
        "model_params": folder_params(Path(root, "model")),
        "steps_measured": len(runs[first][0]),
        "prompts_per_step": run_cfg.global_batch_size, "group_size": rl.group_size, "max_tokens": rl.max_tokens,
        "alone_tokens_per_s": round(alone_rate, 1),
        "rollout_ratio": round(main["loop_rollout_tokens_per_s"] / alone_rate, 3),
        "placement": first,
        **main,
        "placements": by_placement,
        "config": asdict(bench),
    }
    write_figures(figures, bench.output)
    print(
        f"bench rl: {figures['steps_measured']} steps × {completions} completions ({first} engine): rollout in the loop "
        f"{main['loop_rollout_tokens_per_s']:,} tok/s vs the engine alone {figures['alone_tokens_per_s']:,} tok/s → "
        f"×{figures['rollout_ratio']}; weight sync {main['sync_share']:.1%} of a step ({main['sync_s_per_step']}s of "
        f"{main['step_s_per_step']}s)", flush=True,
    )
    for placement, values in by_placement.items():
        print(f"bench rl: {placement}: step {values['step_s_per_step']}s = rollout {values['rollout_s_per_step']}s + policy "
              f"step {values['train_s_per_step']}s + sync {values['sync_s_per_step']}s", flush=True)
    return figures


BENCHMARKS.register("rl")(Benchmark(check, run))
