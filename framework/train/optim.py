"""The optimizer (`optim.name`) and the learning-rate schedule, built from `conf/optim/*`."""

from __future__ import annotations

from typing import Any, List

import torch
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from framework.train.config import OPTIMIZERS, OptimConfig


def param_groups(model: torch.nn.Module, weight_decay: float) -> list:
    """The trainable parameters in two groups, each named (`decay`): matrices decay, biases and norm weights (1-D) do not."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay, "decay": True},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0, "decay": False},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(model: torch.nn.Module, optim: OptimConfig, fused: bool) -> torch.optim.Optimizer:
    """`optim.name`'s optimizer over the model's trainable parameters."""
    return getattr(torch.optim, OPTIMIZERS[optim.name])(
        param_groups(model, optim.weight_decay), lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps, fused=fused
    )


def build_lr_schedule(optimizer: torch.optim.Optimizer, optim: OptimConfig, max_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up to optim.lr, then cosine down to optim.lr × optim.min_lr_ratio at run.max_steps."""
    return get_cosine_with_min_lr_schedule_with_warmup(optimizer, optim.warmup_steps, max_steps, min_lr_rate=optim.min_lr_ratio)


def scheduled_lr(optim: OptimConfig, max_steps: int, step: int) -> float:
    """The LR the schedule gives at `step` for these settings."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=optim.lr)
    return optim.lr * build_lr_schedule(optimizer, optim, max_steps).lr_lambdas[0](step)


def decay_flags(engine: Any) -> List[bool]:
    """Which of the engine's param groups decay (`param_groups`' `decay`), read before a checkpoint is loaded into it."""
    return [bool(group.get("decay", True)) for group in engine.optimizer.param_groups]


def apply_optim_settings(engine: Any, optim: OptimConfig, max_steps: int, step: int, decays: List[bool]) -> None:
    """Make an engine restored from a checkpoint train on with `optim`'s values, not the checkpoint's.

    DeepSpeed's load_checkpoint restores the optimizer's param groups (lr, betas, eps, weight decay),
    the schedule's base LR and, under ZeRO-1/2, the clipping norm, all as the checkpoint's run had
    them. A resumed run (a changed optim.lr, say) and a PBT clone (another trial's checkpoint) must
    train with their own config: the schedule's shape (warm-up, minimum ratio, run.max_steps) is
    already this config's, built before loading; only its position came from the checkpoint.
    `decays` (`decay_flags` before loading) says which groups decay: DeepSpeed 0.19's ZeRO-3 universal
    load copies the first group's settings, `decay` included, into every group.
    """
    lr = scheduled_lr(optim, max_steps, step)
    for group, decay in zip(engine.optimizer.param_groups, decays):
        group.update(lr=lr, betas=(optim.beta1, optim.beta2), eps=optim.eps, weight_decay=optim.weight_decay if decay else 0.0, decay=decay)
    scheduler = engine.lr_scheduler
    scheduler.base_lrs = [optim.lr] * len(scheduler.base_lrs)
    scheduler._last_lr = [lr] * len(scheduler.base_lrs)  # what get_last_lr() reports until the next step
    if hasattr(engine.optimizer, "clip_grad"):  # ZeRO-1/2 keep their own copy of gradient_clipping
        engine.optimizer.clip_grad = optim.grad_clip
