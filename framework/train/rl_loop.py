"""The GRPO loop (experiment=grpo), per worker: rollout → rewards → advantages → clipped policy gradient → DeepSpeed
step → weight sync → log → evaluate → checkpoint.

One step, with B = run.global_batch_size prompts, G = rl.group_size, W workers:

  1. rank 0 reads the step's B prompt rows (the seeded sample order every data set has: a resumed run samples the same
     prompts) and asks the rollout engine (framework/rl/rollout.py: vLLM in a Ray actor) for G completions of each,
     each prompt's sampling seeded by (run.seed, step, row), with the log-probs of the distribution it sampled from
  2. rank 0 scores them (framework/rl/rewards.py) and computes the group-normalised advantages (framework/rl/grpo.py),
     then hands every worker its B/W prompts' groups (a scatter over the process group)
  3. every worker recomputes the log-probs of the sampled tokens with its policy (logits over rl.temperature), the
     reference's with rl.beta > 0, and back-propagates the clipped objective; the step's loss is a mean over its
     completion tokens (or completions) on all workers, as every loss of the project is
  4. after DeepSpeed's step (a rollout's last) the new weights (LoRA: the adapters) go to the engine as a folder's files through the
     object store (framework/train/policy_sync.py); ZeRO-3 workers gather them first

Each rollout trains rl.iterations (μ, TRL's num_iterations) steps. With μ = 1 the "old" log-probs of the ratio are the
trainer's own, detached, so the ratio is 1, the gradient is the plain policy gradient A·∇log π and the clip never binds
(train/clip_ratio reads 0). With μ > 1 the trainer takes them once, before the rollout's first step, and the later
steps' ratios move away from 1 until the clip cuts them; the weights go to the engine after the rollout's last step.
The engine's log-probs of the same tokens are compared with the trainer's (train/logprob_gap: what the sampler and
the trainer disagree by).
"""

from __future__ import annotations

import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from framework.data.prompts import PromptRow, prompt_rows
from framework.data.sampler import SampleOrder, worker_slice
from framework.data.stream import POSITIONS, ShardReader, split_blocks
from framework.rl.grpo import equal_groups, group_advantages, loss_sum, token_losses
from framework.rl.rewards import RewardFunction, reward_functions, score
from framework.rl.rollout import EngineSpec, Sample, start_engine
from framework.train import checkpoint
from framework.train.loop import all_reduced, logs_at, restore
from framework.train.metrics import MetricsLogger, peak_memory_gb, say
from framework.train.objectives import adapters_disabled, frozen_copy, frozen_model, report_key
from framework.train.plan import TrainPlan
from framework.train.policy_sync import policy_files
from framework.train.session import Session

# The sums every worker adds up over its micro-batches (then over workers): the train-side metrics' numerators and
# denominators. loss is the step's loss itself (each micro-batch's share already divided by the step's units).
TRAIN_SUMS = ("loss", "tokens", "kl", "entropy", "clipped", "logprob_gap")


# The sampling seed streams: a training step's prompts, and validation's (every evaluation of a run samples alike).
TRAIN_STREAM, VALIDATION_STREAM = 0, 1


def prompt_seed(seed: int, stream: int, step: int, row: int) -> int:
    """The sampling seed of one prompt's completions at one step: the same on any worker count and after a resume."""
    return int(np.random.SeedSequence([seed, stream, step, row]).generate_state(1)[0])


class Rollouts:
    """Rank 0's side of the engine: sampling and scoring (train steps and validation)."""

    def __init__(self, engine: Any, functions: Sequence[RewardFunction], rl: Any, seed: int) -> None:
        self.engine, self.functions, self.rl, self.seed = engine, functions, rl, seed

    def sample(self, rows: Sequence[PromptRow], row_ids: Sequence[int], stream: int, step: int, n: int,
               temperature: float) -> Tuple[List[List[Sample]], float]:
        """n completions of each prompt, and the seconds the engine took."""
        import ray

        started = time.perf_counter()
        groups = ray.get(self.engine.generate.remote(
            [r.ids for r in rows], n, self.rl.max_tokens, temperature, [prompt_seed(self.seed, stream, step, int(i)) for i in row_ids]))
        return groups, time.perf_counter() - started

    def score(self, rows: Sequence[PromptRow], groups: Sequence[Sequence[Sample]]) -> Any:
        flat = [(r, s) for r, g in zip(rows, groups) for s in g]
        return score(self.functions, [r.prompt for r, _ in flat], [s.text for _, s in flat], [s.token_ids for _, s in flat],
                     [r.fields for r, _ in flat])


