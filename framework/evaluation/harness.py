"""lm-evaluation-harness tasks through an OpenAI-compatible completions endpoint (`local-completions`), offline.

Loglikelihood tasks send the prompt with `echo` and `logprobs` and read the prompt's token log-probs back;
generate_until tasks decode greedily as the task's generation_kwargs say. Each score comes back with what it
takes to read it: the task's version, its n-shot, the documents scored, the standard error, and whether higher
is better, named `eval/<task>/<metric>` (`<metric>@<filter>` for a filter other than lm-eval's "none").
"""

from __future__ import annotations

import functools
import os
from typing import Any, Dict, List, Optional

# No hub: task data is read from local files (a task's dataset_path: json + data_files), or from a datasets cache.
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


@functools.lru_cache(maxsize=4)
def task_manager(include_path: Optional[str]) -> Any:
    for name, value in OFFLINE.items():
        os.environ.setdefault(name, value)
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path)


def lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


def run_tasks(url: str, model_id: str, tokenizer: str, tasks: List[str], *, include_path: Optional[str],
              num_fewshot: Optional[int], limit: Optional[int], num_concurrent: int, max_length: int,
              api_key: Optional[str]) -> Dict[str, Dict[str, Any]]:
    """Run `tasks` against the server at `url`; the scores, each as {value, stderr, count, version, n_shot, higher_is_better}."""
    from lm_eval import simple_evaluate

    model_args: Dict[str, Any] = {
        "model": model_id, "base_url": f"{url}/v1/completions", "tokenizer_backend": "huggingface",
        "tokenizer": tokenizer, "num_concurrent": num_concurrent, "max_retries": 3, "max_length": max_length,
    }
    if api_key:
        model_args["header"] = {"Authorization": f"Bearer {api_key}"}
    results = simple_evaluate(model="local-completions", model_args=model_args, tasks=list(tasks),
                              task_manager=task_manager(include_path), num_fewshot=num_fewshot, limit=limit,
                              log_samples=False, bootstrap_iters=1000)
    return scores_of(results)


def scores_of(results: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    """lm-eval's result dict as this project's named scores."""
    scores: Dict[str, Dict[str, Any]] = {}
    for task, metrics in results["results"].items():
        higher = results.get("higher_is_better", {}).get(task, {})
        samples = results.get("n-samples", {}).get(task, {})
        for name, value in metrics.items():
            # `sample_len` is lm-eval's document count (reported as `count`), not a score.
            if name in ("alias", "sample_len") or "_stderr," in name or not isinstance(value, (int, float)):
                continue
            metric, _, filt = name.partition(",")
            stderr = metrics.get(f"{metric}_stderr,{filt}")
            scores[f"eval/{task}/{metric}" + ("" if filt in ("", "none") else f"@{filt}")] = {
                "value": float(value),
                "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
                "count": samples.get("effective"),
                "version": results.get("versions", {}).get(task),
                "n_shot": results.get("n-shot", {}).get(task),
                "higher_is_better": higher.get(metric, True),
                "source": "lm-eval",
            }
    return scores
