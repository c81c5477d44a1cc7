"""What the training loop needs from whatever runs it: rank and world, a device, the checkpoint to resume, a way to report.

`RaySession` is a Ray Train worker (public `ray.train` APIs only); `LocalSession` is one bare process
(world of one, checkpoints in a local run directory), which is how the benchmark measures what Ray
Train costs on identical training code. The loop (`framework/train/loop.py`) sees only this interface.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from typing import Any, Dict, Iterator, List, Optional, Protocol

import torch

from framework.cluster import free_port
from framework.train import checkpoint


class Session(Protocol):
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    def checkpoint(self) -> contextlib.AbstractContextManager[Optional[str]]:
        """The checkpoint to resume as a local directory (None for a fresh run), for the duration of the block."""

    def checkpoint_name(self) -> Optional[str]:
        """Where the checkpoint to resume lives, for messages."""

    def report(self, metrics: Dict[str, Any], checkpoint_dir: Optional[str] = None, step: int = 0, upload: str = "sync") -> None:
        """Hand over metrics (every rank, the same values) and, with `checkpoint_dir`, this rank's part of checkpoint `step`.

        The session owns `checkpoint_dir` from then on and removes it once stored; with `upload="async"` that
        may be after the call returns.
        """


class RaySession:
    """A Ray Train worker's session.

    The checkpoint to resume is the one Ray Train hands the worker group (after a restart, the
    latest the run reported), else `resume_from`: the run's latest checkpoint the driver's plan found,
    for a run directory whose checkpoints Ray Train has no record of (copied from other storage).
    """

    def __init__(self, resume_from: Optional[str] = None) -> None:
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        self.rank, self.local_rank = context.get_world_rank(), context.get_local_rank()
        self.world_size = context.get_world_size()
        self.device = ray.train.torch.get_device()
        self._restored = ray.train.get_checkpoint()
        if self._restored is None and resume_from is not None:
            from framework import storage

            fs, path = storage.resolve(resume_from)
            self._restored = ray.train.Checkpoint(path, filesystem=fs)

    @contextlib.contextmanager
    def checkpoint(self) -> Iterator[Optional[str]]:
        if self._restored is None:
            yield None
            return
        with self._restored.as_directory() as directory:
            yield directory

    def checkpoint_name(self) -> Optional[str]:
        return self._restored.path if self._restored is not None else None

    def report(self, metrics: Dict[str, Any], checkpoint_dir: Optional[str] = None, step: int = 0, upload: str = "sync") -> None:
        import ray.train
        from ray.train import CheckpointUploadMode

        if checkpoint_dir is None:
            ray.train.report(metrics)
            return
        ray.train.report(
            metrics, checkpoint=ray.train.Checkpoint.from_directory(checkpoint_dir),
            checkpoint_dir_name=checkpoint.checkpoint_dir_name(step),
            checkpoint_upload_mode=CheckpointUploadMode.ASYNC if upload == "async" else CheckpointUploadMode.SYNC,
            delete_local_checkpoint_after_upload=True,
        )


class LocalSession:
    """One process, no Ray: world of one, checkpoints kept under `run_dir` (the newest `keep`), reports kept in `reports`."""

    def __init__(self, run_dir: str, keep: int, setup_timeout_s: int, use_gpu: bool = False) -> None:
        from datetime import timedelta

        import torch.distributed as dist

        if "://" in run_dir:
            raise ValueError(f"{run_dir}: a bare session keeps its checkpoints in a local directory")
        self.rank = self.local_rank = 0
        self.world_size = 1
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.run_dir, self.keep = run_dir, keep
        self.reports: List[Dict[str, Any]] = []
        if not dist.is_initialized():
            # DeepSpeed needs a process group even for one process.
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(free_port()))
            for name in ("RANK", "LOCAL_RANK"):
                os.environ.setdefault(name, "0")
            os.environ.setdefault("WORLD_SIZE", "1")
            dist.init_process_group(
                "nccl" if self.device.type == "cuda" else "gloo", rank=0, world_size=1, timeout=timedelta(seconds=setup_timeout_s)
            )

    @contextlib.contextmanager
    def checkpoint(self) -> Iterator[Optional[str]]:
        yield checkpoint.latest_checkpoint(self.run_dir)

    def checkpoint_name(self) -> Optional[str]:
        return checkpoint.latest_checkpoint(self.run_dir)

    def report(self, metrics: Dict[str, Any], checkpoint_dir: Optional[str] = None, step: int = 0, upload: str = "sync") -> None:
        self.reports.append(dict(metrics))
        if checkpoint_dir is None:
            return
        target = os.path.join(self.run_dir, checkpoint.checkpoint_dir_name(step))
        shutil.rmtree(target, ignore_errors=True)
        shutil.move(checkpoint_dir, target)
        checkpoint.mark_complete(self.run_dir, checkpoint.checkpoint_dir_name(step), step)
        kept = sorted(n for n in os.listdir(self.run_dir) if n.startswith("checkpoint_"))
        for name in kept[: -self.keep]:
            shutil.rmtree(os.path.join(self.run_dir, name), ignore_errors=True)