def reward_metrics(scores: Any, samples: Sequence[Sample], prefix: str, correct_reward: float) -> Dict[str, float]:
    """The rewards of a batch of samples: mean, std, each function's mean over what it scored, correct share, lengths."""
    total = np.asarray(scores.total, dtype=np.float64)
    out = {f"{prefix}/reward": float(total.mean()), f"{prefix}/reward_std": float(total.std()),
           f"{prefix}/correct": float((total >= correct_reward).mean()),
           f"{prefix}/completion_length": float(np.mean([len(s.token_ids) for s in samples])),
           f"{prefix}/truncated": float(np.mean([s.finish_reason == "length" for s in samples]))}
    for name, values in scores.by_function.items():
        v = np.asarray(values, dtype=np.float64)
        if not np.isnan(v).all():
            out[f"{prefix}/rewards/{name}"] = float(np.nanmean(v))
    return out


def validation_reward(rollouts: Rollouts, reader: ShardReader, eval_rows: np.ndarray, rl: Any) -> Dict[str, float]:
    """val/reward and the rest of reward_metrics over the evaluation prompts, rl.eval_samples completions each at
    rl.eval_temperature, seeded by row alone (every evaluation of a run samples alike): rank 0 only."""
    rows = prompt_rows(reader.read(eval_rows))
    groups, _ = rollouts.sample(rows, eval_rows, VALIDATION_STREAM, 0, rl.eval_samples, rl.eval_temperature)
    samples = [s for g in groups for s in g]
    return reward_metrics(rollouts.score(rows, groups), samples, "val", rl.correct_reward)


def plan_step(rollouts: Rollouts, reader: ShardReader, order: SampleOrder, step: int, run: Any, rl: Any,
              world: int) -> Tuple[List[Dict[str, Any]], Dict[str, float], Dict[str, Any]]:
    """Rank 0: sample, score and weigh rollout number `step`'s completions (the step's, with rl.iterations=1). Gives each
    worker's groups (its share of the prompts), the rollout's metrics, and its record for logs/rollouts.jsonl (the
    caller adds the step)."""
    row_ids = order.step_rows(step, run.global_batch_size)
    rows = prompt_rows(reader.read(row_ids))
    groups, rollout_s = rollouts.sample(rows, row_ids, TRAIN_STREAM, step, rl.group_size, rl.temperature)
    samples = [s for g in groups for s in g]
    scores = rollouts.score(rows, groups)
    rewards = torch.tensor(scores.total, dtype=torch.float64)
    advantages = group_advantages(rewards, rl.group_size, rl.scale_rewards)
    equal = equal_groups(rewards, rl.group_size)
    keep = ~equal if rl.drop_equal_groups else torch.ones_like(equal)
    per_group = rewards.view(-1, rl.group_size)
    tokens = sum(len(s.token_ids) for s in samples)
    metrics = reward_metrics(scores, samples, "train", rl.correct_reward)
    metrics.update({
        "train/groups/zero_std": float(equal.double().mean()),
        "train/groups/all_correct": float((per_group >= rl.correct_reward).all(dim=1).double().mean()),
        "train/groups/all_wrong": float((per_group < rl.correct_reward).all(dim=1).double().mean()),
        "train/groups/kept": float(keep.double().mean()),
        "perf/rollout_s": rollout_s,
        "perf/rollout_tokens_per_s": tokens / rollout_s,
    })
    # What the step's loss is a mean over, on all workers: the kept groups' completion tokens, or completions.
    kept = [s for g, k in zip(groups, keep.tolist()) if k for s in g]
    units = float(sum(len(s.token_ids) for s in kept) if rl.loss_normalization == "token" else len(kept))
    shares = []
    for w in range(world):
        mine = worker_slice(np.arange(len(rows)), w, world)
        shares.append({
            "units": units,
            "groups": [{"prompt": rows[i].ids, "keep": bool(keep[i]), "samples": [
                (s.token_ids, s.logprobs, float(advantages[i * rl.group_size + j])) for j, s in enumerate(groups[i])]} for i in mine],
        })
    record = {"rows": [int(r) for r in row_ids], "groups": [
        {"row": int(row_ids[i]), "prompt": rows[i].prompt, "fields": rows[i].fields,
         "completions": [s.text for s in groups[i]], "rewards": per_group[i].tolist()}
        for i in range(min(rl.log_samples, len(rows)))]}
    return shares, metrics, record


