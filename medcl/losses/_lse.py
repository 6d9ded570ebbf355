"""Chunked log-sum-exp over similarity rows, shared by every contrastive loss.

:func:`segment_logsumexp` returns, for each anchor ``n``,

    lse_n = log sum_{a in seg(n), a != self(n)} exp(scale * q_n . k_a)

without materialising the (anchors x keys) matrix: anchors are processed in row
chunks sized so that one chunk holds about ``CHUNK_BYTES`` (8 MiB on CPU, 128 MiB
on GPU) of float32 similarities, and the backward pass recomputes each chunk (flash-attention
style), so extra memory is O(chunk * keys) and gradients are exact. On request
(NT-Xent: ``cache_bytes=CACHE_BYTES``, 256 MiB) a problem whose whole matrix fits
in the budget keeps the exponentiated chunks instead of recomputing them.

Keys may be split into contiguous *segments* (the blocks of the block-mode local
loss); an anchor then only sees the keys of its own segment.

Overflow safety without a max pass: when ``2 * scale * max|q| * max|k| <= 80``
(e.g. L2-normalised inputs and tau >= 0.025) every logit lies within 80 of the
bound ``scale * max|q| * max|k|``, so ``exp(logit - bound)`` neither overflows
nor underflows in float32 and the bound is used as a fixed shift. Otherwise each
chunk subtracts its exact row maximum (self excluded).
"""
from __future__ import annotations

import math
from contextlib import AbstractContextManager

import torch
from torch.autograd.function import once_differentiable

__all__ = [
    "CHUNK_BYTES",
    "CHUNK_BYTES_CUDA",
    "CACHE_BYTES",
    "check_temperature",
    "float32_math",
    "segment_logsumexp",
    "upcast",
]

#: Target size of one chunk of float32 similarities (rows x keys x 4 bytes) on CPU:
#: small enough to stay in cache between the matmul and the exp (measured best on
#: a 2-core Xeon, see benchmarks/LOSSES.md).
CHUNK_BYTES = 8 * 2**20
#: The same on GPUs, where fewer, larger chunks amortise kernel launches.
CHUNK_BYTES_CUDA = 128 * 2**20
#: Budget under which NT-Xent keeps the exponentiated chunks for backward (3 matmuls
#: instead of 4), e.g. 2B = 8192 embeddings in float32; the local losses never do.
CACHE_BYTES = 256 * 2**20
_FIXED_SHIFT_RANGE = 80.0


def check_temperature(temperature: float) -> float:
    """Return ``temperature`` as float, or raise if it is not a finite number > 0.

    Raises:
        TypeError: if ``temperature`` is not a real number.
        ValueError: if it is not finite and > 0.
    """
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a float > 0, got {type(temperature).__name__} {temperature!r}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite float > 0, got {temperature!r}")
    return float(temperature)


def float32_math(device: torch.device) -> AbstractContextManager:
    """Context that disables autocast so the loss math stays in float32 (or float64)."""
    return torch.autocast(device_type=device.type, enabled=False)


def upcast(x: torch.Tensor) -> torch.Tensor:
    """``x`` in the loss's working precision: float64 stays, everything else becomes float32."""
    return x if x.dtype == torch.float64 else x.float()


