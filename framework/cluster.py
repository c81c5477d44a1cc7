"""Connecting to Ray (the embedded local cluster by default, or a running cluster by address), and the machine in words."""

from __future__ import annotations

import os
from typing import Optional

import ray


def connect(address: Optional[str] = None) -> None:
    """Join the cluster at `address` (or RAY_ADDRESS); with neither, start a local cluster in-process."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    # Workers import `framework` from the driver's environment; nothing else needs shipping locally.
    ray.init(address=address, logging_level="WARNING", log_to_driver=True)


def machine() -> str:
    """This machine in words, for every figure that depends on it: the CPU model and count, and the GPU if any."""
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{cpu}, {os.cpu_count()} CPUs{gpu}"
