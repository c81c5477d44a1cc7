"""The per-worker training loop, top to bottom: model → engine → batches → step → log → evaluate → checkpoint.

Ray enters only through `ray.train` (rank, dataset shards, report, checkpoint); DeepSpeed owns the
optimizer step, gradient accumulation, clipping, mixed precision and the ZeRO partitioning.
"""

from __future__ import annotations

import math
import tempfile
import time
from typing import Any, Dict, List

import deepspeed
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from framework import storage
from framework.config import JobConfig
from framework.data.stream import eval_batches, micro_batches
from framework.model import build_model, flops_per_token, peak_tflops
from framework.train import checkpoint
from framework.train.checkpoint import TrainState
from framework.train.metrics import MetricsLogger, peak_memory_gb, quiet_worker_logs, say


def deepspeed_config(job: JobConfig, world_size: int, use_gpu: bool) -> Dict[str, Any]:
    """DeepSpeed's JSON config from `conf/deepspeed/*` and the batch settings in `conf/run/*`."""
    run, ds = job.run, job.deepspeed
    precision = run.precision if run.precision != "auto" else ("bf16" if use_gpu else "fp32")
    zero: Dict[str, Any] = {"stage": ds.stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": use_gpu}
    if ds.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": use_gpu}
    zero.update(ds.zero_extra)
    return {
        "train_batch_size": run.global_batch_size,
        "train_micro_batch_size_per_gpu": run.micro_batch_size,
        "gradient_accumulation_steps": run.global_batch_size // (run.micro_batch_size * world_size),
        "gradient_clipping": job.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        # Our AdamW also runs with offloaded optimizer state; DeepSpeed's CPU Adam would need a C++ build.
        "zero_force_ds_cpu_optimizer": False,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def build_optimizer(model: torch.nn.Module, job: JobConfig, fused: bool) -> torch.optim.Optimizer:
    """AdamW with no weight decay on biases and norm weights (the 1-D parameters)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": job.optim.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    o = job.optim
    return torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, fused=fused)


def build_lr_schedule(optimizer: torch.optim.Optimizer, job: JobConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up to optim.lr, then cosine down to optim.lr × optim.min_lr_ratio at run.max_steps."""
    return get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, job.optim.warmup_steps, job.run.max_steps, min_lr_rate=job.optim.min_lr_ratio
    )


def train_loop_per_worker(config: Dict[str, Any]) -> None:
    quiet_worker_logs()
    job: JobConfig = config["job"]
    manifest: Dict[str, Any] = config["manifest"]
    run = job.run
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    use_gpu = device.type == "cuda"

    # Model and engine.
    tokenizer_uri = storage.join(config["data_dir"], manifest["tokenizer"])
    model = build_model(job.model, config["model_config"], run.seed)
    ds_config = deepspeed_config(job, world, use_gpu)
    optimizer = build_optimizer(model, job, fused=use_gpu and not job.deepspeed.offload_optimizer)
    scheduler = build_lr_schedule(optimizer, job)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    accumulation = ds_config["gradient_accumulation_steps"]
    seq_len = manifest["seq_len"]
    tokens_per_step = run.global_batch_size * seq_len
    step_flops = flops_per_token(engine.module, seq_len) * tokens_per_step
    peak = peak_tflops(run.peak_tflops)

    # Resume: weights, optimizer, LR schedule and data position from the latest checkpoint.
    state = TrainState()
    restored = ray.train.get_checkpoint()
    if restored:
        with restored.as_directory() as directory:
            state = checkpoint.load(engine, directory)
        if rank == 0:
            say(f"resumed from {restored.path} at step {state.step}")

    batches = micro_batches(
        ray.train.get_dataset_shard("train"), run.micro_batch_size, state.epoch, state.batches_in_epoch
    )
    validation = ray.train.get_dataset_shard("validation")
    logger = MetricsLogger(config["log_dir"], rank == 0, state.step, run.max_steps)
    pending: List[torch.Tensor] = []  # per-step mean losses on this rank, synced once per log interval
    interval_start, interval_steps = time.perf_counter(), 0
    last_eval: Dict[str, float] = {}

    engine.train()
    while state.step < run.max_steps:
        step_loss = torch.zeros((), device=device)
        for _ in range(accumulation):
            state.epoch, state.batches_in_epoch, batch = next(batches)
            batch = batch.to(device, non_blocking=True)
            loss = engine(input_ids=batch, labels=batch).loss
            engine.backward(loss)
            engine.step()  # DeepSpeed applies the optimizer only at the accumulation boundary
            step_loss += loss.detach() / accumulation
        state.step += 1
        state.tokens += tokens_per_step
        pending.append(step_loss)
        interval_steps += 1

        checkpoint_now = state.step % run.checkpoint_interval == 0 or state.step == run.max_steps
        evaluate_now = state.step % run.eval_interval == 0 or checkpoint_now
        if state.step % run.log_interval == 0 or evaluate_now:
            losses = torch.stack(pending)
            dist.all_reduce(losses, op=dist.ReduceOp.AVG) if world > 1 else None
            if use_gpu:
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - interval_start
            records = [{"step": state.step - len(pending) + i + 1, "train/loss": v} for i, v in enumerate(losses.tolist())]
            throughput = interval_steps * tokens_per_step / elapsed
            records[-1].update({
                "train/lr": engine.get_lr()[0],
                "train/grad_norm": float(engine.get_global_grad_norm() or 0.0),
                "train/tokens": state.tokens,
                "perf/tokens_per_s": throughput,
                "perf/step_s": elapsed / interval_steps,
                "perf/peak_mem_gb": peak_memory_gb(),
            })
            if peak:
                records[-1]["perf/mfu"] = step_flops * interval_steps / elapsed / (world * peak * 1e12)
            if evaluate_now:
                last_eval = evaluate(engine, validation, run.micro_batch_size, device, world)
                records[-1].update(last_eval)
            logger.log(records)
            pending, interval_start, interval_steps = [], time.perf_counter(), 0

            if evaluate_now:
                # Every report carries fresh validation metrics, so Tune schedulers can act on any of them.
                report = {"step": state.step, "tokens": state.tokens, "train_loss": records[-1]["train/loss"]}
                report.update({k.replace("/", "_"): v for k, v in last_eval.items()})
                if checkpoint_now:
                    with tempfile.TemporaryDirectory() as directory:
                        checkpoint.save(engine, directory, state, job, tokenizer_uri, rank)
                        ray.train.report(
                            report,
                            checkpoint=ray.train.Checkpoint.from_directory(directory),
                            checkpoint_dir_name=checkpoint.checkpoint_dir_name(state.step),
                        )
                else:
                    ray.train.report(report)
                interval_start = time.perf_counter()  # evaluation and checkpoint time is not training time
    logger.close()


@torch.no_grad()
def evaluate(engine: Any, shard: Any, batch_size: int, device: torch.device, world: int) -> Dict[str, float]:
    """Mean token loss and perplexity over the fixed evaluation set, summed across all workers."""
    engine.eval()
    totals = torch.zeros(2, device=device, dtype=torch.float64)  # (loss × predicted tokens, predicted tokens)
    for batch in eval_batches(shard, batch_size):
        batch = batch.to(device, non_blocking=True)
        predicted = batch.numel() - batch.shape[0]  # the first token of each row is never predicted
        totals += torch.tensor([engine(input_ids=batch, labels=batch).loss.item() * predicted, predicted], device=device, dtype=torch.float64)
    if world > 1:
        dist.all_reduce(totals)
    engine.train()
    loss = (totals[0] / totals[1]).item() if totals[1] > 0 else float("nan")
    return {"val/loss": loss, "val/perplexity": math.exp(min(loss, 50.0))}