def _rows_per_chunk(n_keys: int, chunk_size: int | None, device: torch.device) -> int:
    if chunk_size is not None:
        return chunk_size
    budget = CHUNK_BYTES_CUDA if device.type == "cuda" else CHUNK_BYTES
    return max(1, budget // (4 * max(n_keys, 1)))  # float32 sized; float64 chunks are 2x


def _with_ones(k: torch.Tensor) -> torch.Tensor:
    """Keys with an extra column of ones. Shape: (K, D + 1)."""
    return torch.cat([k, k.new_ones(k.shape[0], 1)], dim=1)


def _shifted(q: torch.Tensor, scale: float, shift: float | torch.Tensor) -> torch.Tensor:
    """Anchors ``[scale * q, -shift]`` so that one matmul with :func:`_with_ones` keys yields
    ``scale * q.k - shift`` (no separate pass over the chunk). Shape: (rows, D + 1)."""
    col = shift.reshape(-1, 1) if isinstance(shift, torch.Tensor) else q.new_full((q.shape[0], 1), shift)
    return torch.cat([q * scale, -col], dim=1)


def _chunks(key_ptr: list[int], anchor_ptr: list[int], chunk_size: int | None, device: torch.device):
    """Yield (k0, k1, i, j): anchors i:j against the keys k0:k1 of their segment."""
    for s in range(len(key_ptr) - 1):
        k0, k1, a0, a1 = key_ptr[s], key_ptr[s + 1], anchor_ptr[s], anchor_ptr[s + 1]
        rows_per = _rows_per_chunk(k1 - k0, chunk_size, device)
        for i in range(a0, a1, rows_per):
            yield k0, k1, i, min(i + rows_per, a1)


class _SegmentLogSumExp(torch.autograd.Function):
    """Exact chunked log-sum-exp; see :func:`segment_logsumexp`.

    Forward keeps, per anchor row, ``lse`` and (when the whole problem fits in
    ``cache_bytes``) the exponentiated chunks ``x = exp(logits - shift)`` with
    their row sums ``d``, so that backward needs only the two gradient matmuls;
    otherwise backward recomputes ``p = exp(logits - lse)`` chunk by chunk.
    """

    @staticmethod
    def forward(ctx, q, k, self_idx, scale, key_ptr, anchor_ptr, chunk_size, cache_bytes):  # type: ignore[override]
        lse = q.new_empty(q.shape[0])
        bound = 0.0
        if q.shape[0] and k.shape[0]:
            bound = scale * float(q.norm(dim=1).max()) * float(k.norm(dim=1).max())
        fixed = 2.0 * bound <= _FIXED_SHIFT_RANGE
        k_aug = _with_ones(k) if fixed else None
        pairs = sum((a1 - a0) * (k1 - k0) for k0, k1, a0, a1 in
                    zip(key_ptr, key_ptr[1:], anchor_ptr, anchor_ptr[1:]))
        cache = pairs * q.element_size() <= cache_bytes
        chunks, denom = [], q.new_empty(q.shape[0]) if cache else None
        for k0, k1, i, j in _chunks(key_ptr, anchor_ptr, chunk_size, q.device):
            rows = torch.arange(j - i, device=q.device)
            cols = self_idx[i:j] - k0
            if fixed:
                x = torch.mm(_shifted(q[i:j], scale, bound), k_aug[k0:k1].T)  # (rows, keys): logits - bound
                x.exp_()
                x[rows, cols] = 0.0  # self term
                shift = bound
            else:
                x = torch.mm(q[i:j], k[k0:k1].T).mul_(scale)
                x[rows, cols] = float("-inf")  # self term
                shift = x.amax(1)
                x.sub_(shift[:, None]).exp_()
            row_sum = x.sum(1)
            lse[i:j] = torch.log(row_sum) + shift
            if cache:
                chunks.append(x)
                denom[i:j] = row_sum
        ctx.save_for_backward(q, k, self_idx, lse)
        ctx.scale, ctx.key_ptr, ctx.anchor_ptr, ctx.chunk_size = scale, key_ptr, anchor_ptr, chunk_size
        ctx.chunks, ctx.denom = chunks, denom
        return lse

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_lse):  # type: ignore[override]
        q, k, self_idx, lse = ctx.saved_tensors
        grad_q = torch.zeros_like(q) if ctx.needs_input_grad[0] else None
        grad_k = torch.zeros_like(k) if ctx.needs_input_grad[1] else None
        coef = grad_lse * ctx.scale  # d lse_n / d(q_n . k_a) = scale * p_na
        if ctx.denom is not None:
            coef = coef / ctx.denom  # cached x = p * d
        k_aug = _with_ones(k) if ctx.denom is None else None
        for c, (k0, k1, i, j) in enumerate(_chunks(ctx.key_ptr, ctx.anchor_ptr, ctx.chunk_size, q.device)):
            keys = k[k0:k1]
            if ctx.denom is not None:
                p = ctx.chunks[c]
            else:  # recompute the softmax probabilities of the chunk: exp(logits - lse)
                p = torch.mm(_shifted(q[i:j], ctx.scale, lse[i:j]), k_aug[k0:k1].T)
                p.exp_()
                p[torch.arange(j - i, device=q.device), self_idx[i:j] - k0] = 0.0  # self (may be inf before)
            g = coef[i:j, None]
            if grad_q is not None:
                torch.mm(p, keys, out=grad_q[i:j])
                grad_q[i:j].mul_(g)
            if grad_k is not None:
                grad_k[k0:k1].addmm_(p.T, q[i:j] * g)
        ctx.chunks = None
        return grad_q, grad_k, None, None, None, None, None, None


def segment_logsumexp(
    q: torch.Tensor,
    k: torch.Tensor,
    self_idx: torch.Tensor,
    scale: float,
    key_ptr: list[int] | None = None,
    anchor_ptr: list[int] | None = None,
    chunk_size: int | None = None,
    cache_bytes: int = 0,
) -> torch.Tensor:
    """Per-anchor log-sum-exp of ``scale * q_n . k_a`` over its segment's keys, self excluded.

    Args:
        q: Anchors (float32 or float64). Shape: (M, D).
        k: Keys (same dtype as q), grouped by segment. Shape: (K, D).
        self_idx: Row of ``k`` that is anchor n itself (excluded from its sum). Shape: (M,).
        scale: Multiplier of the dot products (1 / temperature).
        key_ptr: Segment s owns keys ``key_ptr[s]:key_ptr[s+1]``; one segment if None.
        anchor_ptr: Segment s owns anchors ``anchor_ptr[s]:anchor_ptr[s+1]``; one segment if None.
        chunk_size: Anchor rows per chunk; None sizes chunks to about ``CHUNK_BYTES``
            (``CHUNK_BYTES_CUDA`` on GPU).
        cache_bytes: When the whole (M x K) matrix takes at most this many bytes,
            keep its exponentiated chunks for backward instead of recomputing
            them (3 matmuls instead of 4). 0 (default) never keeps them, so
            memory stays O(chunk * K).

    Returns:
        lse. Shape: (M,), dtype of q. Differentiable w.r.t. ``q`` and ``k``.
    """
    if key_ptr is None:
        key_ptr, anchor_ptr = [0, k.shape[0]], [0, q.shape[0]]
    return _SegmentLogSumExp.apply(q, k, self_idx, float(scale), key_ptr, anchor_ptr, chunk_size, cache_bytes)
