"""Learning-rate schedules, stepped once per optimiser step: linear warm-up, then cosine decay or a constant rate.

A stage's ``schedule`` setting picks one (:func:`stage_schedule`): ``cosine``
decays from ``lr`` to ``min_lr_ratio * lr`` over the stage's optimiser steps
(what contrastive pretraining uses), ``constant`` keeps ``lr`` (what the
reference fine-tuning code and a bare baseline use). Both start with
``warmup_steps`` steps of linear warm-up.
"""
from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["warmup_cosine", "warmup_cosine_factor", "warmup_constant_factor", "stage_schedule", "SCHEDULES"]

#: The values of a stage's ``schedule`` setting.
SCHEDULES = ("cosine", "constant")


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def warmup_cosine_factor(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the base learning rate after ``step`` scheduler steps.

    * warm-up, ``step < W``: ``(step + 1) / (W + 1)`` — rises linearly and is
      never 0, so the first optimizer step already learns;
    * decay, ``W <= step <= T``: ``r + (1 - r) * 0.5 * (1 + cos(pi * (step - W) / (T - W)))``
      — 1 at ``step = W``, ``r`` at ``step = T``;
    * after ``T``: stays at ``r``.

    with ``W = warmup_steps``, ``T = total_steps``, ``r = min_lr_ratio``.
    Arguments are validated by :func:`warmup_cosine`.
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if total_steps == warmup_steps:  # no decay phase: the run ends with warm-up
        return min_lr_ratio
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_constant_factor(step: int, warmup_steps: int) -> float:
    """Multiplier of the base rate after ``step`` scheduler steps: ``(step + 1) / (W + 1)`` during warm-up, then 1."""
    return (step + 1) / (warmup_steps + 1) if step < warmup_steps else 1.0


def stage_schedule(optimizer: torch.optim.Optimizer, schedule: str, warmup_steps: int, total_steps: int,
                   min_lr_ratio: float = 0.0) -> LambdaLR:
    """The scheduler a stage's settings ask for (``schedule``: ``"cosine"`` or ``"constant"``).

    Args:
        optimizer: The optimizer whose groups' ``lr`` is the base (peak) rate.
        schedule: ``"cosine"`` (:func:`warmup_cosine`) or ``"constant"`` (warm-up, then the base rate).
        warmup_steps: Steps of linear warm-up, in ``[0, total_steps]``.
        total_steps: The stage's optimiser steps (``max_epochs * steps_per_epoch``).
        min_lr_ratio: Where the cosine ends (ignored by ``constant``).

    Raises:
        ValueError: an unknown ``schedule``, or ``warmup_steps`` longer than the stage.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if schedule == "cosine":
        return warmup_cosine(optimizer, warmup_steps, total_steps, min_lr_ratio)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    warmup_steps = _check_int("warmup_steps", warmup_steps, 0)
    if warmup_steps > _check_int("total_steps", total_steps, 1):
        raise ValueError(f"warmup_steps must be <= total_steps, got warmup_steps={warmup_steps} > "
                         f"total_steps={total_steps}")

    def factor(step: int) -> float:
        return warmup_constant_factor(step, warmup_steps)

    return LambdaLR(optimizer, lr_lambda=factor)


def warmup_cosine(
    optimizer: torch.optim.Optimizer,
    warmup_steps: int,
    total_steps: int,
    min_lr_ratio: float = 0.0,
) -> LambdaLR:
    """Cosine learning-rate decay with linear warm-up, stepped once per optimizer step.

    Every parameter group's learning rate becomes ``base_lr * f(s)`` after
    ``s`` calls of ``scheduler.step()`` (see :func:`warmup_cosine_factor` for
    ``f``): it ramps up linearly over ``warmup_steps`` steps, reaches ``base_lr``
    at step ``warmup_steps``, follows a half cosine down to
    ``base_lr * min_lr_ratio`` at step ``total_steps`` and stays there.
    Call ``scheduler.step()`` after each ``optimizer.step()``; the scheduler's
    ``state_dict`` holds only numbers, so it round-trips through
    :func:`medcl.train.checkpoints.save_checkpoint`.

    Args:
        optimizer: The optimizer whose groups' ``lr`` is the base (peak) rate.
        warmup_steps: Steps of linear warm-up, ``>= 0`` (0: start at the peak).
        total_steps: Total optimizer steps of the run, ``>= max(1, warmup_steps)``.
        min_lr_ratio: Final rate as a fraction of the base rate, in ``[0, 1]``.

    Returns:
        A ``torch.optim.lr_scheduler.LambdaLR``.

    Raises:
        TypeError: If the step counts are not ints or ``optimizer`` is not an optimizer.
        ValueError: If a step count is out of range or ``min_lr_ratio`` is outside ``[0, 1]``.

    Example:
        >>> opt = torch.optim.Adam(torch.nn.Linear(2, 2).parameters(), lr=3e-4)
        >>> sched = warmup_cosine(opt, warmup_steps=100, total_steps=10_000)
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    warmup_steps = _check_int("warmup_steps", warmup_steps, 0)
    total_steps = _check_int("total_steps", total_steps, 1)
    if warmup_steps > total_steps:
        raise ValueError(
            f"warmup_steps must be <= total_steps, got warmup_steps={warmup_steps} > total_steps={total_steps}"
        )
    if isinstance(min_lr_ratio, bool) or not isinstance(min_lr_ratio, (int, float)):
        raise TypeError(f"min_lr_ratio must be a float, got {type(min_lr_ratio).__name__} {min_lr_ratio!r}")
    if not 0.0 <= float(min_lr_ratio) <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    ratio = float(min_lr_ratio)

    # A plain function (not a callable object) so LambdaLR.state_dict stores no closure state.
    def factor(step: int) -> float:
        return warmup_cosine_factor(step, warmup_steps, total_steps, ratio)

    return LambdaLR(optimizer, lr_lambda=factor)
