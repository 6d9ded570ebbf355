"""Pixel-level contrastive losses: dense self-supervised (2a) and supervised (2b).

Both work on pixel embeddings ``features`` of shape (B, 2, C, H, W) (two views
of the same B slices) and never build the N x N similarity matrix
(N = B*2*H*W): the log-sum-exp over the denominator is computed in row chunks
by :class:`_SegmentLogSumExp`, a custom autograd function whose backward
recomputes each chunk's similarities, so memory is O(N * chunk) and the
gradients are exact. Positive terms use class sums instead of pairs:
``sum_{p in P(n)} f_n . f_p = f_n . (S_{y_n} - f_n)`` with ``S_c`` the sum of
the embeddings labelled ``c``.

All computation is in float32 (autocast disabled inside; float64 inputs stay
float64), so bf16/fp16 inputs are fine at tau = 0.05; the loss is a float32
scalar (float64 for float64 inputs).

References:
    Chaitanya et al., "Contrastive learning of global and local features for
    medical image segmentation with limited annotations", NeurIPS 2020.
    Hu et al., "Semi-supervised contrastive learning for label-efficient
    medical image segmentation", MICCAI 2021.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medcl.losses._lse import check_temperature, float32_math, segment_logsumexp, upcast

__all__ = [
    "has_anchor",
    "dense_local_contrastive",
    "supervised_local_contrastive",
    "DenseLocalContrastiveLoss",
    "SupervisedLocalContrastiveLoss",
]

MODES = ("exact", "stride", "block")


def _check_features(features: torch.Tensor) -> tuple[int, int, int, int]:
    if not isinstance(features, torch.Tensor):
        raise TypeError(f"features must be a torch.Tensor, got {type(features).__name__}")
    if not features.is_floating_point():
        raise TypeError(f"features must be a floating-point tensor, got dtype {features.dtype}")
    if features.dim() != 5 or features.shape[1] != 2:
        raise ValueError(f"features must have shape (B, 2, C, H, W), got {tuple(features.shape)}")
    b, _, c, h, w = features.shape
    return b, c, h, w


def _check_labels(labels: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Return labels as int64 (B, 2, H, W)."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got dtype {labels.dtype}")
    b, _, _, h, w = features.shape
    if labels.shape == (b, h, w):
        labels = labels.unsqueeze(1).expand(b, 2, h, w)
    elif labels.shape != (b, 2, h, w):
        raise ValueError(
            f"labels must have shape (B, H, W) or (B, 2, H, W) matching features (B, 2, C, H, W); "
            f"got labels {tuple(labels.shape)} and features {tuple(features.shape)}"
        )
    if labels.device != features.device:
        raise ValueError(f"labels are on {labels.device} but features on {features.device}")
    return labels.long()


def _check_settings(mode: str, stride: int, block_size: int, ignore_index: int, chunk_size: int | None) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    for name, value in (("stride", stride), ("block_size", block_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if ignore_index == 0:
        raise ValueError("ignore_index=0 collides with the background label 0; use a negative value such as -1")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or an int >= 1, got {chunk_size!r}")


def _zero_loss(features: torch.Tensor) -> torch.Tensor:
    """0.0 with a (zero) gradient path to ``features`` so a DDP step never breaks."""
    return upcast(features.sum()) * 0.0


def _pixels(f: torch.Tensor) -> torch.Tensor:
    """(B, 2, C, H, W) -> (N, C) with N = B*2*H*W in (b, v, h, w) order."""
    return f.permute(0, 1, 3, 4, 2).reshape(-1, f.shape[2])


def _blocks(f: torch.Tensor, y: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Crop to whole b x b blocks and order pixels block-major.

    Returns (N', C) features, (N',) labels and the number of blocks; block s owns
    the contiguous rows ``s*n_b:(s+1)*n_b`` with ``n_b = B*2*b*b``.
    """
    bsz, _, c, h, w = f.shape
    nh, nw = h // b, w // b
    f = f[..., : nh * b, : nw * b].reshape(bsz, 2, c, nh, b, nw, b)
    y = y[..., : nh * b, : nw * b].reshape(bsz, 2, nh, b, nw, b)
    f = f.permute(3, 5, 0, 1, 4, 6, 2).reshape(-1, c)  # (nh, nw, B, 2, b, b, C)
    y = y.permute(2, 4, 0, 1, 3, 5).reshape(-1)
    return f, y, nh * nw


