"""The per-worker training loop, top to bottom: model (LoRA-wrapped or not) → engine → objective → batches → step → log →
evaluate → checkpoint.

Whatever runs the loop enters only through a `Session` (framework/train/session.py): Ray Train's
workers, or one bare process. DeepSpeed owns the optimizer step, gradient accumulation, clipping,
mixed precision and the ZeRO partitioning; the sample order (framework/data/sampler.py) owns which
rows every step trains on.

The loss of a step is the mean over every target token of its global batch, on any worker count:
each micro-batch's summed token loss is divided by the step's target tokens over all workers
(transformers' `num_items_in_batch`), times the workers × micro-batches DeepSpeed averages over, so
1 worker × 4 micro-batches and 2 × 2 take the same gradient (up to float summation order). What differs between
pretraining/SFT and preference tuning is the objective (framework/train/objectives.py): a preference loss is the
mean over the step's pairs in the same way, and brings its reference model.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from datetime import timedelta
from typing import Any, Dict, List, Tuple

import numpy as np
import torch
import torch.distributed as dist

from framework.config import RunError
from framework.data.sampler import SampleOrder
from framework.data.shards import MASK_COLUMN, SEGMENTS_COLUMN
from framework.data.stream import ShardReader, TrainBatches, split_blocks
from framework.model import build_model, flops_per_token, peak_tflops, torch_dtype, trainable_params
from framework.train.config import TrainRoot
from framework.train import checkpoint
from framework.train.checkpoint import TrainState
from framework.train.metrics import MetricsLogger, peak_memory_gb, quiet_worker_logs, say
from framework.train.objectives import build_objective, report_key
from framework.train.optim import apply_optim_settings, build_lr_schedule, build_optimizer, decay_flags
from framework.train.plan import TrainPlan
from framework.train.session import Session


def _import_deepspeed() -> Any:
    """DeepSpeed, without the `import mlflow` its autotuner tries when deepspeed is imported
    (deepspeed/autotuning/autotuner.py): 2 s of CPU at every worker's start, for a tool no run here uses. A run that
    tracks to MLflow imports it itself (framework/tracking.py)."""
    if "mlflow" in sys.modules:
        import deepspeed
        return deepspeed
    sys.modules["mlflow"] = None  # `import mlflow` raises ImportError while this is set
    try:
        import deepspeed
    finally:
        del sys.modules["mlflow"]
    return deepspeed


deepspeed = _import_deepspeed()


def deepspeed_config(cfg: TrainRoot, world_size: int, use_gpu: bool, load_universal: bool = False) -> Dict[str, Any]:
    """DeepSpeed's JSON config from `conf/deepspeed/*` and the batch settings in `conf/run/*`."""
    run, ds = cfg.run, cfg.deepspeed
    dtype = torch_dtype(run.precision, use_gpu)
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
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16},
        # A checkpoint written by another worker count loads through DeepSpeed's universal format.
        "checkpoint": {"load_universal": load_universal},
        # Our optimizer also runs with offloaded optimizer state; DeepSpeed's CPU Adam would need a C++ build.
        "zero_force_ds_cpu_optimizer": False,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


# Attention implementations that build block-diagonal masks from restarting position ids (transformers' masking_utils).
MASKED_ATTENTION = ("sdpa", "eager")


# DeepSpeed's op that its CPU backend builds and loads at every process group start (deepspeed/comm/torch.py).
SHARED_MEMORY_ALLREDUCE_OP = "deepspeed_shm_comm"


def skip_shared_memory_allreduce() -> None:
    """Keep DeepSpeed's CPU backend from building its shared-memory all-reduce, a C++ op compiled on the machine's
    first engine start (45-65 s of CPU, measured; then cached in ~/.cache/torch_extensions) that only its
    `inference_all_reduce` uses: training never calls it, and inference here is vLLM's. DeepSpeed builds an op only
    where its `deepspeed.ops.__compatible_ops__` says the op is compatible; that dict is kept in the module so that
    edits to it persist (deepspeed/ops/__init__.py)."""
    deepspeed.ops.__compatible_ops__[SHARED_MEMORY_ALLREDUCE_OP] = False


