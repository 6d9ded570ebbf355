"""The loop every stage shares: set-up, resume, optimise, report, checkpoint, evaluate.

:func:`run_loop` runs one stage on this worker: it takes the stage kind's
:class:`~medcl.train.stage.Stage` (its network, ``init_from`` parts, loss,
batch collation, evaluation) and does the rest the same way for every kind,
on one process or on N Ray Train workers.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist

from medcl.config.metrics import WEIGHT_CHANGE
from medcl.train.batches import epoch_batches, steps_per_epoch
from medcl.train.checkpoints import load_checkpoint, load_model_weights, save_checkpoint
from medcl.train.context import StageContext, temporary_checkpoint_dir
from medcl.train.final_evaluation import BEST_FIGURES, FIGURES, final_evaluation
from medcl.train.runtime import autocast_context, prepare_model_for_device, seed_everything, unwrap
from medcl.train.schedule import stage_schedule
from medcl.train.selection import BestEpoch
from medcl.train.weight_change import WeightChange

logger = logging.getLogger(__name__)

__all__ = ["run_loop", "fit", "build_optimizer", "mean_across_ranks", "NonFiniteLossError", "StageInputs",
           "epoch_batches", "steps_per_epoch"]

LossFn = Callable[[Any], "tuple[torch.Tensor, dict[str, float]]"]


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite: deterministic for the stage's settings, so runners do not retry it.

    Raised on every worker at the same step (the check is agreed across ranks), with a
    message naming the epoch, the step and the stage's settings.
    """


def _settings(cfg: Any) -> str:
    """The stage's scalar settings, for an error message (``lr=0.001, batch_size_per_worker=16, ...``)."""
    from medcl.config.binder import to_dict

    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in to_dict(cfg).items()
                     if k not in ("kind", "model", "init_from") and not isinstance(v, (dict, list)))


def _loss_is_finite(loss: torch.Tensor, ctx: StageContext) -> bool:
    """Whether the loss is finite on every rank (one flag all-reduced when distributed, so all ranks stop together)."""
    finite = torch.isfinite(loss.detach()).to(torch.float32).reshape(1)
    if ctx.distributed and dist.is_initialized():
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item())


