"""Supervised segmentation loss for fine-tuning: cross-entropy + soft Dice.

Conventions (documented once here):

* ``target`` holds class indices in ``[0, K)``; pixels equal to ``ignore_index``
  are excluded from both terms (no cross-entropy, no Dice numerator or
  denominator).
* Cross-entropy is the mean over non-ignored pixels.
* Soft Dice is the *batch* Dice: for each class c the sums run over all
  non-ignored pixels of all images,
  ``dice_c = (2 sum p_c t_c + smooth) / (sum p_c + sum t_c + smooth)``
  with ``p = softmax(logits)`` and ``t`` the one-hot target; the loss is
  ``1 - mean_c dice_c`` over the **foreground classes 1..K-1** by default
  (``include_background=True`` averages over all K). A class absent from the
  target and not predicted scores 1; predicting an absent class is penalised.
* Computation is in float32 (bf16/fp16 logits are upcast; float64 stays float64).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["soft_dice_loss", "segmentation_loss", "SegmentationLoss"]


def _upcast(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def _check_nonneg(name: str, value: float, strict: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__} {value!r}")
    if not math.isfinite(value) or value < 0 or (strict and value == 0):
        raise ValueError(f"{name} must be a finite float {'>' if strict else '>='} 0, got {value!r}")
    return float(value)


def _check_ignore_index(ignore_index: int) -> int:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if ignore_index >= 0:
        raise ValueError(f"ignore_index must be negative (class indices are 0..K-1), got {ignore_index}")
    return ignore_index


def _check_inputs(logits: torch.Tensor, target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Validate shapes/dtypes/values; return the mask of non-ignored pixels (B, H, W)."""
    if not isinstance(logits, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise TypeError(f"logits and target must be tensors, got {type(logits).__name__} and {type(target).__name__}")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be a floating-point tensor, got dtype {logits.dtype}")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(f"target must be an integer tensor of class indices, got dtype {target.dtype}")
    if logits.dim() != 4 or target.shape != (logits.shape[0],) + tuple(logits.shape[2:]):
        raise ValueError(
            f"logits must be (B, K, H, W) and target (B, H, W); got logits {tuple(logits.shape)} "
            f"and target {tuple(target.shape)}"
        )
    valid = target != ignore_index
    k = logits.shape[1]
    bad = valid & ((target < 0) | (target >= k))
    if bool(bad.any()):
        raise ValueError(
            f"target values must be in [0, {k}) or ignore_index={ignore_index}; found {int(target[bad][0])}"
        )
    return valid


def _dice(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, include_background: bool,
          smooth: float) -> torch.Tensor:
    k = logits.shape[1]
    probs = torch.softmax(_upcast(logits), dim=1) * valid.unsqueeze(1)  # (B, K, H, W)
    onehot = F.one_hot(target.long().clamp(min=0), k).permute(0, 3, 1, 2) * valid.unsqueeze(1)
    dims = (0, 2, 3)
    inter = (probs * onehot).sum(dims)  # (K,)
    denom = probs.sum(dims) + onehot.sum(dims)
    dice = (2.0 * inter + smooth) / (denom + smooth)
    return 1.0 - (dice if include_background else dice[1:]).mean()


def soft_dice_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int = -1,
    *,
    include_background: bool = False,
    smooth: float = 1e-5,
) -> torch.Tensor:
    """Soft (batch) Dice loss ``1 - mean_c dice_c`` (see module doc for the formula).

    Args:
        logits: Raw class scores. Shape: (B, K, H, W); K >= 2 unless include_background.
        target: Class indices or ``ignore_index``. Shape: (B, H, W).
        ignore_index: Negative label of pixels excluded from the loss.
        include_background: Average over all K classes instead of 1..K-1.
        smooth: Additive smoothing of numerator and denominator, > 0.

    Returns:
        Scalar float32 loss in [0, 1].

    Raises:
        TypeError: for non-tensor inputs or wrong dtypes.
        ValueError: for mismatched shapes, out-of-range target values or bad settings.
    """
    ignore_index = _check_ignore_index(ignore_index)
    smooth = _check_nonneg("smooth", smooth, strict=True)
    valid = _check_inputs(logits, target, ignore_index)
    if not include_background and logits.shape[1] < 2:
        raise ValueError(f"foreground Dice needs K >= 2 classes, got logits {tuple(logits.shape)}; "
                         "set include_background=True")
    with torch.autocast(device_type=logits.device.type, enabled=False):
        return _dice(logits, target, valid, include_background, smooth)


