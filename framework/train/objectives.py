"""What a training step minimises: the token loss (pretraining, SFT) or a preference loss (the `post` group: DPO, IPO,
SimPO, ORPO), each with the metrics it logs, for training steps and validation alike.

The loop (framework/train/loop.py) is the same for all: per micro-batch `objective.loss(engine, batch, scale)` gives
the loss to back-propagate and a vector of sums (summed over micro-batches and workers, then turned into metrics by
`objective.metrics`), and `objective.units(batch)` what the step's loss is a mean over: target tokens, or pairs. So
the loss of a step is the mean over its global batch on any worker count, as for SFT.

Preference losses read rows of preference pairs (framework/data/chat.py: render_pairs): each pair is two adjacent
segments of a row, prompt + chosen (`pair_mask` 1 on its response's targets) then prompt + rejected (2). A response's
log-probability is the sum of its target tokens' log-probs, taken per segment of the packed row (positions restart
at each segment and attention stays inside it), or their mean (`average`: IPO, SimPO, ORPO, as TRL computes them).

The definitions follow TRL (trl/trainer/dpo_trainer.py: DPOTrainer.dpo_loss; cpo_trainer.py: CPOTrainer.cpo_loss,
loss_type="simpo"; orpo_trainer.py: ORPOTrainer.odds_ratio_loss), with π the policy, π_ref the reference and
log π(y|x) the response's log-probability:

  dpo    h = (log π(y_w|x) − log π_ref(y_w|x)) − (log π(y_l|x) − log π_ref(y_l|x))
         loss = −(1−ε)·log σ(β·h) − ε·log σ(−β·h)                       (Rafailov et al. 2023; ε: label smoothing)
  ipo    loss = (h − 1/(2β))², h from mean token log-probs                 (Azar et al. 2023)
  simpo  h = mean log π(y_w|x) − mean log π(y_l|x) − γ/β
         loss = −(1−ε)·log σ(β·h) − ε·log σ(−β·h); no reference            (Meng et al. 2024)
  orpo   loss = −mean log π(y_w|x) − β·log σ(log odds(y_w) − log odds(y_l)),
         odds(y) = p/(1−p), p = exp(mean log π(y|x)); no reference          (Hong et al. 2024; β is ORPO's λ)

Rewards are β·(log π − log π_ref) with a reference, β·log π without one (TRL's); the margin is chosen − rejected;
accuracy the share of pairs whose chosen reward is strictly higher (a tie, as at DPO's first step, is no win).
ORPO's NLL term is each pair's mean over its chosen tokens (TRL averages over the batch's chosen tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from framework.config import Registry
from framework.data.shards import PAIRS_COLUMN
from framework.data.stream import IGNORE_INDEX, POSITIONS, Batch, ShardReader, eval_batches, target_tokens
from framework.evaluate import loss_sums, token_metrics

# The metrics of a preference objective, logged as train/<name> every step and val/<name> at every evaluation, and
# reported to Tune as val_<name with _ for /> (framework/tune/plan.py: METRICS lists them).
PREFERENCE_METRICS = (
    "loss", "rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy", "logps/chosen", "logps/rejected",
)


def report_key(name: str) -> str:
    """The name a logged metric (`val/rewards/accuracy`) is reported to Ray Train and Tune under (`val_rewards_accuracy`)."""
    return name.replace("/", "_")


@dataclass(frozen=True)
class PreferenceLoss:
    # Whether the loss compares with a reference model's log-probs (DPO, IPO) or needs none (SimPO, ORPO).
    reference: bool
    # Log-probs as the mean over each response's tokens (length-normalised) rather than their sum.
    average: bool
    # (policy chosen, policy rejected, reference chosen, reference rejected, post) → per-pair (loss, chosen reward,
    # rejected reward); the reference log-probs are None for a loss without reference.
    losses: Callable[..., Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


LOSSES: Registry[PreferenceLoss] = Registry("post.loss")


def _sigmoid_loss(h: torch.Tensor, post: Any) -> torch.Tensor:
    return -F.logsigmoid(post.beta * h) * (1 - post.label_smoothing) - F.logsigmoid(-post.beta * h) * post.label_smoothing


def _dpo(c: torch.Tensor, r: torch.Tensor, rc: torch.Tensor, rr: torch.Tensor, post: Any) -> Tuple[torch.Tensor, ...]:
    h = (c - rc) - (r - rr)
    return _sigmoid_loss(h, post), post.beta * (c - rc).detach(), post.beta * (r - rr).detach()


def _ipo(c: torch.Tensor, r: torch.Tensor, rc: torch.Tensor, rr: torch.Tensor, post: Any) -> Tuple[torch.Tensor, ...]:
    h = (c - rc) - (r - rr)
    return (h - 1 / (2 * post.beta)) ** 2, post.beta * (c - rc).detach(), post.beta * (r - rr).detach()


def _simpo(c: torch.Tensor, r: torch.Tensor, rc: Any, rr: Any, post: Any) -> Tuple[torch.Tensor, ...]:
    h = (c - r) - post.simpo_gamma / post.beta
    return _sigmoid_loss(h, post), post.beta * c.detach(), post.beta * r.detach()


def _orpo(c: torch.Tensor, r: torch.Tensor, rc: Any, rr: Any, post: Any) -> Tuple[torch.Tensor, ...]:
    # log(1 − p) = log(−expm1(log p)); a mean log-prob of exactly 0 (p = 1) would make it −inf.
    c_, r_ = c.clamp(max=-1e-6), r.clamp(max=-1e-6)
    log_odds = (c_ - r_) - (torch.log(-torch.expm1(c_)) - torch.log(-torch.expm1(r_)))
    return -c - post.beta * F.logsigmoid(log_odds), post.beta * c.detach(), post.beta * r.detach()


LOSSES.register("dpo")(PreferenceLoss(reference=True, average=False, losses=_dpo))
LOSSES.register("ipo")(PreferenceLoss(reference=True, average=True, losses=_ipo))
LOSSES.register("simpo")(PreferenceLoss(reference=False, average=True, losses=_simpo))
LOSSES.register("orpo")(PreferenceLoss(reference=False, average=True, losses=_orpo))


# ---------------------------------------------------------------------------------------------
# Response log-probs over packed rows

def _segments(batch: Batch) -> torch.Tensor:
    """For each predicted token (positions 1..T-1), a number unique to its row's segment, ascending in row order."""
    positions = batch[POSITIONS]
    rows, length = positions.shape
    within = torch.cumsum((positions == 0).long(), dim=1)[:, 1:]
    return within + torch.arange(rows, device=positions.device).unsqueeze(1) * (length + 1)


