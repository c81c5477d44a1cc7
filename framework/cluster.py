"""Connecting to Ray: the embedded local cluster by default, or a running cluster by address."""

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


def cluster_cpus() -> float:
    """CPUs the whole cluster offers (what a job is sized against)."""
    return float(ray.cluster_resources().get("CPU", 0.0))


def cluster_gpus() -> float:
    return float(ray.cluster_resources().get("GPU", 0.0))
