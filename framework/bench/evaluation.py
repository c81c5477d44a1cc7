"""Evaluation speed (bench=eval): seconds per 100 lm-eval items through the serving engine (launch/eval.py's path:
the Ray Serve LLM application, vLLM, `local-completions` with eval.num_concurrent requests in flight) against the
same task through `lm_eval --model hf` (transformers, batched) in this process, on the same CPU and model: the
serving benchmark's random-weight Llama of SmolLM2-135M's shape. The task is written here: `bench.items`
multiple-choice items (4 choices: a stdlib source line's true ending and three others), each a loglikelihood request
per choice. The engine's start is timed apart from the items; both sides' accuracy is printed (it must agree).
"""

from __future__ import annotations

import json
import random
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict

from omegaconf import MISSING, DictConfig

from framework.bench.common import BENCHMARKS, Benchmark, folder_params, random_model, write_figures
from framework.cluster import machine
from framework.config import ConfigError, absolute, compose, require, typed

TASK = "bench_stdlib_endings"


@dataclass
class EvalBenchConfig:
    name: str = MISSING
    random_model: str = MISSING  # the conf/bench/ preset whose random_model and model_dir are the model
    items: int = MISSING  # multiple-choice items in the task (each 4 loglikelihood requests)
    num_concurrent: int = MISSING  # requests in flight to the engine (eval.num_concurrent)
    hf_batch_size: int = MISSING  # lm-eval's batch for the transformers baseline
    serve_preset: str = MISSING  # conf/serve/<preset>: the engine
    task_dir: str = MISSING  # where the task's YAML and JSONL are written
    output: str = MISSING


def to_bench_config(cfg: DictConfig) -> EvalBenchConfig:
    return typed(EvalBenchConfig, cfg.bench, "bench")


def check(cfg: DictConfig) -> None:
    bench = to_bench_config(cfg)
    for key in ("items", "num_concurrent", "hf_batch_size"):
        require(getattr(bench, key) >= 1, f"bench.{key}", getattr(bench, key), "expected at least 1")
    random_preset = compose([f"bench={bench.random_model}"], "bench").bench
    if "random_model" not in random_preset or "model_dir" not in random_preset:
        raise ConfigError(f"bench.random_model={bench.random_model}: conf/bench/{bench.random_model}.yaml has no random_model and model_dir")
    from framework.serve.config import compose_serve_config

    compose_serve_config({"preset": bench.serve_preset, "model_path": "unchecked"})


def write_task(folder: Path, items: int) -> Path:
    """The multiple-choice task: the first half of a stdlib line; its own second half among three others'."""
    lines = sorted({line.strip() for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:60]
                    for line in path.read_text(errors="ignore").splitlines() if 30 <= len(line.strip()) <= 90})
    rng = random.Random(0)
    picked = rng.sample(lines, items * 4)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "items.jsonl", "w") as f:
        for i in range(items):
            group = picked[i * 4:(i + 1) * 4]
            cut = len(group[0]) // 2
            choices = [group[0][cut:]] + [other[len(other) // 2:] for other in group[1:]]
            order = rng.sample(range(4), 4)
            f.write(json.dumps({"context": group[0][:cut], "choices": [choices[j] for j in order], "answer": order.index(0)}) + "\n")
    (folder / f"{TASK}.yaml").write_text(
        f"task: {TASK}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / 'items.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: \"{{context}}\"\ndoc_to_choice: \"{{choices}}\"\n"
        "doc_to_target: \"{{answer}}\"\ntarget_delimiter: \"\"\nmetric_list:\n  - metric: acc\nmetadata:\n  version: 1.0\n")
    return folder


def through_engine(folder: Path, tasks: Path, bench: EvalBenchConfig) -> Dict[str, Any]:
    import ray

    from framework.evaluation.config import EVAL
    from framework.evaluation.harness import run_tasks
    from framework.evaluation.job import engine
    from framework.hf_folder import model_context

    plan = EVAL.from_overrides([f"eval.model={folder}", "eval.perplexity=false", f"eval.include_path={tasks}",
                                f"eval.tasks=[{TASK}]", f"eval.num_concurrent={bench.num_concurrent}",
                                f"eval.serve_preset={bench.serve_preset}"])
    started = time.perf_counter()
    try:
        with engine(plan.targets[0], plan.cfg) as (url, model_id):
            up = time.perf_counter()
            scores = run_tasks(url, model_id, str(folder), [TASK], include_path=str(tasks), num_fewshot=None, limit=None,
                               num_concurrent=bench.num_concurrent, max_length=model_context(folder), api_key=None)
            done = time.perf_counter()
    finally:
        ray.shutdown()
    return {"engine_start_s": round(up - started, 1), "items_s": round(done - up, 2), "acc": scores[f"eval/{TASK}/acc"]["value"]}


def through_transformers(folder: Path, tasks: Path, bench: EvalBenchConfig) -> Dict[str, Any]:
    from lm_eval import simple_evaluate

    from framework.evaluation.harness import task_manager

    started = time.perf_counter()
    results = simple_evaluate(model="hf", model_args={"pretrained": str(folder), "dtype": "float32"}, tasks=[TASK],
                              task_manager=task_manager(str(tasks)), batch_size=bench.hf_batch_size, device="cpu",
                              log_samples=False, bootstrap_iters=0)
    return {"items_s": round(time.perf_counter() - started, 2), "acc": results["results"][TASK]["acc,none"]}


def run(cfg: DictConfig) -> Dict[str, Any]:
    bench = to_bench_config(cfg)
    folder = random_model(bench.random_model)
    tasks = write_task(Path(absolute(bench.task_dir)), bench.items)
    ours = through_engine(folder, tasks, bench)
    hf = through_transformers(folder, tasks, bench)
    per_100 = {name: round(r["items_s"] * 100 / bench.items, 2) for name, r in (("engine", ours), ("transformers", hf))}
    figures = {
        "machine": machine(), "model": str(folder), "parameters": folder_params(folder), "items": bench.items,
        "requests": bench.items * 4, "num_concurrent": bench.num_concurrent, "hf_batch_size": bench.hf_batch_size,
        "engine": ours, "transformers": hf, "seconds_per_100_items": per_100,
        "speedup_engine_over_transformers": round(per_100["transformers"] / per_100["engine"], 2),
    }
    print(f"bench eval: {bench.items} items ({bench.items * 4} loglikelihood requests) on {machine()}\n"
          f"  serving engine: {per_100['engine']} s per 100 items (engine start {ours['engine_start_s']} s apart), acc {ours['acc']:.3f}\n"
          f"  lm_eval --model hf: {per_100['transformers']} s per 100 items, acc {hf['acc']:.3f}\n"
          f"  engine ÷ transformers speed: {figures['speedup_engine_over_transformers']}×", flush=True)
    write_figures(figures, bench.output)
    return figures


BENCHMARKS.register("eval")(Benchmark(check, run))