def count_pairs(batch: Batch) -> int:
    """The preference pairs in a batch: the segments that hold a chosen response's targets."""
    chosen = (batch[PAIRS_COLUMN][:, 1:] == 1) & (batch["labels"][:, 1:] != IGNORE_INDEX)
    return int(torch.unique(_segments(batch)[chosen]).numel())


def response_logps(logits: torch.Tensor, batch: Batch, average: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(chosen, rejected) log-probs of every pair in `batch`, in row order (sums over each response's target tokens, or
    means with `average`), and the two responses' target token counts."""
    labels = batch["labels"][:, 1:]
    targets = labels != IGNORE_INDEX
    token_logps = -F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
    ).view_as(labels)
    kind = torch.where(targets, batch[PAIRS_COLUMN][:, 1:], torch.zeros_like(labels))
    segments = _segments(batch).flatten()
    slots = batch[POSITIONS].numel() + batch[POSITIONS].shape[0]
    out = []
    for which in (1, 2):
        mine = (kind == which).flatten()
        sums = torch.zeros(slots, device=logits.device, dtype=torch.float32).index_add(0, segments, token_logps.flatten() * mine)
        counts = torch.zeros(slots, device=logits.device, dtype=torch.float32).index_add(0, segments, mine.float())
        present = counts > 0
        out.append((sums[present], counts[present]))
    (chosen, chosen_n), (rejected, rejected_n) = out
    # Chosen and rejected are adjacent segments of one row, chosen first: the k-th of each are one pair.
    assert chosen.shape == rejected.shape, (chosen.shape, rejected.shape)
    if average:
        chosen, rejected = chosen / chosen_n, rejected / rejected_n
    return chosen, rejected, chosen_n, rejected_n


