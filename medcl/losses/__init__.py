"""Contrastive and segmentation losses (pure torch).

Functional forms (like ``torch.nn.functional``) plus ``nn.Module`` wrappers that
hold and validate the settings.

Image level (methods 1): :func:`nt_xent`, :func:`multi_positive_nt_xent`.
Pixel level (methods 2): :func:`dense_local_contrastive`,
:func:`supervised_local_contrastive` (modes "exact", "stride", "block").
Fine-tuning: :func:`segmentation_loss` (cross-entropy + soft Dice), :func:`soft_dice_loss`.
"""
from __future__ import annotations

from medcl.losses.local_contrastive import (
    DenseLocalContrastiveLoss,
    SupervisedLocalContrastiveLoss,
    dense_local_contrastive,
    has_anchor,
    supervised_local_contrastive,
)
from medcl.losses.ntxent import MultiPositiveNTXentLoss, NTXentLoss, multi_positive_nt_xent, nt_xent
from medcl.losses.segmentation import SegmentationLoss, segmentation_loss, soft_dice_loss

__all__ = [
    "nt_xent",
    "multi_positive_nt_xent",
    "dense_local_contrastive",
    "has_anchor",
    "supervised_local_contrastive",
    "segmentation_loss",
    "soft_dice_loss",
    "NTXentLoss",
    "MultiPositiveNTXentLoss",
    "DenseLocalContrastiveLoss",
    "SupervisedLocalContrastiveLoss",
    "SegmentationLoss",
]
