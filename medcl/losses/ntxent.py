"""Image-level contrastive losses: SimCLR NT-Xent and its multi-positive (SupCon) form.

References:
    Chen et al., "A Simple Framework for Contrastive Learning of Visual
    Representations" (SimCLR), ICML 2020.
    Khosla et al., "Supervised Contrastive Learning", NeurIPS 2020 (the
    multi-positive form used for MICLe bags and volume partitions).

Both losses L2-normalise the embeddings, compute in float32 with autocast off
(stable in bf16/fp16 at tau = 0.05), exclude self-similarity from the
denominator by masking (never by subtracting an exponential) and use the
chunked log-sum-exp of :mod:`medcl.losses._lse`, which never exponentiates a
raw logit. Up to ``_lse.CACHE_BYTES`` (256 MiB, i.e. 2B = 8192 embeddings in
float32) the exponentiated similarities are kept for backward, which makes it
faster than the plain full-matrix cross-entropy form; beyond that memory is
O(rows * keys) per chunk.

Distributed (``gather_distributed=True`` under an initialised process group):
the embeddings of all ranks are gathered with a gather that passes gradients
back, and each rank computes the rows of its own anchors. The rank's loss is
``world_size * (sum of its anchors' losses) / (anchors over all ranks)``, so
the mean of the per-rank losses equals the single-process loss on the
concatenated batch, and DDP's averaging of gradients yields that loss's exact
gradient (see :mod:`medcl.losses._distributed`). With the same batch size on
every rank this is simply the mean over the rank's own anchors.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medcl.losses import _lse
from medcl.losses._distributed import (
    all_reduce_sum,
    check_distributed_available,
    gather_no_grad,
    gather_sizes,
    gather_with_grad,
    rank,
    world_size,
)
from medcl.losses._lse import check_temperature, float32_math, segment_logsumexp, upcast

__all__ = ["nt_xent", "multi_positive_nt_xent", "NTXentLoss", "MultiPositiveNTXentLoss"]


def _check_embeddings(name: str, z: torch.Tensor) -> None:
    if not isinstance(z, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(z).__name__}")
    if not z.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {z.dtype}")
    if z.dim() != 2 or z.shape[0] < 1:
        raise ValueError(f"{name} must have shape (N, D) with N >= 1, got {tuple(z.shape)}")


def _keys(z: torch.Tensor, gather: bool) -> tuple[torch.Tensor, int, list[int] | None]:
    """All ranks' embeddings (with gradient), this rank's row offset in them, sizes."""
    if gather and world_size() > 1:
        sizes = gather_sizes(z.shape[0], z.device)
        return gather_with_grad(z, sizes), sum(sizes[: rank()]), sizes
    return z, 0, None


def _global_count(n: int, device: torch.device, gather: bool) -> torch.Tensor:
    count = torch.tensor(float(n), device=device)
    return all_reduce_sum(count) if gather else count


def nt_xent(
    z1: torch.Tensor,
    z2: torch.Tensor,
    temperature: float = 0.1,
    gather_distributed: bool = False,
    *,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """SimCLR NT-Xent loss (methods 1a), mean over the 2B anchors.

    ``l_i = -log exp(s(z_i, z_p(i))/tau) / sum_{k != i} exp(s(z_i, z_k)/tau)``
    with s the cosine similarity and p(i) the other view of anchor i.

    Args:
        z1: Projections of view 0. Shape: (B, D).
        z2: Projections of view 1 (row i pairs with row i of ``z1``). Shape: (B, D).
        temperature: tau > 0 (0.1 SimCLR, 0.5 the segmentation paper's global stage).
        gather_distributed: Use the embeddings of all ranks as negatives (no-op
            when torch.distributed is not initialised).
        chunk_size: Anchor rows per chunk; None for chunks of about 8 MiB of similarities (128 MiB on GPU).

    Returns:
        Scalar float32 loss (float64 for float64 input; per-rank convention
        under DDP: see module doc).

    Raises:
        TypeError: for non-tensor or non-float inputs.
        ValueError: for mismatched shapes, temperature <= 0, or
            gather_distributed=True without torch.distributed.

    Example:
        >>> loss = nt_xent(torch.randn(8, 128), torch.randn(8, 128), temperature=0.1)
    """
    temperature = check_temperature(temperature)
    check_distributed_available(gather_distributed)
    _check_embeddings("z1", z1)
    _check_embeddings("z2", z2)
    if z1.shape != z2.shape:
        raise ValueError(f"z1 and z2 must have the same shape (B, D), got {tuple(z1.shape)} and {tuple(z2.shape)}")
    b = z1.shape[0]
    with float32_math(z1.device):
        z = F.normalize(upcast(torch.cat([z1, z2])), dim=1)  # (2B, D): this rank's anchors
        pos = (z[:b] * z[b:]).sum(1)  # (B,): s(z_i, z_p(i)), same for both views
        keys, offset, _ = _keys(z, gather_distributed)
        self_idx = torch.arange(offset, offset + 2 * b, device=z.device)
        lse = segment_logsumexp(z, keys, self_idx, 1.0 / temperature, chunk_size=chunk_size,
                                cache_bytes=_lse.CACHE_BYTES)
        local_sum = lse.sum() - 2.0 * pos.sum() / temperature
        scale = world_size() if gather_distributed else 1
        return local_sum * scale / _global_count(2 * b, z.device, gather_distributed)


def multi_positive_nt_xent(
    z: torch.Tensor,
    group_ids: torch.Tensor,
    temperature: float = 0.1,
    gather_distributed: bool = False,
    *,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Multi-positive (SupCon-form) NT-Xent (methods 1b).

    All *other* embeddings with the same group id are positives; the
    denominator is all other embeddings:
    ``l_i = -(1/|P(i)|) sum_{p in P(i)} log exp(s(z_i,z_p)/tau) / sum_{k != i} exp(s(z_i,z_k)/tau)``.
    Anchors without a positive are excluded from the mean. With group id =
    image index (two views share an id) this equals :func:`nt_xent`.

    Args:
        z: Embeddings. Shape: (N, D).
        group_ids: Integer group of each embedding. Shape: (N,). Under
            ``gather_distributed`` ids are compared across ranks, so make them
            globally meaningful (e.g. offset image indices by rank).
        temperature: tau > 0.
        gather_distributed: Gather all ranks' embeddings (and ids) as keys.
        chunk_size: Anchor rows per chunk; None for chunks of about 8 MiB of similarities (128 MiB on GPU).

    Returns:
        Scalar float32 loss (float64 for float64 input); 0 with a zero gradient
        path to ``z`` when no embedding (on any rank) has a positive.

    Raises:
        TypeError: for non-tensor, non-float ``z`` or non-integer ``group_ids``.
        ValueError: for mismatched shapes, temperature <= 0, or
            gather_distributed=True without torch.distributed.
    """
    temperature = check_temperature(temperature)
    check_distributed_available(gather_distributed)
    _check_embeddings("z", z)
    if not isinstance(group_ids, torch.Tensor):
        raise TypeError(f"group_ids must be a torch.Tensor, got {type(group_ids).__name__}")
    if group_ids.is_floating_point() or group_ids.is_complex() or group_ids.dtype == torch.bool:
        raise TypeError(f"group_ids must be an integer tensor, got dtype {group_ids.dtype}")
    if group_ids.shape != z.shape[:1]:
        raise ValueError(f"group_ids must have shape (N,) matching z (N, D), got {tuple(group_ids.shape)} "
                         f"and {tuple(z.shape)}")
    n = z.shape[0]
    with float32_math(z.device):
        zn = F.normalize(upcast(z), dim=1)
        keys, offset, sizes = _keys(zn, gather_distributed)
        ids = group_ids.long().to(z.device)
        ids = gather_no_grad(ids, sizes) if sizes is not None else ids
        _, group = torch.unique(ids, return_inverse=True)
        count = torch.bincount(group)
        local_group = group[offset : offset + n]
        anchors = (count[local_group] > 1).nonzero().squeeze(1)
        n_anchors = _global_count(anchors.numel(), z.device, gather_distributed)
        if float(n_anchors) == 0:
            return upcast(z.sum()) * 0.0
        fa, ga = zn[anchors], local_group[anchors]
        group_sum = keys.new_zeros(int(count.numel()), keys.shape[1]).index_add(0, group, keys)
        pos = (fa * (group_sum[ga] - fa)).sum(1) / (count[ga] - 1)  # mean s(z_i, z_p) over P(i)
        lse = segment_logsumexp(fa, keys, anchors + offset, 1.0 / temperature, chunk_size=chunk_size,
                                cache_bytes=_lse.CACHE_BYTES)
        local_sum = (lse - pos / temperature).sum()
        scale = world_size() if gather_distributed else 1
        return local_sum * scale / n_anchors


class NTXentLoss(nn.Module):
    """Module form of :func:`nt_xent` holding its settings.

    Args:
        temperature: tau > 0.
        gather_distributed: Gather negatives from all ranks under DDP.

    Raises:
        TypeError / ValueError: for an invalid setting, naming it.

    Example:
        >>> loss_fn = NTXentLoss(temperature=0.1)
        >>> loss = loss_fn(z1, z2)  # (B, D) each
    """

    def __init__(self, temperature: float = 0.1, gather_distributed: bool = False) -> None:
        super().__init__()
        self.temperature = check_temperature(temperature)
        check_distributed_available(gather_distributed)
        self.gather_distributed = bool(gather_distributed)

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        """(B, D), (B, D) -> scalar loss."""
        return nt_xent(z1, z2, self.temperature, self.gather_distributed)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, gather_distributed={self.gather_distributed}"


class MultiPositiveNTXentLoss(nn.Module):
    """Module form of :func:`multi_positive_nt_xent`.

    Args:
        temperature: tau > 0.
        gather_distributed: Gather embeddings and ids from all ranks under DDP.
    """

    def __init__(self, temperature: float = 0.1, gather_distributed: bool = False) -> None:
        super().__init__()
        self.temperature = check_temperature(temperature)
        check_distributed_available(gather_distributed)
        self.gather_distributed = bool(gather_distributed)

    def forward(self, z: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
        """(N, D), (N,) -> scalar loss."""
        return multi_positive_nt_xent(z, group_ids, self.temperature, self.gather_distributed)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, gather_distributed={self.gather_distributed}"