def _logits(module: Any, batch: Batch) -> torch.Tensor:
    # No labels (no token loss computed) and no KV cache (packed rows' position ids are read as document boundaries).
    return module(input_ids=batch["input_ids"], position_ids=batch[POSITIONS], use_cache=False).logits


# ---------------------------------------------------------------------------------------------
# The reference model

Reference = Callable[[Batch], torch.Tensor]  # a batch → the reference model's logits, without gradients


def adapters_disabled(module: Any) -> Reference:
    """The reference of a LoRA run: the policy's own frozen base, its adapters switched off (no second copy)."""

    @torch.no_grad()
    def logits(batch: Batch) -> torch.Tensor:
        with module.disable_adapter():
            return _logits(module, batch)

    return logits


def frozen_model(module: Any) -> Reference:
    """The reference of a full fine-tune: a frozen copy of the starting weights (a DeepSpeed engine, or a plain module)."""

    @torch.no_grad()
    def logits(batch: Batch) -> torch.Tensor:
        return _logits(module, batch)

    return logits


def frozen_copy(model_config: Any, cfg: Any, ds_config: Dict[str, Any]) -> Any:
    """The starting weights again, frozen, in their own DeepSpeed engine: partitioned like the policy under ZeRO-3,
    a whole copy on each worker under ZeRO 0-2 (those stages partition optimizer state and gradients, which a frozen
    model has none of), and cast to the run's precision. TRL prepares its reference the same way
    (trl/models/utils.py: prepare_deepspeed)."""
    import deepspeed

    from framework.model import build_model

    model = build_model(cfg.model, model_config, cfg.run.seed).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    config = {k: v for k, v in ds_config.items() if k not in ("gradient_clipping", "zero_force_ds_cpu_optimizer", "zero_allow_untested_optimizer")}
    stage = ds_config["zero_optimization"]["stage"]
    config["zero_optimization"] = dict(ds_config["zero_optimization"]) if stage == 3 else {"stage": 0}
    config["zero_optimization"].pop("offload_optimizer", None)
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    return engine


# ---------------------------------------------------------------------------------------------
# Objectives

