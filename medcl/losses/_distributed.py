"""Distributed helpers for the contrastive losses.

Everything here degrades to a single process when ``torch.distributed`` is not
initialised, so the same loss code runs in unit tests and under DDP.

Gradient convention (shared by every loss with ``gather_distributed=True``):

* :func:`gather_with_grad` concatenates the ``[n_r, D]`` tensors of all ranks
  (sizes may differ between ranks). Its backward **sums** the incoming gradient
  over ranks (``all_reduce(SUM)``) and returns this rank's slice, so rank ``r``
  receives ``d(sum_r' L_r') / dz_r``: the contribution of every rank's loss to
  its own embeddings.
* Each rank computes only the rows of its own anchors and returns
  ``L_r = world_size * (sum of its anchors' losses) / (number of anchors over
  all ranks)``. Then ``mean_r L_r`` is the single-process loss on the
  concatenated batch, and DDP's *average* of gradients over ranks,
  ``(1/W) sum_r d(sum_r' L_r')/dtheta``, is exactly its gradient.
  With equal batches per rank (NT-Xent), ``L_r`` is simply the mean over the
  rank's own anchors.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = [
    "world_size",
    "rank",
    "check_distributed_available",
    "gather_sizes",
    "gather_with_grad",
    "gather_no_grad",
    "all_reduce_sum",
]


def world_size() -> int:
    """Number of processes in the default group, 1 without ``torch.distributed``."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """Rank of this process in the default group, 0 without ``torch.distributed``."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def check_distributed_available(gather_distributed: bool) -> None:
    """Raise if ``gather_distributed=True`` cannot work in this torch build.

    Raises:
        ValueError: if ``gather_distributed`` is True and ``torch.distributed`` is
            not available.
    """
    if gather_distributed and not dist.is_available():
        raise ValueError(
            "gather_distributed=True but torch.distributed is unavailable in this torch build; "
            "set gather_distributed=False."
        )


def gather_sizes(n: int, device: torch.device) -> list[int]:
    """First-dimension size of the tensor every rank contributes, in rank order."""
    local = torch.tensor([n], dtype=torch.int64, device=device)
    out = [torch.zeros_like(local) for _ in range(world_size())]
    dist.all_gather(out, local)
    return [int(t.item()) for t in out]


def _all_gather_padded(x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """``all_gather`` tensors whose first dimension differs between ranks."""
    n_max = max(sizes)
    x = x.contiguous()
    if x.shape[0] < n_max:
        pad = x.new_zeros((n_max - x.shape[0],) + tuple(x.shape[1:]))
        x = torch.cat([x, pad], dim=0)
    out = [torch.empty_like(x) for _ in sizes]
    dist.all_gather(out, x)
    return torch.cat([t[:n] for t, n in zip(out, sizes)], dim=0)


class _GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward all-reduces (sums) the gradient and keeps this rank's slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:  # type: ignore[override]
        r = rank()
        ctx.start = sum(sizes[:r])
        ctx.stop = ctx.start + sizes[r]
        return _all_gather_padded(x, sizes)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.start : ctx.stop], None


def gather_with_grad(x: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
    """Concatenate ``x`` from all ranks along dim 0, passing gradients back to every rank.

    Args:
        x: This rank's tensor. Shape: (n_r, ...); n_r may differ between ranks.
        sizes: n_r of every rank (from :func:`gather_sizes`); fetched when None.

    Returns:
        Shape: (sum_r n_r, ...), rank 0's rows first. ``x`` itself when not distributed.
    """
    if world_size() == 1:
        return x
    if sizes is None:
        sizes = gather_sizes(x.shape[0], x.device)
    return _GatherWithGrad.apply(x, sizes)


def gather_no_grad(x: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
    """Like :func:`gather_with_grad` for tensors that need no gradient (labels, ids)."""
    if world_size() == 1:
        return x
    if sizes is None:
        sizes = gather_sizes(x.shape[0], x.device)
    with torch.no_grad():
        return _all_gather_padded(x, sizes)


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of a (gradient-free) tensor over ranks; ``x`` unchanged in one process."""
    if world_size() == 1:
        return x
    x = x.detach().clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x
