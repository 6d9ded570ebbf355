"""The epoch loop every stage shares: resume, optimise, report, checkpoint, evaluate.

A stage supplies a model, its optimiser and a ``loss_fn(batch) -> (loss, logs)``;
this module does the rest the same way for every stage, on one process or on
N Ray Train workers.
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist

from medcl.train.checkpoints import load_checkpoint, save_checkpoint
from medcl.train.context import StageContext, temporary_checkpoint_dir
from medcl.train.runtime import autocast_context, unwrap
from medcl.train.schedule import warmup_cosine

logger = logging.getLogger(__name__)

__all__ = ["fit", "build_optimizer", "mean_across_ranks", "StageInputs", "epoch_batches", "steps_per_epoch"]

LossFn = Callable[[Any], "tuple[torch.Tensor, dict[str, float]]"]


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: Any, steps_per_epoch: int):
    """Adam(W) with cosine schedule and linear warm-up, per optimiser step."""
    params = [p for p in params if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = max(1, cfg.max_epochs * steps_per_epoch)
    scheduler = warmup_cosine(optimizer, warmup_steps=cfg.warmup_epochs * steps_per_epoch, total_steps=total)
    return optimizer, scheduler


def mean_across_ranks(total: float, count: int, ctx: StageContext) -> float:
    """Mean of a per-rank sum over all ranks' items."""
    if ctx.distributed and dist.is_initialized():
        t = torch.tensor([total, float(count)], dtype=torch.float64, device=ctx.device)
        dist.all_reduce(t)
        total, count = float(t[0]), int(t[1])
    return total / max(count, 1)