class TokenObjective:
    """Pretraining and SFT: the mean cross-entropy over every target token of the step (transformers' own loss)."""

    width = 2  # sums: (token loss, target tokens)
    reference_kind = "none"
    baseline_eval = False

    def units(self, batch: Batch) -> float:
        return float(target_tokens(batch))

    def loss(self, engine: Any, batch: Batch, scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
        loss = engine(**batch, num_items_in_batch=scale).loss
        tokens = (batch["labels"][:, 1:] != IGNORE_INDEX).sum().double()  # target_tokens, left on the device (no sync)
        return loss, torch.stack([loss.detach().double() * scale, tokens])

    def metrics(self, sums: torch.Tensor, split: str) -> Dict[str, float]:
        return {f"{split}/loss": float(sums[0] / sums[1])}

    def evaluate(self, engine: Any, reader: ShardReader, rows: np.ndarray, micro_batch: int, rank: int, world: int,
                 device: torch.device) -> Dict[str, float]:
        """Mean token loss and perplexity over the evaluation rows (framework/evaluate.py), summed across workers."""
        totals = loss_sums(engine, reader, rows, rank, world, micro_batch, device)
        if world > 1:
            torch.distributed.all_reduce(totals)
        return token_metrics(totals)


class PreferenceObjective:
    """A preference loss of `post.loss` over pairs: the mean over the step's pairs, with rewards, margin and accuracy."""

    # sums: (loss, pairs, chosen rewards, rejected rewards, wins, chosen log-probs, rejected log-probs)
    width = 7

    def __init__(self, post: Any, reference: Optional[Reference], reference_kind: str) -> None:
        self.post, self.kind, self.reference, self.reference_kind = post, LOSSES.get(post.loss), reference, reference_kind
        # The start of a preference run is worth a record of its own: DPO's rewards are all 0 there (the policy is its
        # reference), and every later evaluation is read against it.
        self.baseline_eval = True

    def units(self, batch: Batch) -> float:
        return float(count_pairs(batch))

    def pair_losses(self, policy: Callable[[Batch], torch.Tensor], batch: Batch) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per pair: (loss, chosen reward, rejected reward, chosen log-prob, rejected log-prob), from `policy`'s logits."""
        ref_c = ref_r = None
        if self.kind.reference:
            ref_c, ref_r, _, _ = response_logps(self.reference(batch), batch, self.kind.average)
        c, r, _, _ = response_logps(policy(batch), batch, self.kind.average)
        losses, chosen, rejected = self.kind.losses(c, r, ref_c, ref_r, self.post)
        return losses, chosen, rejected, c.detach(), r.detach()

    def _sums(self, losses: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor, c: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        values = [losses.detach().sum(), torch.tensor(float(len(losses)), device=losses.device), chosen.sum(), rejected.sum(),
                  (chosen > rejected).float().sum(), c.sum(), r.sum()]
        return torch.stack([v.double() for v in values])

    def loss(self, engine: Any, batch: Batch, scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
        stats = self.pair_losses(lambda b: _logits(engine, b), batch)
        return stats[0].sum() / scale, self._sums(*stats)

    def metrics(self, sums: torch.Tensor, split: str) -> Dict[str, float]:
        pairs = float(sums[1])
        loss, chosen, rejected, wins, c, r = (float(sums[i]) / pairs for i in (0, 2, 3, 4, 5, 6))
        values = (loss, chosen, rejected, chosen - rejected, wins, c, r)
        return {f"{split}/{name}": v for name, v in zip(PREFERENCE_METRICS, values)}

    @torch.no_grad()
    def evaluate(self, engine: Any, reader: ShardReader, rows: np.ndarray, micro_batch: int, rank: int, world: int,
                 device: torch.device) -> Dict[str, float]:
        """The same metrics over the validation pairs (each pair once), summed across workers."""
        totals = torch.zeros(self.width, device=device, dtype=torch.float64)
        for batch, real in eval_batches(reader, rows, rank, world, micro_batch):
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            sums = self._sums(*self.pair_losses(lambda b: _logits(engine, b), batch))  # every worker runs every pass (ZeRO-3)
            if real:
                totals += sums
        if world > 1:
            torch.distributed.all_reduce(totals)
        return self.metrics(totals, "val")


def build_objective(cfg: Any, engine: Any, model_config: Any, ds_config: Dict[str, Any]) -> Any:
    """The objective of a run: the token loss without `post`; with it, the preference loss and its reference (LoRA: the
    adapters disabled; a full fine-tune: a frozen copy of the starting weights; SimPO and ORPO: none)."""
    if cfg.post is None:
        return TokenObjective()
    kind = LOSSES.get(cfg.post.loss)
    if not kind.reference:
        return PreferenceObjective(cfg.post, None, "none")
    if cfg.model.lora is not None:
        return PreferenceObjective(cfg.post, adapters_disabled(engine.module), "adapters")
    return PreferenceObjective(cfg.post, frozen_model(frozen_copy(model_config, cfg, ds_config)), "copy")


def reports(values: Dict[str, float]) -> Dict[str, float]:
    """Logged metrics under their reported names."""
    return {report_key(k): v for k, v in values.items()}


__all__: List[str] = [
    "LOSSES", "PREFERENCE_METRICS", "PreferenceLoss", "PreferenceObjective", "TokenObjective", "adapters_disabled",
    "build_objective", "count_pairs", "frozen_model", "report_key", "response_logps",
]