def run_loop(ctx: StageContext, cfg: Any, inputs: StageInputs) -> dict[str, float]:
    """Run the stage ``cfg.kind`` on this worker; returns the last epoch's metrics.

    The set-up order fixes every random draw of a run (and the optimiser's
    parameter order), so it is the same for every kind: seed -> build the
    network -> load ``init_from`` parts -> prepare (e.g. the head's class prior) -> trainable
    part -> device / DDP ->
    optimiser and schedule -> loss (views) -> batches -> rank-0 logger -> :func:`fit`,
    evaluating on ``"test"`` (and ``"test_shifted"``) after the last epoch when
    the stage evaluates, and on ``"val"`` every ``val_every`` epochs to report the
    best-validation epoch's test metrics too (:mod:`medcl.train.selection`).

    Args:
        ctx: Where the loop runs (Ray Train worker, Tune trial, or a test's context).
        cfg: The stage config; ``cfg.kind`` picks the stage.
        inputs: What the driver derived (channels, classes, steps per epoch, tracking).

    Returns:
        The last epoch's metrics (with evaluation metrics on rank 0).
    """
    from medcl.train.stages import STAGES
    from medcl.train.tracking_hook import rank_zero_logger

    stage = STAGES[cfg.kind]
    generator = seed_everything(cfg.seed, ctx.world_rank)
    network = stage.build(cfg, inputs)
    if cfg.init_from is not None:
        stage.load_init(network, load_model_weights(cfg.init_from))
    stage.prepare(network, ctx, cfg, inputs)  # e.g. the segmentation head's class prior (every rank alike)
    net = prepare_model_for_device(stage.trainable(network, cfg), ctx.device, channels_last=inputs.amp)
    net = ctx.prepare_model(net)
    weight_change = WeightChange(unwrap(net), WEIGHT_CHANGE.get(cfg.kind, ()))
    optimizer, scheduler = build_optimizer(net.parameters(), cfg, inputs.steps_per_epoch)
    loss_fn = stage.loss(ctx, cfg, inputs, net, generator)

    # One batch iterator across epochs, positioned at the first epoch fit asks for (0, or the
    # resume epoch): every epoch takes exactly the steps the LR schedule counts, and a capped
    # epoch goes on where the previous one stopped (see epoch_batches).
    stream: dict[str, Any] = {}

    def batches(epoch: int):
        from itertools import islice

        if stream.get("next") != epoch:
            stream["batches"] = epoch_batches(ctx, cfg, epoch, steps=inputs.steps_per_epoch, epochs=None,
                                              pass_collate=lambda p: stage.collate(ctx, cfg, p))
        stream["next"] = epoch + 1
        return islice(stream["batches"], inputs.steps_per_epoch)

    run_logger = rank_zero_logger(ctx, inputs)
    evaluate = best_evaluate = None
    if stage.evaluate is not None:  # test (and shifted); their figures go to the run (medcl.train.final_evaluation)
        evaluate = final_evaluation(stage, ctx, inputs, run_logger, FIGURES)
        best_evaluate = final_evaluation(stage, ctx, inputs, run_logger, BEST_FIGURES)

    return fit(ctx, cfg, net, optimizer, scheduler, batches, loss_fn, evaluate=evaluate, best_evaluate=best_evaluate,
               run_logger=run_logger, amp=inputs.amp, weight_change=weight_change,
               selection=BestEpoch.for_stage(ctx, cfg, stage, inputs))


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: Any, steps_per_epoch: int):
    """AdamW and the stage's schedule (``cfg.schedule``: warm-up, then cosine or constant), per optimiser step.

    Raises:
        ValueError: ``cfg.warmup_steps`` is longer than the stage (``max_epochs * steps_per_epoch``).
    """
    params = [p for p in params if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = max(1, cfg.max_epochs * steps_per_epoch)
    if cfg.warmup_steps > total:
        raise ValueError(f"warmup_steps={cfg.warmup_steps} is longer than stage {cfg.kind} "
                         f"({cfg.max_epochs} epochs x {steps_per_epoch} steps = {total} steps)")
    scheduler = stage_schedule(optimizer, cfg.schedule, cfg.warmup_steps, total, cfg.min_lr_ratio)
    return optimizer, scheduler


def _all_ranks_skip(skip: bool, ctx: StageContext) -> bool:
    """Whether every rank asks to skip this batch's optimiser step (one flag all-reduced when distributed)."""
    if not (ctx.distributed and dist.is_initialized()):
        return skip
    flag = torch.tensor([float(skip)], device=ctx.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


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
    skipped = 0
    for batch in batches:
        with autocast_context(ctx.device, amp):
            loss, logs = loss_fn(batch)
        if not _loss_is_finite(loss, ctx):
            value = float(loss.detach())
            raise NonFiniteLossError(f"non-finite loss ({value if not math.isfinite(value) else 'on another rank'}) "
                                     f"at step {steps}")
        if _all_ranks_skip(bool(logs.pop("skip_step", False)), ctx):
            # Nothing to learn from on any rank (e.g. no anchor pixel): an AdamW step on a zero
            # gradient would still move the weights (momentum, weight decay).
            skipped += 1
            continue
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
    metrics["train/skipped_steps"] = float(skipped)
    metrics["train/epoch_time_s"] = seconds
    metrics["train/images_per_s"] = mean_across_ranks(images / max(seconds, 1e-9), 1, ctx) * ctx.world_size
    metrics["train/lr"] = float(optimizer.param_groups[0]["lr"])
    if steps == 0 and skipped:
        raise ValueError(f"all {skipped} batches of the epoch were skipped (nothing to learn from, e.g. no "
                         "foreground pixel in the labelled slices); check the masks or use more labelled data")
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
    best_evaluate: Callable[[torch.nn.Module], dict[str, float]] | None = None,
    run_logger: Any = None,
    amp: bool = False,
    weight_change: Callable[[torch.nn.Module], dict[str, float]] | None = None,
    selection: BestEpoch | None = None,
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
        best_evaluate: The same evaluation for the best validation epoch's weights, which
            ``selection`` runs (default ``evaluate``; run_loop's logs its figures under ``figures/best/``).
        run_logger: Rank-0 metrics logger (``log_metrics(dict, step)``) or None.
        amp: bf16 autocast (only takes effect on CUDA).
        weight_change: ``weight_change(unwrapped model)`` -> metrics added to every epoch's report
            (:class:`~medcl.train.weight_change.WeightChange`).
        selection: Rank 0's validation and best-epoch record (:class:`~medcl.train.selection.BestEpoch`):
            its value joins the reports of the epochs it validates, its ``best/*`` the last
            report, its state every checkpoint (and comes back on resume).

    Returns:
        The last epoch's metrics (with evaluation metrics on rank 0).
    """
    from medcl.config.binder import to_dict

    start_epoch = 0
    with ctx.latest_checkpoint() as checkpoint:
        if checkpoint is not None:
            meta = load_checkpoint(checkpoint, model=unwrap(model), optimizer=optimizer, scheduler=scheduler)
            start_epoch = int(meta["epoch"]) + 1
            if selection is not None:
                selection.restore(checkpoint, start_epoch - 1, unwrap(model))
            logger.info("resumed from %s at epoch %d", checkpoint, start_epoch)
    metrics: dict[str, float] = {}
    for epoch in range(start_epoch, cfg.max_epochs):
        try:
            metrics = _train_epoch(ctx, model, batches(epoch), loss_fn, optimizer, scheduler, amp)
            if weight_change is not None:
                metrics.update(weight_change(unwrap(model)))
        except NonFiniteLossError as exc:
            raise NonFiniteLossError(
                f"{exc} of epoch {epoch} (optimiser step {int(scheduler.last_epoch)}) of stage {cfg.kind} with "
                f"{_settings(cfg)}; lower lr (or raise warmup_steps) or check the inputs. Not retried: the "
                "same settings give the same loss") from None
        metrics["epoch"] = float(epoch)
        metrics["max_epochs"] = float(cfg.max_epochs)
        last = epoch == cfg.max_epochs - 1
        if selection is not None and selection.due(epoch):
            metrics.update(selection.update(unwrap(model), epoch))
        if last and evaluate is not None and ctx.is_rank_zero:
            tests = evaluate(unwrap(model))
            metrics.update(tests)
            if selection is not None:
                metrics.update(selection.report(unwrap(model), best_evaluate or evaluate, tests, epoch))
        # Logged before the report: Tune may stop a trial inside ``report`` (ASHA, an
        # interruption), and the epoch must be in MLflow by then. An epoch lost to a crash
        # before its checkpoint runs again on resume and logs a second point at its step.
        if run_logger is not None and ctx.is_rank_zero:
            run_logger.log_metrics(metrics, step=epoch)
        if ctx.is_rank_zero and (last or (epoch + 1) % cfg.checkpoint_every == 0):
            with temporary_checkpoint_dir() as tmp:
                if selection is not None:  # before meta.json, which save_checkpoint writes last
                    selection.save(tmp, epoch)
                save_checkpoint(tmp, model=model, optimizer=optimizer, scheduler=scheduler, epoch=epoch,
                                step=int(scheduler.last_epoch), config=to_dict(cfg), metrics=metrics)
                ctx.report(metrics, tmp)
        else:
            ctx.report(metrics, None)
    if start_epoch >= cfg.max_epochs and evaluate is not None and ctx.is_rank_zero:
        tests = evaluate(unwrap(model))
        metrics = {"epoch": float(cfg.max_epochs - 1), **tests}
        if selection is not None:
            metrics.update(selection.report(unwrap(model), best_evaluate or evaluate, tests, cfg.max_epochs - 1))
    return metrics


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
