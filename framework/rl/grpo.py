"""GRPO's arithmetic: group-normalised advantages and the clipped policy-gradient objective, as TRL defines them.

The definitions follow TRL's GRPOTrainer (trl/trainer/grpo_trainer.py: `_generate_and_score_completions` for the
advantages, `_compute_loss` for the objective), with r the weighted rewards of a group of G completions of one
prompt, π the policy, π_old the policy that sampled (its log-probs recomputed by the trainer), π_ref the reference:

  advantage   A_i = (r_i − mean(r)) / (std(r) + 1e-4)     scale_rewards=group: the group's std (Bessel-corrected);
                                                           batch: the whole step's; none: no division (Dr. GRPO)
  ratio       ρ_t = exp(log π(y_t) − log π_old(y_t))
  surrogate   L_t = −min(ρ_t·A_i, clip(ρ_t, 1 − ε_low, 1 + ε_high)·A_i)
  KL (β > 0)  L_t += β·(exp(log π_ref − log π) − (log π_ref − log π) − 1)     (the k3 estimator)

and the step's loss is a mean of L_t over its completions' tokens, one of two ways (`loss_normalization`):

  token       Σ_t L_t / (completion tokens of the whole step)                 (TRL's dapo and bnpo on one worker)
  sequence    mean over completions of (Σ_t L_t / that completion's tokens)    (TRL's grpo: each completion weighs the same)

so that, as every loss of the project, the step's loss is the same on any worker count (framework/train/loop.py
divides summed losses by summed units: tokens, or completions).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from framework.rl.config import NORMALIZATIONS, SCALES

# Added to the std before dividing: TRL's constant (a group of equal rewards has advantage 0, not nan).
STD_EPS = 1e-4


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str) -> torch.Tensor:
    """Per completion: its reward minus its group's mean, over the group's (or the batch's) std + 1e-4.

    `rewards` holds consecutive groups of `group_size` completions of one prompt.
    """
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    groups = rewards.view(-1, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale == "group":
        centred = centred / (groups.std(dim=1, keepdim=True) + STD_EPS)
    elif scale == "batch":
        centred = centred / (rewards.std() + STD_EPS)
    elif scale != "none":
        raise ValueError(f"scale_rewards={scale}: expected one of {', '.join(SCALES)}")
    return centred.reshape(-1)


def equal_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per group: whether all its completions got the same reward (no signal: every advantage is 0)."""
    groups = rewards.view(-1, group_size)
    return (groups == groups[:, :1]).all(dim=1)


@dataclass
class TokenLosses:
    loss: torch.Tensor        # [N, T] per-token loss L_t (0 outside the mask)
    clipped: torch.Tensor     # [N, T] 1 where the clip is what the min took (the gradient is cut), else 0
    kl: Optional[torch.Tensor]  # [N, T] the k3 KL estimate, when there is a reference


def token_losses(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                 epsilon_low: float, epsilon_high: float, beta: float = 0.0,
                 ref_logps: Optional[torch.Tensor] = None) -> TokenLosses:
    """The clipped surrogate (plus β·KL) per completion token; `advantages` is per completion ([N]), the rest [N, T]."""
    ratio = torch.exp(logps - old_logps)
    a = advantages.unsqueeze(1)
    unclipped, clipped = ratio * a, torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high) * a
    loss = -torch.min(unclipped, clipped)
    # TRL's clip ratios: the ratio left the trust region on the side the advantage pushes it to.
    cut = ((ratio < 1 - epsilon_low) & (a < 0)) | ((ratio > 1 + epsilon_high) & (a > 0))
    kl = None
    if beta:
        if ref_logps is None:
            raise ValueError("beta > 0 needs the reference's log-probs")
        delta = ref_logps - logps
        kl = torch.exp(delta) - delta - 1
        loss = loss + beta * kl
    m = mask.to(loss.dtype)
    return TokenLosses(loss=loss * m, clipped=cut.to(loss.dtype) * m, kl=None if kl is None else kl * m)


def loss_sum(losses: TokenLosses, mask: torch.Tensor, normalization: str) -> torch.Tensor:
    """The micro-batch's share of the step's loss, before division by the step's units (`units`)."""
    if normalization == "token":
        return losses.loss.sum()
    if normalization == "sequence":
        return (losses.loss.sum(dim=1) / mask.sum(dim=1).clamp(min=1)).sum()
    raise ValueError(f"loss_normalization={normalization}: expected one of {', '.join(NORMALIZATIONS)}")


def units(mask: torch.Tensor, normalization: str) -> float:
    """What the step's loss is a mean over: completion tokens, or completions."""
    return float(mask.sum()) if normalization == "token" else float(mask.shape[0])