def _supervised_core(
    feats: torch.Tensor,
    labels: torch.Tensor,
    n_seg: int,
    temperature: float,
    ignore_index: int,
    chunk_size: int | None,
) -> torch.Tensor | None:
    """Loss 2b on pixels ordered by segment (``n_seg`` equal contiguous segments).

    Args:
        feats: L2-normalised float32 (or float64) embeddings. Shape: (N, C).
        labels: Shape: (N,), int64.

    Returns:
        Mean over segments with anchors of the per-segment mean anchor loss, or
        None when no pixel is an anchor.
    """
    n = labels.shape[0]
    seg = torch.arange(n_seg, device=labels.device).repeat_interleave(n // n_seg)
    valid = labels != ignore_index
    if not bool(valid.all()):  # ignored pixels are in no denominator and no positive set
        feats, labels, seg = feats[valid], labels[valid], seg[valid]
    if labels.numel() == 0:
        return None
    classes, cls = torch.unique(labels, return_inverse=True)
    group = seg * classes.numel() + cls  # (segment, class) of every key
    count = torch.bincount(group, minlength=n_seg * classes.numel())
    anchor_mask = (labels != 0) & (count[group] > 1)  # foreground with |P(n)| > 0
    anchors = anchor_mask.nonzero().squeeze(1)
    if anchors.numel() == 0:
        return None
    all_anchors = anchors.numel() == labels.numel()
    fa = feats if all_anchors else feats[anchors]
    ga = group if all_anchors else group[anchors]
    # sum over positives of f_n . f_p = f_n . (S_class - f_n)
    class_sum = feats.new_zeros(n_seg * classes.numel(), feats.shape[1]).index_add(0, group, feats)
    pos = (fa * (class_sum[ga] - fa)).sum(1) / (count[ga] - 1)
    key_ptr = [0] + torch.bincount(seg, minlength=n_seg).cumsum(0).tolist()
    per_seg = torch.bincount(seg[anchors], minlength=n_seg)
    anchor_ptr = [0] + per_seg.cumsum(0).tolist()
    lse = segment_logsumexp(fa, feats, anchors, 1.0 / temperature, key_ptr, anchor_ptr, chunk_size)
    per_anchor = lse - pos / temperature
    active = per_seg > 0
    weight = 1.0 / (per_seg[seg[anchors]].to(per_anchor.dtype) * active.sum())  # unweighted mean of segment means
    return (per_anchor * weight).sum()


def has_anchor(labels: torch.Tensor, mode: str = "exact", stride: int = 4, block_size: int = 32,
               ignore_index: int = -1) -> bool:
    """Whether :func:`supervised_local_contrastive` with these settings finds any anchor in ``labels``.

    An anchor is a pixel the loss samples (every ``stride``-th in mode ``stride``, those in
    whole ``block_size`` blocks in mode ``block``, all in ``exact``) whose label is neither 0
    nor ``ignore_index``; its copy in the other view is always a positive.

    Args:
        labels: Shape (B, H, W) or (B, 2, H, W), integer.
    """
    y = labels
    if mode == "stride":
        y = y[..., ::stride, ::stride]
    elif mode == "block":
        h, w = y.shape[-2:]
        y = y[..., : h // block_size * block_size, : w // block_size * block_size]
    return bool(((y != 0) & (y != ignore_index)).any())


def supervised_local_contrastive(
    features: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 0.1,
    mode: str = "exact",
    stride: int = 4,
    block_size: int = 32,
    ignore_index: int = -1,
    *,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Supervised local contrastive loss of Hu et al. (methods 2b).

    For pixel n with label y_n: positives P(n) are the other pixels with the same
    label (any image, either view), the denominator A(n) all other non-ignored
    pixels, and ``l_n = -(1/|P(n)|) sum_p [s(f_n,f_p)/tau - log sum_{a in A(n)}
    exp(s(f_n,f_a)/tau)]``. The loss is the mean of l_n over anchors: pixels
    with a label other than 0 (background) and ``ignore_index`` that have at
    least one positive. Background pixels are negatives only; ignored pixels
    take part in nothing.

    Args:
        features: Pixel embeddings of two views (L2-normalised here, along C).
            Shape: (B, 2, C, H, W).
        labels: Integer labels shared by both views, shape (B, H, W), or per
            view, shape (B, 2, H, W). 0 = background.
        temperature: tau > 0.
        mode: "exact" (all N = B*2*H*W pixels, chunked, O(N * chunk) memory),
            "stride" (exact loss on ``f[..., ::stride, ::stride]`` and the labels
            at the same positions) or "block" (H x W cut into non-overlapping
            ``block_size`` squares, borders beyond a multiple of ``block_size``
            dropped; the loss within each block over all images and both views;
            blocks without an anchor skipped; unweighted mean over blocks).
        stride: Subsampling step of mode "stride", >= 1 (1 equals "exact").
        block_size: Block side of mode "block", 1 <= block_size <= min(H, W).
        ignore_index: Label of unlabelled pixels (must not be 0).
        chunk_size: Anchor rows per chunk (None: chunks of about 8 MiB of similarities, 128 MiB on GPU).

    Returns:
        Scalar float32 loss (float64 for float64 input). Without any anchor it is 0 with a zero gradient
        path to ``features`` (so a DDP step still runs).

    Raises:
        TypeError: for non-tensor inputs, non-float features or non-integer labels.
        ValueError: for bad shapes or settings (the message names the argument).

    Example:
        >>> f = torch.randn(4, 2, 128, 64, 64)
        >>> y = torch.randint(0, 3, (4, 64, 64))
        >>> loss = supervised_local_contrastive(f, y, temperature=0.1, mode="exact")
    """
    temperature = check_temperature(temperature)
    _check_settings(mode, stride, block_size, ignore_index, chunk_size)
    _, _, h, w = _check_features(features)
    y = _check_labels(labels, features)
    if mode == "block" and block_size > min(h, w):
        raise ValueError(f"block_size={block_size} exceeds the feature map H x W = {h} x {w}")
    with float32_math(features.device):
        f = F.normalize(upcast(features), dim=2)
        if mode == "stride":
            f, y = f[..., ::stride, ::stride], y[..., ::stride, ::stride]
        if mode == "block":
            flat, flat_y, n_seg = _blocks(f, y, block_size)
        else:
            flat, flat_y, n_seg = _pixels(f), y.reshape(-1), 1
        loss = _supervised_core(flat, flat_y, n_seg, temperature, ignore_index, chunk_size)
    return _zero_loss(features) if loss is None else loss


def _dense_exact(features: torch.Tensor, temperature: float, chunk_size: int | None) -> torch.Tensor:
    """Loss 2a over every pixel of ``features`` (B, 2, C, H, W)."""
    with float32_math(features.device):
        f = F.normalize(upcast(features), dim=2)
        pos = (f[:, 0] * f[:, 1]).sum(1)  # (B, H, W): s(view 0, view 1) per pixel
        flat = _pixels(f)
        idx = torch.arange(flat.shape[0], device=flat.device)
        lse = segment_logsumexp(flat, flat, idx, 1.0 / temperature, chunk_size=chunk_size)
        return lse.mean() - pos.mean() / temperature


def dense_local_contrastive(
    features: torch.Tensor,
    temperature: float = 0.1,
    *,
    mode: str = "exact",
    stride: int = 4,
    block_size: int = 32,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Self-supervised dense local contrastive loss (methods 2a).

    The positive of pixel (b, v, i, j) is (b, 1-v, i, j); every other pixel of
    both views and all images is a negative; mean over all N = B*2*H*W anchors:
    ``l_n = -s(f_n, f_pos)/tau + log sum_{m != n} exp(s(f_n, f_m)/tau)``.
    ``mode``, ``stride`` and ``block_size`` make it affordable exactly as in
    :func:`supervised_local_contrastive` (every block has anchors here, so the
    block mode is the plain mean of the block losses).

    Args:
        features: Pixel embeddings of two pixel-aligned views (L2-normalised here,
            along C). Shape: (B, 2, C, H, W).
        temperature: tau > 0.
        mode: "exact" (all pixels), "stride" (the loss on ``f[..., ::stride, ::stride]``)
            or "block" (the loss within each non-overlapping ``block_size`` square,
            borders beyond a multiple of ``block_size`` dropped; mean over blocks).
        stride: Subsampling step of mode "stride", >= 1 (1 equals "exact").
        block_size: Block side of mode "block", 1 <= block_size <= min(H, W).
        chunk_size: Anchor rows per chunk (None: chunks of about 8 MiB of similarities, 128 MiB on GPU).

    Returns:
        Scalar float32 loss (float64 for float64 input).

    Raises:
        TypeError: for a non-tensor or non-float ``features``.
        ValueError: for a bad shape or setting (the message names the argument).

    Example:
        >>> f = torch.randn(4, 2, 128, 64, 64)
        >>> loss = dense_local_contrastive(f, temperature=0.1, mode="block", block_size=32)
    """
    temperature = check_temperature(temperature)
    _check_settings(mode, stride, block_size, -1, chunk_size)
    _, _, h, w = _check_features(features)
    if mode == "stride":
        return _dense_exact(features[..., ::stride, ::stride], temperature, chunk_size)
    if mode == "block":
        b = block_size
        if b > min(h, w):
            raise ValueError(f"block_size={b} exceeds the feature map H x W = {h} x {w}")
        blocks = [features[..., i:i + b, j:j + b] for i in range(0, h // b * b, b) for j in range(0, w // b * b, b)]
        return torch.stack([_dense_exact(block, temperature, chunk_size) for block in blocks]).mean()
    return _dense_exact(features, temperature, chunk_size)


class SupervisedLocalContrastiveLoss(nn.Module):
    """Module form of :func:`supervised_local_contrastive` holding its settings.

    Args:
        temperature: tau > 0.
        mode: "exact", "stride" or "block".
        stride: Subsampling step of mode "stride", >= 1.
        block_size: Block side of mode "block", >= 1.
        ignore_index: Label of unlabelled pixels (not 0).
        chunk_size: Anchor rows per chunk, None for automatic.

    Raises:
        TypeError / ValueError: for an invalid setting, naming it.

    Example:
        >>> loss_fn = SupervisedLocalContrastiveLoss(temperature=0.1, mode="block", block_size=16)
        >>> loss = loss_fn(features, labels)  # (B, 2, C, H, W), (B, H, W)
    """

    def __init__(
        self,
        temperature: float = 0.1,
        mode: str = "exact",
        stride: int = 4,
        block_size: int = 32,
        ignore_index: int = -1,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        self.temperature = check_temperature(temperature)
        _check_settings(mode, stride, block_size, ignore_index, chunk_size)
        self.mode, self.stride, self.block_size = mode, stride, block_size
        self.ignore_index, self.chunk_size = ignore_index, chunk_size

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Features (B, 2, C, H, W), labels (B, H, W) or (B, 2, H, W) -> scalar loss."""
        return supervised_local_contrastive(
            features, labels, self.temperature, self.mode, self.stride, self.block_size,
            self.ignore_index, chunk_size=self.chunk_size,
        )

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, mode={self.mode!r}, stride={self.stride}, "
                f"block_size={self.block_size}, ignore_index={self.ignore_index}")


class DenseLocalContrastiveLoss(nn.Module):
    """Module form of :func:`dense_local_contrastive`.

    Args:
        temperature: tau > 0.
        mode: "exact", "stride" or "block".
        stride: Subsampling step of mode "stride", >= 1.
        block_size: Block side of mode "block", >= 1.
        chunk_size: Anchor rows per chunk, None for automatic.

    Raises:
        TypeError / ValueError: for an invalid setting, naming it.
    """

    def __init__(self, temperature: float = 0.1, mode: str = "exact", stride: int = 4, block_size: int = 32,
                 chunk_size: int | None = None) -> None:
        super().__init__()
        self.temperature = check_temperature(temperature)
        _check_settings(mode, stride, block_size, -1, chunk_size)
        self.mode, self.stride, self.block_size, self.chunk_size = mode, stride, block_size, chunk_size

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Features (B, 2, C, H, W) -> scalar loss."""
        return dense_local_contrastive(features, self.temperature, mode=self.mode, stride=self.stride,
                                       block_size=self.block_size, chunk_size=self.chunk_size)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, mode={self.mode!r}, stride={self.stride}, block_size={self.block_size}"