def micro_batch(groups: Sequence[Dict[str, Any]], device: torch.device) -> Dict[str, torch.Tensor]:
    """Prompt + completion rows of some groups, right-padded: ids, positions, the completion targets' mask (over the
    predicted positions 1..T-1), the engine's log-probs there, each row's advantage and whether its group is kept."""
    rows = [(g["prompt"], ids, lps, adv, g["keep"]) for g in groups for ids, lps, adv in g["samples"]]
    length = max(len(p) + len(c) for p, c, *_ in rows)
    n = len(rows)
    input_ids = torch.zeros(n, length, dtype=torch.long)
    mask = torch.zeros(n, length - 1)
    engine_logps = torch.zeros(n, length - 1)
    for i, (prompt, completion, logprobs, _, _) in enumerate(rows):
        p, c = len(prompt), len(completion)
        input_ids[i, : p + c] = torch.tensor(prompt + completion)
        mask[i, p - 1 : p + c - 1] = 1  # position t predicts token t + 1
        engine_logps[i, p - 1 : p + c - 1] = torch.tensor(logprobs, dtype=torch.float32)
    return {
        "input_ids": input_ids.to(device), POSITIONS: torch.arange(length).expand(n, length).to(device),
        "mask": mask.to(device), "engine_logps": engine_logps.to(device),
        "advantages": torch.tensor([r[3] for r in rows], dtype=torch.float32, device=device),
        "keep": torch.tensor([float(r[4]) for r in rows], device=device),
    }


