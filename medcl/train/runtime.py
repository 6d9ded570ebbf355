"""Small process-level helpers shared by every training loop.

Seeding, bf16 autocast, device placement and DDP unwrapping. Nothing here
imports Ray. A loop learns its rank and world size from its
:class:`~medcl.train.context.StageContext`; the losses' gather helpers read
``torch.distributed`` themselves (:mod:`medcl.losses._distributed`).
"""
from __future__ import annotations

import contextlib
import logging
import random
import sys
from typing import ContextManager

import numpy as np
import torch
from torch import nn

logger = logging.getLogger(__name__)

__all__ = [
    "seed_everything",
    "autocast_context",
    "prepare_model_for_device",
    "unwrap",
]

# numpy's legacy global seed must fit in 32 bits.
_MAX_SEED = 2**32 - 1


def seed_everything(seed: int, rank: int = 0) -> torch.Generator:
    """Seed ``random``, NumPy and torch (CPU and CUDA) for one process.

    Each rank uses ``seed + rank`` so that ranks draw different augmentations
    and sample orders while the whole run stays reproducible. Model
    initialisation may then differ per rank, which is harmless under DDP: the
    wrapper broadcasts rank 0's parameters when it is built.

    Args:
        seed: Base seed of the run, a non-negative int.
        rank: Global rank of this process (``StageContext.world_rank``), a non-negative int.

    Returns:
        A CPU ``torch.Generator`` seeded with ``seed + rank``, for samplers and
        augmentation code that takes an explicit generator.

    Raises:
        TypeError: If ``seed`` or ``rank`` is not an int (bools are refused).
        ValueError: If ``seed`` or ``rank`` is negative or ``seed + rank`` does
            not fit in 32 bits.

    Example:
        >>> g = seed_everything(7)
        >>> x = torch.rand(3, generator=g)
    """
    for name, value in (("seed", seed), ("rank", rank)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    effective = int(seed) + int(rank)
    if effective > _MAX_SEED:
        raise ValueError(
            f"seed + rank must be <= {_MAX_SEED} (NumPy's limit), got {seed} + {rank} = {effective}"
        )
    random.seed(effective)
    np.random.seed(effective)
    torch.manual_seed(effective)  # also seeds every CUDA device
    generator = torch.Generator()
    generator.manual_seed(effective)
    logger.debug("seeded python/numpy/torch with %d (seed %d + rank %d)", effective, seed, rank)
    return generator


def _as_device(device: torch.device | str) -> torch.device:
    if isinstance(device, torch.device):
        return device
    if isinstance(device, str):
        try:
            return torch.device(device)
        except RuntimeError as exc:
            raise ValueError(f"device must name a torch device such as 'cpu' or 'cuda:0', got {device!r}") from exc
    raise TypeError(f"device must be a torch.device or str, got {type(device).__name__} {device!r}")


def autocast_context(device: torch.device | str, enabled: bool) -> ContextManager:
    """Mixed-precision context for the forward pass.

    bf16 autocast on CUDA (no loss scaling needed, unlike fp16); a no-op
    ``contextlib.nullcontext()`` on CPU or when disabled, so CPU tests and CPU
    smoke runs compute in fp32.

    Args:
        device: Device the model runs on (``torch.device`` or a string).
        enabled: Whether mixed precision was asked for (config flag).

    Returns:
        A context manager to wrap the forward pass and loss computation.

    Raises:
        TypeError: If ``enabled`` is not a bool or ``device`` has a wrong type.
        ValueError: If ``device`` is an unknown device string.

    Example:
        >>> with autocast_context("cpu", enabled=True):
        ...     y = torch.nn.Linear(2, 2)(torch.ones(1, 2))
    """
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__} {enabled!r}")
    dev = _as_device(device)
    if enabled and dev.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def prepare_model_for_device(model: nn.Module, device: torch.device | str, channels_last: bool) -> nn.Module:
    """Move ``model`` to ``device``; use channels-last memory format on CUDA only.

    Channels-last speeds up convolutions with tensor cores but only slows CPU
    runs, so the flag is ignored off CUDA. Call this before wrapping in DDP
    (``ray.train.torch.prepare_model(model, move_to_device=False)``).

    Args:
        model: The network (not yet wrapped in DDP).
        device: Target device.
        channels_last: Config flag asking for channels-last on CUDA.

    Returns:
        The same module, moved in place.

    Raises:
        TypeError: If ``model`` is not an ``nn.Module`` or ``channels_last`` is not a bool.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(channels_last, bool):
        raise TypeError(f"channels_last must be a bool, got {type(channels_last).__name__} {channels_last!r}")
    dev = _as_device(device)
    model.to(dev)
    if channels_last and dev.type == "cuda":
        model.to(memory_format=torch.channels_last)
    return model


def _is_compiled(model: nn.Module) -> bool:
    # Only consult dynamo if torch.compile already imported it (importing it costs seconds).
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    optimized = getattr(eval_frame, "OptimizedModule", None)
    return optimized is not None and isinstance(model, optimized)


def unwrap(model: nn.Module) -> nn.Module:
    """Return the plain module inside DDP and/or ``torch.compile`` wrappers.

    ``ray.train.torch.prepare_model`` wraps in ``DistributedDataParallel`` only
    when the world size is above 1, so ``model.module`` must never be assumed.

    Args:
        model: A module, possibly wrapped.

    Returns:
        The innermost module whose ``state_dict`` keys carry no ``module.`` or
        ``_orig_mod.`` prefix.

    Raises:
        TypeError: If ``model`` is not an ``nn.Module``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif _is_compiled(model):
            model = model._orig_mod
        else:
            return model