def build_engine(plan: TrainPlan, world: int, use_gpu: bool, load_universal: bool = False) -> tuple:
    """The model (LoRA-wrapped when model.lora is set), its optimizer over the weights that train and the LR
    schedule, inside a DeepSpeed engine; gives (engine, DeepSpeed config)."""
    cfg = plan.config
    model = build_model(cfg.model, plan.model_config, cfg.run.seed)
    if SEGMENTS_COLUMN in plan.manifest["columns"] and model.config._attn_implementation not in MASKED_ATTENTION:
        # Flash attention's varlen path reads packed rows only from a batch of one; others would attend across documents.
        raise RunError(
            f"data.packing=documents: the model's attention {model.config._attn_implementation!r} cannot keep the documents of "
            f"packed rows apart; use a model with {' or '.join(MASKED_ATTENTION)} attention, or shards packed with data.packing=plain"
        )
    ds_config = deepspeed_config(cfg, world, use_gpu, load_universal=load_universal)
    optimizer = build_optimizer(model, cfg.optim, fused=use_gpu and not cfg.deepspeed.offload_optimizer)
    scheduler = build_lr_schedule(optimizer, cfg.optim, cfg.run.max_steps)
    if not use_gpu:
        skip_shared_memory_allreduce()
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    return engine, ds_config


def universal_dir(plan: TrainPlan, name: str) -> str:
    """Where a node converts a checkpoint to the universal format: node-local, the same path for every rank on the node."""
    return os.path.join(tempfile.gettempdir(), "framework-universal", plan.config.run.name.replace("/", "_"), os.path.basename(name))


def restore(plan: TrainPlan, session: Session) -> Tuple[Any, Dict[str, Any], TrainState]:
    """Set this worker up and build its engine at the run's latest checkpoint (or the start): (engine, DeepSpeed
    config, train state). A checkpoint from another worker count is loaded in DeepSpeed's universal format."""
    quiet_worker_logs()
    cfg, manifest = plan.config, plan.manifest
    run = cfg.run
    rank, world, device = session.rank, session.world_size, session.device
    use_gpu = device.type == "cuda"
    if rank == 0 or world <= 8:
        say(f"rank {rank} of {world}: pid {os.getpid()}, {device}")
    if dist.is_initialized():
        # The process group was formed under run.setup_timeout_s; its collectives get their own bound.
        # (PyTorch's own way to change a group's timeout, which dist.breakpoint uses too.)
        dist.distributed_c10d._set_pg_timeout(timedelta(seconds=run.collective_timeout_s))

    with session.checkpoint() as restored:
        state = checkpoint.read_state(restored) if restored else TrainState(world_size=world, data_fingerprint=manifest["fingerprint"])
        # ZeRO-0 keeps whole weights and optimizer state, which any worker count loads as they are.
        reshard = restored is not None and state.world_size != world and cfg.deepspeed.stage > 0

        # Model and engine.
        engine, ds_config = build_engine(plan, world, use_gpu, load_universal=reshard)
        if cfg.model.lora is not None and rank == 0:
            trainable, total = trainable_params(engine.module)
            say(f"LoRA r={cfg.model.lora.r} on {', '.join(cfg.model.lora.target_modules)}: {trainable:,} of {total:,} parameters train ({trainable / total:.2%})")

        if restored:
            decays = decay_flags(engine)
            source = restored
            if reshard:
                source = universal_dir(plan, session.checkpoint_name() or restored)
                if session.local_rank == 0:
                    started = time.perf_counter()
                    shutil.rmtree(source, ignore_errors=True)
                    checkpoint.to_universal(restored, source)
                    say(f"rank {rank}: {state.world_size}-worker checkpoint converted for {world} workers in {time.perf_counter() - started:.1f}s")
                dist.barrier()
            checkpoint.load(engine, source, adapters_only=cfg.model.lora is not None)
            apply_optim_settings(engine, cfg.optim, run.max_steps, state.step, decays)
            if reshard:
                dist.barrier()
                if session.local_rank == 0:
                    shutil.rmtree(source, ignore_errors=True)
            state.world_size = world
            if rank == 0:
                say(f"resumed from {session.checkpoint_name()} at step {state.step}")
    return engine, ds_config, state


