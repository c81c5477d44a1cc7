"""What the training loop needs from whatever runs it: rank and world, a device, the checkpoint to resume, a way to report.

`RaySession` is a Ray Train worker (public `ray.train` APIs only); `LocalSession` is one bare process
(world of one, checkpoints in a local run directory), which is how the benchmark measures what Ray
Train costs on identical training code. The loop (`framework/train/loop.py`) sees only this interface.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
from typing import Any, Dict, Iterator, List, Optional, Protocol

import torch

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

    def report(self, metrics: Dict[str, Any], checkpoint_dir: Optional[str] = None, step: int = 0) -> None:
        """Hand over metrics (every rank, the same values) and, with `checkpoint_dir`, this rank's part of checkpoint `step`."""


class RaySession:
    """A Ray Train worker's session."""

    def __init__(self, resume_from: Optional[str] = None) -> None:
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        self.rank, self.local_rank = context.get_world_rank(), context.get_local_rank()
        self.world_size = context.get_world_size()
        self.device = ray.train.torch.get_device()
        # Ray hands back the run's own latest checkpoint; a new run seeded with another run's (a PBT
        # clone, framework/tune/pbt.py) has none yet and starts from the plan's `resume_from`.
        self._restored = ray.train.get_checkpoint() or (ray.train.Checkpoint(resume_from) if resume_from else None)

    @contextlib.contextmanager
    def checkpoint(self) -> Iterator[Optional[str]]:
        if self._restored is None:
            yield None
            return
        with self._restored.as_directory() as directory:
            yield directory

    def checkpoint_name(self) -> Optional[str]:
        return self._restored.path if self._restored is not None else None

    def report(self, metrics: Dict[str, Any], checkpoint_dir: Optional[str] = None, step: int = 0) -> None:
        import ray.train

        if checkpoint_dir is None:
            ray.train.report(metrics)
        else:
            ray.train.report(
                metrics, checkpoint=ray.train.Checkpoint.from_directory(checkpoint_dir),
                checkpoint_dir_name=checkpoint.checkpoint_dir_name(step),
            )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalSession:
    """One process, no Ray: world of one, checkpoints kept under `run_dir` (the newest `keep`), reports kept in `reports`."""

    def __init__(self, run_dir: str, keep: int, use_gpu: bool = False) -> None:
        import torch.distributed as dist

        self.rank = self.local_rank = 0
        self.world_size = 1
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.run_dir, self.keep = run_dir, keep
        self.reports: List[Dict[str, Any]] = []
        if not dist.is_initialized():
            # DeepSpeed needs a process group even for one process.
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
            for name in ("RANK", "LOCAL_RANK"):
                os.environ.setdefault(name, "0")
            os.environ.setdefault("WORLD_SIZE", "1")
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo", rank=0, world_size=1)

    @contextlib.contextmanager
    def checkpoint(self) -> Iterator[Optional[str]]:
        yield checkpoint.latest_checkpoint(self.run_dir)

    def checkpoint_name(self) -> Optional[str]:
        return checkpoint.latest_checkpoint(self.run_dir)

    def report(self, metrics: Dict[str, Any], checkpoint_dir: Optional[str] = None, step: int = 0) -> None:
        self.reports.append(dict(metrics))
        if checkpoint_dir is None:
            return
        target = os.path.join(self.run_dir, checkpoint.checkpoint_dir_name(step))
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(checkpoint_dir, target)
        kept = sorted(n for n in os.listdir(self.run_dir) if n.startswith("checkpoint_"))
        for name in kept[: -self.keep]:
            shutil.rmtree(os.path.join(self.run_dir, name), ignore_errors=True)
