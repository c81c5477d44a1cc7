"""The searches (`tune.search`) and schedulers (`tune.scheduler`) a sweep can name: each its rules and the Tune object it builds.

A new search or scheduler is one registered `Algorithm`; `framework/tune/plan.py` checks a sweep
against the chosen pair and `framework/tune/runner.py` builds them, neither by if/elif.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from framework.config import Registry, require
from framework.tune import pbt
from framework.tune.sweep import Sweep


@dataclass(frozen=True)
class Algorithm:
    # The sweep's rules for this choice; raises ConfigError naming the first bad `tune.*` key.
    check: Callable[[Sweep], None]
    # The Tune search algorithm or trial scheduler for the sweep.
    build: Callable[[Sweep], Any]


SEARCHES: Registry[Algorithm] = Registry("tune.search")
SCHEDULERS: Registry[Algorithm] = Registry("tune.scheduler")


def _no_rules(sweep: Sweep) -> None:
    return None


def _variant_generator(sweep: Sweep) -> Any:
    """Random and grid search: Tune's variant generator, which limits concurrency itself."""
    from ray.tune.search import BasicVariantGenerator

    return BasicVariantGenerator(random_state=sweep.tune.seed, max_concurrent=sweep.tune.max_concurrent_trials)


def _check_grid(sweep: Sweep) -> None:
    for p in sweep.params.values():
        if p.sampled:
            require(p.listed, f"tune.space.{p.key}", p.text, "grid search takes lists of values: choice(a, b, ...) or range(start, stop, step)")


def _check_optuna(sweep: Sweep) -> None:
    for p in sweep.params.values():
        if p.sampled:
            require(
                all(isinstance(v, (str, int, float, bool)) for v in p.values), f"tune.space.{p.key}", p.text,
                "Optuna chooses among numbers, strings and booleans",
            )


def _optuna(sweep: Sweep) -> Any:
    """Optuna's TPE sampler, seeded, behind a concurrency limit."""
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    return ConcurrencyLimiter(OptunaSearch(seed=sweep.tune.seed), max_concurrent=sweep.tune.max_concurrent_trials)


SEARCHES.register("random")(Algorithm(_no_rules, _variant_generator))
SEARCHES.register("grid")(Algorithm(_check_grid, _variant_generator))
SEARCHES.register("optuna")(Algorithm(_check_optuna, _optuna))


def _fifo(sweep: Sweep) -> Any:
    from ray.tune.schedulers import FIFOScheduler

    return FIFOScheduler()


def _check_asha(sweep: Sweep) -> None:
    asha, max_steps = sweep.tune.asha, sweep.base.run.max_steps
    require(asha.grace_period >= 1, "tune.asha.grace_period", asha.grace_period, "expected at least 1 step")
    require(
        asha.grace_period < max_steps, "tune.asha.grace_period", asha.grace_period,
        f"expected fewer steps than run.max_steps={max_steps}, or no trial can be stopped early",
    )
    require(asha.reduction_factor >= 2, "tune.asha.reduction_factor", asha.reduction_factor, "expected at least 2")


def _asha(sweep: Sweep) -> Any:
    """ASHA on `step`; one past the last step, so that a trial reaching run.max_steps ends by itself, cleanly,
    rather than being stopped by ASHA at its final report."""
    from ray.tune.schedulers import ASHAScheduler

    asha = sweep.tune.asha
    return ASHAScheduler(time_attr="step", max_t=sweep.last_step + 1, grace_period=asha.grace_period, reduction_factor=asha.reduction_factor)


SCHEDULERS.register("fifo")(Algorithm(_no_rules, _fifo))
SCHEDULERS.register("asha")(Algorithm(_check_asha, _asha))
SCHEDULERS.register("pbt")(Algorithm(pbt.check_pbt, pbt.scheduler))