def _train_epoch(ctx: StageContext, model: torch.nn.Module, batches: Iterable[Any], loss_fn: LossFn,
                 optimizer, scheduler, amp: bool) -> dict[str, float]:
    model.train()
    sums: dict[str, float] = {}
    steps = images = 0
    start = time.perf_counter()
    for batch in batches:
        with autocast_context(ctx.device, amp):
            loss, logs = loss_fn(batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {float(loss)} at step {steps}; lower lr or check inputs")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        steps += 1
        images += int(logs.pop("batch_images", 0))
        sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
        for key, value in logs.items():
            sums[key] = sums.get(key, 0.0) + float(value)
    seconds = time.perf_counter() - start
    metrics = {f"train/{k}": mean_across_ranks(v, steps, ctx) for k, v in sums.items()}
    metrics["train/steps"] = float(steps)
    metrics["train/epoch_time_s"] = seconds
    metrics["train/images_per_s"] = mean_across_ranks(images / max(seconds, 1e-9), 1, ctx) * ctx.world_size
    metrics["train/lr"] = float(optimizer.param_groups[0]["lr"])
    if steps == 0:
        raise ValueError("the training stream yielded no full batch; lower batch_size_per_worker "
                         "or use more data (batches are dropped when incomplete)")
    return metrics


def fit(
    ctx: StageContext,
    cfg: Any,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    batches: Callable[[int], Iterable[Any]],
    loss_fn: LossFn,
    *,
    evaluate: Callable[[torch.nn.Module], dict[str, float]] | None = None,
    run_logger: Any = None,
    amp: bool = False,
) -> dict[str, float]:
    """Train ``model`` for ``cfg.max_epochs`` epochs, resuming from the run's latest checkpoint.

    Args:
        ctx: Where the loop runs (Ray Train worker or Tune trial).
        cfg: The stage config (``max_epochs``, ``checkpoint_every``; ``to_dict``-able).
        model: The prepared (device-placed, maybe DDP-wrapped) model.
        batches: ``batches(epoch)`` returns the iterable of this worker's batches.
        loss_fn: ``loss_fn(batch) -> (scalar loss, dict of extra logs)``; a log
            ``batch_images`` counts images for throughput.
        evaluate: Run on rank 0 after the last epoch with the unwrapped model;
            its metrics join the last report.
        run_logger: Rank-0 metrics logger (``log_metrics(dict, step)``) or None.
        amp: bf16 autocast (only takes effect on CUDA).

    Returns:
        The last epoch's metrics (with evaluation metrics on rank 0).
    """
    from medcl.config import to_dict

    start_epoch = 0
    with ctx.latest_checkpoint() as checkpoint:
        if checkpoint is not None:
            meta = load_checkpoint(checkpoint, model=unwrap(model), optimizer=optimizer, scheduler=scheduler)
            start_epoch = int(meta["epoch"]) + 1
            logger.info("resumed from %s at epoch %d", checkpoint, start_epoch)
    metrics: dict[str, float] = {}
    for epoch in range(start_epoch, cfg.max_epochs):
        metrics = _train_epoch(ctx, model, batches(epoch), loss_fn, optimizer, scheduler, amp)
        _fail_once_for_tests(ctx, epoch)
        metrics["epoch"] = float(epoch)
        metrics["max_epochs"] = float(cfg.max_epochs)
        last = epoch == cfg.max_epochs - 1
        if last and evaluate is not None and ctx.is_rank_zero:
            metrics.update(evaluate(unwrap(model)))
        # Logged before the report: Tune may stop a trial inside ``report`` (ASHA, an
        # interruption), and the epoch must be in MLflow by then. An epoch lost to a crash
        # before its checkpoint runs again on resume and logs a second point at its step.
        if run_logger is not None and ctx.is_rank_zero:
            run_logger.log_metrics(metrics, step=epoch)
        if ctx.is_rank_zero and (last or (epoch + 1) % cfg.checkpoint_every == 0):
            with temporary_checkpoint_dir() as tmp:
                save_checkpoint(tmp, model=model, optimizer=optimizer, scheduler=scheduler, epoch=epoch,
                                step=int(scheduler.last_epoch), config=to_dict(cfg), metrics=metrics)
                ctx.report(metrics, tmp)
        else:
            ctx.report(metrics, None)
    if start_epoch >= cfg.max_epochs and evaluate is not None and ctx.is_rank_zero:
        metrics = {"epoch": float(cfg.max_epochs - 1), **evaluate(unwrap(model))}
    return metrics


#: Fault injection for the failure-and-resume tests (no effect unless both are set): with
#: ``MEDCL_FAIL_ONCE_AT_EPOCH=<epoch>`` and ``MEDCL_FAIL_ONCE_MARKER=<file path>`` in the workers' environment
#: (``run_stage`` passes ``MEDCL_*`` variables on to its workers), the worker of rank 1 (rank 0 when alone)
#: raises ``RuntimeError`` after training that epoch, before reporting it: once, since it first creates the
#: marker file (exclusively), and a restarted worker finds it there.
FAIL_ONCE_AT_EPOCH_ENV = "MEDCL_FAIL_ONCE_AT_EPOCH"
FAIL_ONCE_MARKER_ENV = "MEDCL_FAIL_ONCE_MARKER"


def _fail_once_for_tests(ctx: StageContext, epoch: int) -> None:
    at, marker = os.environ.get(FAIL_ONCE_AT_EPOCH_ENV), os.environ.get(FAIL_ONCE_MARKER_ENV)
    if not at or not marker or int(at) != epoch or ctx.world_rank != min(1, ctx.world_size - 1):
        return
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    raise RuntimeError(f"injected failure ({FAIL_ONCE_AT_EPOCH_ENV}={at}) on rank {ctx.world_rank} at epoch {epoch}")


def steps_per_epoch(num_rows: int, batch_size_per_worker: int, world_size: int, min_steps: int = 0,
                    max_steps: int = 0) -> int:
    """Optimiser steps each worker takes per epoch.

    Whole passes of full batches until there are at least ``min_steps``, then
    capped at ``max_steps`` (0: no cap).
    """
    per_pass = max(1, math.floor(num_rows / world_size) // batch_size_per_worker)
    steps = per_pass * max(1, math.ceil(min_steps / per_pass))
    return min(steps, max_steps) if max_steps > 0 else steps


@dataclass(frozen=True)
class StageInputs:
    """What a stage loop learns from the driver besides its config.

    Attributes:
        dataset_dir: The shard directory (manifest, shards, bags).
        in_channels: Image channels C.
        num_classes: Mask classes (segmentation stages) or target classes (classification).
        multilabel: Classification targets are multi-hot.
        steps_per_epoch: Optimiser steps each worker takes per epoch (for the LR schedule).
        amp: bf16 autocast and channels_last (GPU only).
        tracking: MLflow run to log per-epoch metrics to from rank 0, or None.
    """

    dataset_dir: str
    in_channels: int
    num_classes: int
    multilabel: bool = False
    steps_per_epoch: int = 1
    amp: bool = False
    tracking: dict | None = None


def epoch_batches(ctx: StageContext, cfg: Any, epoch: int, name: str = "train", *, collate_fn=None,
                  shuffle_buffer: int = 256):
    """This worker's batches of dataset ``name`` for one epoch, as tensors on ``ctx.device``.

    Rows are shuffled locally with a seed that changes every pass; incomplete
    batches are dropped so that every DDP rank takes the same number of steps.
    With ``cfg.min_steps_per_epoch`` the epoch makes whole passes over the data
    until it has taken at least that many steps (a small labelled subset is
    cycled instead of giving a handful of steps); with ``cfg.max_steps_per_epoch``
    it ends after that many steps (a step budget on a large set). Together they
    give every label fraction the same number of steps.
    """
    from medcl.data.ray_datasets import torch_batches

    def one_pass(repeat: int):
        seed = ((cfg.seed * 100_003 + epoch) * 101 + ctx.world_rank) * 1009 + repeat
        return torch_batches(ctx.dataset(name), cfg.batch_size_per_worker, collate_fn=collate_fn, device=ctx.device,
                             drop_last=True, local_shuffle_buffer_size=shuffle_buffer, local_shuffle_seed=seed)

    cap = getattr(cfg, "max_steps_per_epoch", 0)

    def passes():
        steps = repeat = 0
        while True:
            before = steps
            for batch in one_pass(repeat):
                steps += 1
                yield batch
                if cap and steps >= cap:
                    return
            repeat += 1
            if steps >= cfg.min_steps_per_epoch or steps == before:
                return

    return passes()