def token_logps(logits: torch.Tensor, input_ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """log π(token t+1 | ..t) at every position (the distribution sampled from: the logits over the temperature)."""
    scaled = logits[:, :-1].float() / temperature
    return -F.cross_entropy(scaled.flatten(0, 1), input_ids[:, 1:].flatten(), reduction="none").view(input_ids.shape[0], -1)


@torch.no_grad()
def token_entropy(logits: torch.Tensor, mask: torch.Tensor, temperature: float) -> torch.Tensor:
    """Σ over the masked positions of the entropy of the sampling distribution."""
    chosen = logits[:, :-1][mask.bool()].float() / temperature
    logp = torch.log_softmax(chosen, dim=-1)
    return -(logp.exp() * logp).sum()


class PolicyGradient:
    """Each micro-batch's clipped objective (framework/rl/grpo.py) and its sums."""

    def __init__(self, rl: Any, reference: Optional[Any]) -> None:
        self.rl, self.reference = rl, reference

    def loss(self, engine: Any, batch: Dict[str, torch.Tensor], scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
        rl = self.rl
        logits = engine(input_ids=batch["input_ids"], position_ids=batch[POSITIONS], use_cache=False).logits
        logps = token_logps(logits, batch["input_ids"], rl.temperature)
        completion = batch["mask"]
        mask = completion * batch["keep"].unsqueeze(1)
        ref = None
        if rl.beta > 0:
            ref = token_logps(self.reference(batch), batch["input_ids"], rl.temperature)
        # The log-probs the rollout was sampled under, by the trainer: its own, detached, on a rollout's first step
        # (the ratio is 1); from before that step when a rollout trains more (rl.iterations > 1).
        old = batch.get("old_logps")
        losses = token_losses(logps, logps.detach() if old is None else old, batch["advantages"], mask, rl.epsilon_low,
                              rl.epsilon_high, rl.beta, ref)
        loss = loss_sum(losses, mask, rl.loss_normalization) / scale
        sums = torch.stack([
            loss.detach().double(),
            mask.sum().double(),
            (losses.kl.sum() if losses.kl is not None else torch.zeros((), device=mask.device)).double(),
            token_entropy(logits, mask, rl.temperature).double(),
            losses.clipped.sum().double(),
            ((logps.detach() - batch["engine_logps"]).abs() * mask).sum().double(),
        ])
        return loss, sums


@torch.no_grad()
def old_logps(engine: Any, batch: Dict[str, torch.Tensor], temperature: float) -> torch.Tensor:
    """The policy's log-probs of a micro-batch's tokens before a rollout's first step (TRL's old_per_token_logps)."""
    logits = engine(input_ids=batch["input_ids"], position_ids=batch[POSITIONS], use_cache=False).logits
    return token_logps(logits, batch["input_ids"], temperature)


def train_metrics(sums: torch.Tensor, units: float, world: int, accumulation: int, beta: float) -> Dict[str, float]:
    values = dict(zip(TRAIN_SUMS, (float(v) for v in sums)))
    tokens = max(values["tokens"], 1.0)
    # Each worker's micro-batch loss was divided by units / (W × accumulation); their sum × that, over units, is the mean.
    out = {"train/loss": values["loss"] / (world * accumulation) if units else 0.0,
           "train/entropy": values["entropy"] / tokens, "train/clip_ratio": values["clipped"] / tokens,
           "train/logprob_gap": values["logprob_gap"] / tokens}
    if beta:
        out["train/kl"] = values["kl"] / tokens
    return out


def scatter(values: Optional[List[Any]], rank: int) -> Any:
    """Each rank's item of rank 0's `values` (one per rank; pickled objects over the process group)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return values[0]
    out: List[Any] = [None]
    dist.scatter_object_list(out, values if rank == 0 else None, src=0)
    return out[0]


def broadcast(value: Any, rank: int) -> Any:
    """Rank 0's `value` on every rank (a pickled object over the process group)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = [value if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sync_weights(engine: Any, rollout: Any, lora: bool, rank: int) -> float:
    """Send the policy's weights to the rollout engine; gives the seconds it took (every rank waits for rank 0)."""
    import ray

    started = time.perf_counter()
    files = policy_files(engine, lora, rank)
    if rank == 0:
        ray.get(rollout.load_weight_files.remote(files))
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
    return time.perf_counter() - started


def train_rl(plan: TrainPlan, session: Session) -> None:
    """Train `plan` (an rl run) from its latest checkpoint (or the start) to run.max_steps on this worker."""
    cfg, manifest = plan.config, plan.manifest
    run, rl = cfg.run, cfg.rl
    rank, world, device = session.rank, session.world_size, session.device
    lora = cfg.model.lora is not None
    engine, ds_config, state = restore(plan, session)
    accumulation = ds_config["gradient_accumulation_steps"]

    reference = None
    if rl.beta > 0:
        reference = adapters_disabled(engine.module) if lora else frozen_model(frozen_copy(plan.model_config, cfg, ds_config))
    objective = PolicyGradient(rl, reference)

    # Rank 0 holds the rollout engine (its actor lives and dies with this worker), the prompts and the rewards.
    rollouts = None
    train_prompts = validation = order = None
    if rank == 0:
        import ray

        spec = EngineSpec.of(rl.engine, cfg.model.pretrained_path, manifest["seq_len"] + rl.max_tokens,
                             cfg.model.lora.r if lora else None, run.seed, node_id=ray.get_runtime_context().get_node_id())
        started = time.perf_counter()
        actor = start_engine(spec)
        say(f"rollout engine up in {time.perf_counter() - started:.0f}s ({spec.placement}: {spec.num_cpus:g} CPUs, {spec.num_gpus:g} GPUs)")
        rollouts = Rollouts(actor, reward_functions(cfg.reward), rl, run.seed)
        order = SampleOrder(split_blocks(manifest, "train"), run.seed, run.shuffle_window)
        train_prompts = ShardReader(plan.data_dir, manifest, "train", cache_groups=2 * run.shuffle_window + 2)
        validation = ShardReader(plan.data_dir, manifest, "validation", cache_groups=4)
    # The engine starts from model.pretrained_path; a resumed run's weights are the checkpoint's.
    if state.step > 0:
        sync_weights(engine, rollouts and rollouts.engine, lora, rank)

    def evaluate() -> Dict[str, float]:
        return broadcast(validation_reward(rollouts, validation, plan.eval_rows, rl) if rank == 0 else None, rank)

    def close_engine() -> None:  # its copy of the last weights sent; the actor itself goes with this worker
        if rollouts is not None:
            import ray

            try:
                ray.get(rollouts.engine.close.remote())
            except ray.exceptions.RayActorError:
                pass  # an engine that died (what ended the run) cannot be asked; the run's own error is the one to see

    if state.step >= run.max_steps:
        result = evaluate()
        if rank == 0:
            say(f"run {run.name} is at step {state.step} of {run.max_steps}: evaluated its checkpoint: val reward {result['val/reward']:.4f}")
        close_engine()
        session.report({"step": state.step, "tokens": state.tokens, **{report_key(k): v for k, v in result.items()}})
        return

    logger = MetricsLogger(plan.log_dir, rank == 0, state.step, run.max_steps, plan.tracking)
    if state.step == 0:
        logger.log([{"step": 0, **evaluate()}])  # the starting policy: what every later evaluation is read against
    pending: List[Dict[str, float]] = []
    samples_pending: List[Dict[str, Any]] = []
    engine.train()
    try:
        while state.step < run.max_steps:
            step_started = time.perf_counter()
            # A rollout's first step samples it. Checkpoints fall between rollouts and rl.iterations is a resume key,
            # so a resumed run starts with one.
            first = state.step % rl.iterations == 0
            if first:
                shares = rollout_metrics = record = None  # the metrics and the record stay on rank 0, which logs them
                if rank == 0:
                    # The rollout's number orders its prompts and seeds their sampling: μ steps read one batch of rows.
                    shares, rollout_metrics, record = plan_step(rollouts, train_prompts, order, state.step // rl.iterations,
                                                                run, rl, world)
                    record = {"step": state.step + 1, **record}
                mine = scatter(shares, rank)  # each worker receives its own groups only
                groups = mine["groups"]
                size = len(groups) // accumulation
                batches = [micro_batch(groups[m * size : (m + 1) * size], device) for m in range(accumulation)]
                if rl.iterations > 1:
                    for batch in batches:
                        batch["old_logps"] = old_logps(engine, batch, rl.temperature)
            units = mine["units"]
            per_micro = max(units, 1.0) / (world * accumulation)
            trained = time.perf_counter()
            sums = torch.zeros(len(TRAIN_SUMS), device=device, dtype=torch.float64)
            tokens = sum(len(g["prompt"]) + len(ids) for g in groups for ids, _, _ in g["samples"])
            for batch in batches:
                loss, batch_sums = objective.loss(engine, batch, per_micro)
                engine.backward(loss)
                engine.step()  # DeepSpeed applies the optimizer only at the accumulation boundary
                sums += batch_sums
            if world > 1:
                dist.all_reduce(sums)
            train_s = time.perf_counter() - trained
            # The engine gets the weights once the rollout's last step is taken, before the next rollout samples.
            last = (state.step + 1) % rl.iterations == 0
            sync_s = sync_weights(engine, rollouts and rollouts.engine, lora, rank) if last else 0.0
            state.step += 1
            state.rows += run.global_batch_size if first else 0
            state.tokens += int(all_reduced(float(tokens), device))
            if rank == 0:
                # Every step of a rollout reports the rewards it trained on; the rollout's cost, once.
                sampled = rollout_metrics if first else {k: v for k, v in rollout_metrics.items() if not k.startswith("perf/")}
                metrics = {"step": state.step, **sampled, **train_metrics(sums, units, world, accumulation, rl.beta)}
                metrics.update({
                    "train/lr": engine.get_lr()[0], "train/epoch": order.epoch_of(-(-state.step // rl.iterations), run.global_batch_size),
                    "perf/train_s": train_s, "perf/sync_s": sync_s, "perf/step_s": time.perf_counter() - step_started,
                    "perf/peak_mem_gb": peak_memory_gb(),
                })
                grad_norm = engine.get_global_grad_norm()
                if grad_norm is not None:
                    metrics["train/grad_norm"] = float(grad_norm)
                pending.append(metrics)
                if first:
                    samples_pending.append(record)

            checkpoint_now = state.step % run.checkpoint_interval == 0 or state.step == run.max_steps
            evaluate_now = state.step % run.eval_interval == 0 or checkpoint_now
            if logs_at(state.step, run):
                last_eval = evaluate() if evaluate_now else {}
                if rank == 0:
                    pending[-1].update(last_eval)
                    logger.log_rollouts(samples_pending)
                    logger.log(pending)
                    latest = pending[-1]
                else:
                    latest = {}
                latest = broadcast(latest, rank)
                pending, samples_pending = [], []
                if evaluate_now:
                    report = {"step": state.step, "tokens": state.tokens, "train_reward": latest["train/reward"]}
                    report.update({report_key(k): v for k, v in last_eval.items()})
                    if checkpoint_now:
                        directory = tempfile.mkdtemp(prefix="checkpoint-")
                        checkpoint.save(engine, directory, state, cfg, plan.tokenizer_uri, plan.probe, rank)
                        session.report(report, checkpoint_dir=directory, step=state.step, upload=run.checkpoint_upload)
                    else:
                        session.report(report)
    finally:
        logger.close()
        close_engine()  # however the run ended

