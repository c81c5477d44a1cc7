"""The `tune` group's schema (`conf/tune/*`: an optional group of the one config tree), read by the sweep's modules."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List

from omegaconf import MISSING


@dataclass
class AshaConfig:
    # Steps every trial trains before it can be stopped; rungs follow at grace_period × reduction_factor^k.
    grace_period: int = MISSING
    # At each rung a trial continues only if it is in the best 1/reduction_factor of those that reached it.
    reduction_factor: int = MISSING


@dataclass
class PbtConfig:
    # Steps between exploit/explore decisions; a multiple of run.checkpoint_interval, so that a
    # decision always has a fresh checkpoint of the better trial to clone.
    perturbation_interval: int = MISSING
    # The bottom fraction of trials clones the top fraction.
    quantile_fraction: float = MISSING
    # Chance that an explored value is drawn anew from its distribution instead of scaled by 0.8 or 1.2.
    resample_probability: float = MISSING
    # Wait for the whole population at each perturbation interval and decide for all trials at once
    # (Tune's synchronous PBT): the same exploits every run, at the cost of trials idling while they wait.
    synch: bool = MISSING


@dataclass
class TuneConfig:
    # Names the sweep's folder; running a sweep of the same name again resumes it.
    name: str = MISSING
    # Override name → a sweep in Hydra's override grammar (framework/tune/space.py), e.g.
    # `optim.lr: tag(log, interval(1e-4, 3e-3))`, `deepspeed: choice(zero1, zero2)`.
    space: Dict[str, Any] = MISSING
    search: str = MISSING  # random | grid | optuna
    scheduler: str = MISSING  # fifo | asha | pbt
    # val_loss | val_perplexity | train_loss, or a score of eval.json (launch/eval.py) such as eval/<task>/acc or
    # val/perplexity: then early stopping and the search follow val_loss, and the finished trials are ranked on the
    # score, each exported and evaluated with `eval` (framework/tune/promotion.py).
    metric: str = MISSING
    mode: str = MISSING  # min | max (for an eval score: its direction, which must be eval.json's higher_is_better)
    eval: List[str] = MISSING  # conf/eval.yaml overrides scoring each finished trial when tune.metric is an eval score
    # Trials drawn from the space (grid: repetitions of the whole grid).
    num_samples: int = MISSING
    # Trials training at once; each runs run.num_workers Train workers.
    max_concurrent_trials: int = MISSING
    seed: int = MISSING
    # Ray Tune's experiment and every trial's Train run live under <storage_path>/<name> (local or a URI).
    storage_path: str = MISSING
    # Results table, plots, best.json and the promoted Hugging Face folder (a local directory).
    output_dir: str = MISSING
    # Export the best trial's checkpoint to <output_dir>/best when the sweep ends.
    promote: bool = MISSING
    # Also export every finished trial to <output_dir>/trials/<trial> (a LoRA trial with its adapter/, which
    # `launch/serve.py serve.adapters_from=<output_dir>` serves); a sweep ranked on an eval score exports them anyway.
    export_trials: bool = MISSING
    # Ray Tune's console output: 0 silent, 1 status updates, 2 every result.
    verbose: int = MISSING
    asha: AshaConfig = field(default_factory=AshaConfig)
    pbt: PbtConfig = field(default_factory=PbtConfig)