def segmentation_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int = -1,
    dice_weight: float = 1.0,
    *,
    include_background: bool = False,
    smooth: float = 1e-5,
) -> torch.Tensor:
    """Cross-entropy + ``dice_weight`` x soft Dice, the fine-tuning loss (methods 4).

    Args:
        logits: Raw class scores. Shape: (B, K, H, W).
        target: Class indices or ``ignore_index``. Shape: (B, H, W).
        ignore_index: Negative label of pixels excluded from both terms.
        dice_weight: Weight of the Dice term, >= 0 (0 gives plain cross-entropy).
        include_background: Dice over all K classes instead of 1..K-1.
        smooth: Dice smoothing, > 0.

    Returns:
        Scalar float32 loss. 0 with a zero gradient path when every pixel is ignored.

    Raises:
        TypeError: for non-tensor inputs or wrong dtypes.
        ValueError: for mismatched shapes, out-of-range target values or bad settings.

    Example:
        >>> loss = segmentation_loss(torch.randn(2, 3, 64, 64), torch.randint(0, 3, (2, 64, 64)))
    """
    ignore_index = _check_ignore_index(ignore_index)
    dice_weight = _check_nonneg("dice_weight", dice_weight, strict=False)
    smooth = _check_nonneg("smooth", smooth, strict=True)
    valid = _check_inputs(logits, target, ignore_index)
    if dice_weight > 0 and not include_background and logits.shape[1] < 2:
        raise ValueError(f"foreground Dice needs K >= 2 classes, got logits {tuple(logits.shape)}")
    n_valid = int(valid.sum())
    if n_valid == 0:
        return _upcast(logits.sum()) * 0.0
    with torch.autocast(device_type=logits.device.type, enabled=False):
        ce = F.cross_entropy(_upcast(logits), target.long(), ignore_index=ignore_index, reduction="sum") / n_valid
        if dice_weight == 0:
            return ce
        return ce + dice_weight * _dice(logits, target, valid, include_background, smooth)


class SegmentationLoss(nn.Module):
    """Module form of :func:`segmentation_loss` holding its settings.

    Args:
        ignore_index: Negative label of pixels excluded from the loss.
        dice_weight: Weight of the Dice term, >= 0.
        include_background: Dice over all classes instead of the foreground ones.
        smooth: Dice smoothing, > 0.

    Raises:
        TypeError / ValueError: for an invalid setting, naming it.

    Example:
        >>> loss_fn = SegmentationLoss(dice_weight=1.0)
        >>> loss = loss_fn(logits, target)  # (B, K, H, W), (B, H, W)
    """

    def __init__(self, ignore_index: int = -1, dice_weight: float = 1.0, include_background: bool = False,
                 smooth: float = 1e-5) -> None:
        super().__init__()
        self.ignore_index = _check_ignore_index(ignore_index)
        self.dice_weight = _check_nonneg("dice_weight", dice_weight, strict=False)
        self.smooth = _check_nonneg("smooth", smooth, strict=True)
        self.include_background = bool(include_background)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """(B, K, H, W) logits, (B, H, W) target -> scalar loss."""
        return segmentation_loss(logits, target, self.ignore_index, self.dice_weight,
                                 include_background=self.include_background, smooth=self.smooth)

    def extra_repr(self) -> str:
        return (f"ignore_index={self.ignore_index}, dice_weight={self.dice_weight}, "
                f"include_background={self.include_background}")
