"""Connecting to Ray (the embedded local cluster by default, or a running cluster by address), and the machine in words."""

from __future__ import annotations

import os
import socket
from typing import Optional

import ray

# Ray's own processes that find the cluster themselves (Ray Train's PlacementGroupCleaner, through the state
# API) look for "the" local Ray instance when given no address: with a second one on the host (a sweep beside
# a serve, two users) they fail with "Found multiple active Ray instances". The local cluster started here
# therefore listens on a GCS port chosen here (Ray reads it from this variable), and every process of the
# job is told that address as RAY_ADDRESS.
GCS_PORT_VARIABLE = "RAY_GCS_SERVER_PORT"


def connect(address: Optional[str] = None) -> None:
    """Join the cluster at `address` (or RAY_ADDRESS); with neither, start a local cluster in-process."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level="WARNING", log_to_driver=True)
        return
    chosen = GCS_PORT_VARIABLE not in os.environ  # a port the user set is kept
    port = os.environ.setdefault(GCS_PORT_VARIABLE, str(free_port("")))
    try:
        # Workers import `framework` from the driver's environment; nothing else needs shipping locally.
        ray.init(logging_level="WARNING", log_to_driver=True,
                 runtime_env={"env_vars": {"RAY_ADDRESS": f"{ray.util.get_node_ip_address()}:{port}"}})
    finally:
        if chosen:
            os.environ.pop(GCS_PORT_VARIABLE)


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


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now on `host` ("": every interface), for a server that binds it a moment later."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
