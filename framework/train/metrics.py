"""Step metrics on rank 0: a readable line per interval, TensorBoard events, and metrics.jsonl."""

from __future__ import annotations

import json
import logging
import os
import resource
import sys
import tempfile
import time
import warnings
from typing import Any, Dict, List, Optional

import torch


def say(line: str) -> None:
    """Print one line from a Train worker, once.

    Ray Train patches `print` on its workers to log through the root logger as well as write the
    line, so a driver following the worker sees every printed line twice; writing to stdout does not.
    """
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def quiet_worker_logs() -> None:
    """Keep a worker's output to the progress line and real problems.

    Silences Ray Train's INFO line for every `ray.train.report` (the whole metrics dict and checkpoint;
    its logger is named by its file path, outside the `ray.train` logger that RunConfig's LoggingConfig
    sets, so it inherits the root logger's level, INFO on a Train worker), and the FutureWarning that
    DeepSpeed's ZeRO gathers raise for a torch.distributed name it still calls, once per rank: nothing
    a user of this framework can act on. The loop's own lines do not go through logging (`say`).
    """
    logging.getLogger().setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.*is deprecated", category=FutureWarning)


def peak_memory_gb() -> float:
    """Peak GPU memory allocated by this process, or its peak resident memory on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


ROLLOUTS = "rollouts.jsonl"


def _truncate_after(path: str, step: int) -> None:
    """Drop the records of `path` (JSON lines) logged after `step`: a resumed run logs them again."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        kept = [line for line in f if json.loads(line)["step"] <= step]
    with open(path, "w") as f:
        f.writelines(kept)


class MetricsLogger:
    """Writes on rank 0 only; on a resumed run it drops whatever was logged after the checkpoint.

    `log_dir` is a local directory or a URI (the run's `logs/` on object storage): then the files are
    written in a local directory of this node, first filled with what the run logged so far, and
    uploaded after every log interval, so they outlive the pod that trained.
    """

    def __init__(self, log_dir: str, enabled: bool, start_step: int, max_steps: int, tracking: Any = None):
        self.enabled = enabled
        self.tracking = tracking  # framework.tracking.RunRef: the MLflow run (tracking=mlflow), rank 0 logs to it
        self.max_steps = max_steps
        self.writer = None
        self.jsonl: Optional[str] = None
        self.remote: Optional[str] = None
        self.started, self.start_step = time.perf_counter(), start_step
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        from framework import storage

        if "://" in log_dir:
            self.remote, log_dir = log_dir, tempfile.mkdtemp(prefix="framework-logs-")
            if storage.exists(self.remote):
                storage.download_dir(self.remote, log_dir)
        os.makedirs(log_dir, exist_ok=True)
        self.local = log_dir
        # purge_step hides events past the checkpoint, so a resumed loss curve continues seamlessly.
        self.writer = SummaryWriter(log_dir, purge_step=start_step if start_step else None)
        self.jsonl = os.path.join(log_dir, "metrics.jsonl")
        self.rollouts = os.path.join(log_dir, ROLLOUTS)
        for path in (self.jsonl, self.rollouts):
            _truncate_after(path, start_step)

    def log_rollouts(self, records: List[Dict[str, Any]]) -> None:
        """Reinforcement learning: a JSON line per step in logs/rollouts.jsonl (its prompts' rows, and sampled groups
        with their completions and rewards), uploaded with the next metrics."""
        if not self.enabled or not records:
            return
        with open(self.rollouts, "a") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")

    def log(self, records: List[Dict[str, float]]) -> None:
        """One record per step: TensorBoard scalars and a JSON line each; the last one also printed."""
        if not self.enabled or not records:
            return
        with open(self.jsonl, "a") as f:
            for record in records:
                f.write(json.dumps(record) + "\n")
                for key, value in record.items():
                    if key != "step":
                        self.writer.add_scalar(key, value, record["step"])
        self.writer.flush()
        self._upload()
        if self.tracking is not None:
            from framework.tracking import log_metrics

            log_metrics(self.tracking, records)
        last = records[-1]
        done = last["step"] - self.start_step
        eta = (time.perf_counter() - self.started) / done * (self.max_steps - last["step"]) if done else 0.0
        say(format_line(last, self.max_steps, eta))

    def _upload(self) -> None:
        if self.remote:
            from framework import storage

            storage.upload_dir(self.local, self.remote)

    def close(self) -> None:
        if self.enabled:
            self.writer.close()
            self._upload()


def format_line(record: Dict[str, float], max_steps: int, eta_s: float) -> str:
    """`step 120/300 (40%) | loss 3.412 | val 3.51 (ppl 33.4) | ... | eta 1:05` for people watching the run."""
    step = int(record["step"])
    parts = [f"step {step}/{max_steps} ({step / max_steps:.0%})"]
    for key, fmt in (
        ("train/loss", "loss {:.4f}"),
        ("val/loss", "val {:.4f}"),
        ("val/perplexity", "val ppl {:.1f}"),
        ("val/rewards/accuracy", "val acc {:.2f}"),
        ("val/rewards/margin", "val margin {:.3f}"),
        ("train/lr", "lr {:.2e}"),
        ("train/grad_norm", "gnorm {:.3f}"),
        ("perf/tokens_per_s", "{:,.0f} tok/s"),
        ("perf/mfu", "mfu {:.1%}"),
        ("perf/peak_mem_gb", "mem {:.2f} GB"),
    ):
        if key in record:
            parts.append(fmt.format(record[key]))
    parts.append(f"eta {int(eta_s) // 60}:{int(eta_s) % 60:02d}")
    return " | ".join(parts)
