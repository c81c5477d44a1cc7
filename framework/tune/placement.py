"""The placement-group janitor: gives back the Train workers' reservation of a trial that Tune ended.

Tune ends a trial by ending its actor (ASHA stopping it, PBT pausing or exploiting it, an interrupted
sweep), which takes the trial's Train controller with it before the controller can release its
workers' placement group. A placement group lives as long as the job that created it, so without
help the reservation outlives the trial and the next trial's workers wait for CPUs forever.

Ray 2.60's own `PlacementGroupCleaner` (started by every Train run) removes it only where Ray's state
API answers: with the dashboard running, and one Ray instance per host (it finds the cluster by
address lookup). Neither holds on a cluster started with `--include-dashboard=false`, in the test
suite's cluster, or on a machine shared by several Ray instances, and the trial then hangs; so the
sweep runs this janitor as well (tests/test_tune.py: an ASHA sweep whose stopped trials are followed
by others on the same CPUs). The driver owns it; it asks the core API whether a controller is alive.
"""

from __future__ import annotations

import threading
import time
from typing import Any, List

import ray
from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

# The one private import of the sweep: Ray Train has no public hook that tells which placement group
# a run's workers hold (UserCallback sees reports and errors only, and Train names no group), while
# WorkerGroupCallback.after_worker_group_start is handed the worker group itself.
from ray.train.v2._internal.execution.callback import WorkerGroupCallback


@ray.remote(num_cpus=0)
class PlacementGroupJanitor:
    """Removes a Train run's worker placement group once its controller is gone."""

    def __init__(self, interval_s: float = 1.0):
        self.groups: List[Any] = []  # (controller handle, placement group)
        self.lock = threading.Lock()
        threading.Thread(target=self._watch, args=(interval_s,), name="janitor", daemon=True).start()

    def register(self, controller: Any, group: PlacementGroup) -> None:
        with self.lock:
            self.groups.append((controller, group))

    def wait_released(self, timeout_s: float) -> int:
        """Wait until every registered group is gone with its controller, at most `timeout_s`; gives how many remain.

        The sweep's driver asks this before it ends the janitor: trials that Tune stopped last (an
        interrupted sweep's running trials, a trial stopped at the last rung) may still hold theirs.
        """
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self.lock:
                if not self.groups:
                    return 0
            time.sleep(0.2)
        with self.lock:
            return len(self.groups)

    def _watch(self, interval_s: float) -> None:
        while True:
            time.sleep(interval_s)
            with self.lock:
                groups = list(self.groups)
            for controller, group in groups:
                try:
                    ray.get(controller.__ray_ready__.remote(), timeout=10)
                    continue  # the controller is alive and owns its group
                except ray.exceptions.GetTimeoutError:
                    continue  # busy, hence alive
                except ray.exceptions.RayActorError:
                    pass
                if placement_group_table(group).get("state") != "REMOVED":
                    remove_placement_group(group)
                with self.lock:
                    self.groups.remove((controller, group))


class RegisterPlacementGroup(WorkerGroupCallback):
    """A Train callback that tells the janitor which placement group this run's workers hold."""

    def __init__(self, janitor: Any):
        self.janitor = janitor

    def after_worker_group_start(self, worker_group: Any) -> None:
        group = worker_group.get_worker_group_state().placement_group_handle.placement_group
        self.janitor.register.remote(ray.get_runtime_context().current_actor, group)


def release(janitor: Any, timeout_s: float = 60.0) -> None:
    """End the janitor once the trials Tune stopped last have given their workers' placement groups back.

    A group left behind would hold its CPUs for whatever this process runs next (another sweep, a training run).
    """
    left = ray.get(janitor.wait_released.remote(timeout_s))
    if left:
        print(f"tune: {left} trial placement groups were still held after {timeout_s:.0f}s; Ray frees them when this job ends", flush=True)
    ray.kill(janitor)