def train(plan: TrainPlan, session: Session) -> None:
    """Train `plan` from its latest checkpoint (or from scratch) to run.max_steps on this worker."""
    cfg, manifest = plan.config, plan.manifest
    run = cfg.run
    rank, world, device = session.rank, session.world_size, session.device
    use_gpu = device.type == "cuda"
    engine, ds_config, state = restore(plan, session)

    # The objective: the token loss, or a preference loss and its reference (a frozen copy, the adapters off, or none).
    objective = build_objective(cfg, engine, plan.model_config, ds_config)
    if cfg.post is not None and rank == 0:
        say(f"preference loss {cfg.post.loss} (beta {cfg.post.beta}), reference: {objective.reference_kind}")

    accumulation = ds_config["gradient_accumulation_steps"]
    seq_len = manifest["seq_len"]
    global_tokens = run.global_batch_size * seq_len
    step_flops = flops_per_token(engine.module, seq_len) * global_tokens
    peak = peak_tflops(run.peak_tflops)

    # Data: this worker's slice of every step's rows, from the step the checkpoint left off.
    order = SampleOrder(split_blocks(manifest, "train"), run.seed, run.shuffle_window)
    reader = ShardReader(plan.data_dir, manifest, "train", cache_groups=2 * run.shuffle_window + 2)
    batches = TrainBatches(
        reader, order, global_batch=run.global_batch_size, micro_batch=run.micro_batch_size, rank=rank, world=world,
        start_step=state.step, prefetch_steps=run.prefetch_steps,
    )
    validation = ShardReader(plan.data_dir, manifest, "validation", cache_groups=4)
    # Without loss masks or segments every step predicts the same number of tokens; with them, they are counted.
    counted = MASK_COLUMN in manifest["columns"] or SEGMENTS_COLUMN in manifest["columns"]
    fixed_targets = None if counted else float(run.global_batch_size * (seq_len - 1))

    if state.step >= run.max_steps:
        # Nothing left to train: the run's final checkpoint is evaluated (on this worker count and
        # micro-batch) and reported, and its logs are left as they are.
        batches.close()
        result = evaluate(engine, objective, validation, plan.eval_rows, run.micro_batch_size, rank, world, device)
        if rank == 0:
            say(f"run {run.name} is at step {state.step} of {run.max_steps}: evaluated its checkpoint: val {result['val/loss']:.6f}")
        session.report({"step": state.step, "tokens": state.tokens, **{report_key(k): v for k, v in result.items()}})
        return

    logger = MetricsLogger(plan.log_dir, rank == 0, state.step, run.max_steps, plan.tracking)
    if state.step == 0 and objective.baseline_eval:
        # A preference run's start, logged as step 0: what every later evaluation is read against.
        logger.log([{"step": 0, **evaluate(engine, objective, validation, plan.eval_rows, run.micro_batch_size, rank, world, device)}])
    pending: List[torch.Tensor] = []  # per step: the objective's sums on this rank (token loss and target tokens, ...)
    interval_start, interval_steps, data_wait = time.perf_counter(), 0, 0.0
    checkpoint_s: float | None = None  # how long the last save blocked training

    # DeepSpeed records the gradient norm only where its optimizer wrapper computes one (ZeRO 1-3, bf16/fp16);
    # a plain fp32 optimizer under ZeRO-0 leaves it unset, so the loop takes it itself, before the step.
    own_grad_norm = not hasattr(engine.optimizer, "_global_grad_norm")
    grad_norm: torch.Tensor | None = None
    engine.train()
    try:
        while state.step < run.max_steps:
            waited = time.perf_counter()
            micro = batches.next()
            data_wait += time.perf_counter() - waited
            # What the step's loss is a mean over, on all workers: target tokens (SFT), or pairs (preference losses).
            units = fixed_targets or all_reduced(float(sum(objective.units(b) for b in micro)), device)
            per_micro = units / (world * accumulation)
            sums = torch.zeros(objective.width, device=device, dtype=torch.float64)
            for batch in micro:
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                loss, batch_sums = objective.loss(engine, batch, per_micro)
                engine.backward(loss)
                if own_grad_norm and engine.is_gradient_accumulation_boundary() and logs_at(state.step + 1, run):
                    grad_norm = gradient_norm(engine.module)  # ZeRO-0 has all-reduced them in backward
                engine.step()  # DeepSpeed applies the optimizer only at the accumulation boundary
                sums += batch_sums
            state.step += 1
            state.rows += run.global_batch_size
            state.tokens += global_tokens
            pending.append(sums)
            interval_steps += 1

            checkpoint_now = state.step % run.checkpoint_interval == 0 or state.step == run.max_steps
            evaluate_now = state.step % run.eval_interval == 0 or checkpoint_now
            if logs_at(state.step, run):
                totals = torch.stack(pending)
                if world > 1:
                    dist.all_reduce(totals)
                if use_gpu:
                    torch.cuda.synchronize()
                elapsed = time.perf_counter() - interval_start
                records: List[Dict[str, float]] = [
                    {"step": state.step - len(pending) + i + 1, **objective.metrics(row, "train")} for i, row in enumerate(totals)
                ]
                records[-1].update({
                    "train/lr": engine.get_lr()[0],
                    "train/grad_norm": float(grad_norm if own_grad_norm else engine.get_global_grad_norm()),
                    "train/tokens": state.tokens,
                    "train/epoch": order.epoch_of(state.step, run.global_batch_size),
                    "perf/tokens_per_s": interval_steps * global_tokens / elapsed,
                    "perf/step_s": elapsed / interval_steps,
                    "perf/data_wait": data_wait / elapsed,
                    "perf/peak_mem_gb": peak_memory_gb(),
                })
                if checkpoint_s is not None:
                    records[-1]["perf/checkpoint_s"], checkpoint_s = checkpoint_s, None
                if peak:
                    records[-1]["perf/mfu"] = step_flops * interval_steps / elapsed / (world * peak * 1e12)
                last_eval: Dict[str, float] = {}
                if evaluate_now:
                    last_eval = evaluate(engine, objective, validation, plan.eval_rows, run.micro_batch_size, rank, world, device)
                    records[-1].update(last_eval)
                logger.log(records)
                pending, interval_steps, data_wait = [], 0, 0.0

                if evaluate_now:
                    # Every report carries fresh validation metrics, so Tune schedulers can act on any of them.
                    report = {"step": state.step, "tokens": state.tokens, "train_loss": records[-1]["train/loss"]}
                    report.update({report_key(k): v for k, v in last_eval.items()})
                    if checkpoint_now:
                        saving = time.perf_counter()
                        # An asynchronous upload reads the folder after report returns; the session removes it then.
                        directory = tempfile.mkdtemp(prefix="checkpoint-")
                        checkpoint.save(engine, directory, state, cfg, plan.tokenizer_uri, plan.probe, rank)
                        session.report(report, checkpoint_dir=directory, step=state.step, upload=run.checkpoint_upload)
                        checkpoint_s = time.perf_counter() - saving  # logged with the next interval
                    else:
                        session.report(report)
                interval_start = time.perf_counter()  # evaluation and checkpoint time is not training time
    finally:
        batches.close()
        logger.close()


def logs_at(step: int, run: Any) -> bool:
    """Whether `step` writes a metrics record: every log interval, and wherever it evaluates or checkpoints."""
    return step % run.log_interval == 0 or step % run.eval_interval == 0 or step % run.checkpoint_interval == 0 or step == run.max_steps


def gradient_norm(module: torch.nn.Module) -> torch.Tensor:
    """The 2-norm of every gradient the module holds (frozen parameters have none), as clipping measures it; a tensor,
    read only at a log step."""
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad.detach().float())
                                                 for p in module.parameters() if p.grad is not None]))


def all_reduced(value: float, device: torch.device) -> float:
    """`value` summed over every worker."""
    tensor = torch.tensor(value, device=device, dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
    return float(tensor)


def evaluate(engine: Any, objective: Any, reader: ShardReader, rows: np.ndarray, micro_batch: int, rank: int, world: int,
             device: torch.device) -> Dict[str, float]:
    """The objective's validation metrics over the whole evaluation set (`rows`), each row counted once, summed across
    workers: mean token loss and perplexity, or the preference loss, rewards, margin and accuracy."""
    engine.eval()
    result = objective.evaluate(engine, reader, rows, micro_batch, rank, world, device)
    engine.train()
    return result
