"""Projection heads for contrastive pretraining (methods.md sections 1a and 3).

* :class:`ProjectionHead` — Linear → ReLU → Linear on feature vectors (SimCLR).
* :class:`GlobalHead` — global average pool of a feature map, then a
  :class:`ProjectionHead` (the U-Net's image-level head).
* :class:`LocalHead` — 1×1 conv → ReLU → 1×1 conv, L2-normalised per pixel
  (the U-Net's pixel-level head).

The heads are dropped at every stage hand-over; only encoders/decoders carry on.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ProjectionHead", "GlobalHead", "LocalHead"]


def _check_dim(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


class ProjectionHead(nn.Sequential):
    """Two-layer MLP projection head: Linear → ReLU → Linear (SimCLR, Chen et al. 2020).

    Args:
        in_dim: input feature size F (e.g. 512 for ResNet-18, 2048 for ResNet-50).
        hidden_dim: hidden layer width.
        out_dim: embedding size D. Default 128.

    Shape:
        input ``(B, F)`` → output ``(B, D)``, not normalised (the contrastive loss
        normalises).

    Raises:
        TypeError / ValueError: a dimension is not a positive int.

    Example:
        >>> head = ProjectionHead(512, 512, 128)
        >>> head(torch.zeros(4, 512)).shape
        torch.Size([4, 128])
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int = 128) -> None:
        in_dim = _check_dim("in_dim", in_dim)
        hidden_dim = _check_dim("hidden_dim", hidden_dim)
        out_dim = _check_dim("out_dim", out_dim)
        super().__init__(
            OrderedDict(
                fc1=nn.Linear(in_dim, hidden_dim),
                relu=nn.ReLU(inplace=True),
                fc2=nn.Linear(hidden_dim, out_dim),
            )
        )
        self.in_dim = in_dim
        self.out_dim = out_dim


class GlobalHead(nn.Module):
    """Image-level head: global average pool → Linear → ReLU → Linear.

    Args:
        in_channels: channels C of the pooled feature map (the U-Net bottleneck width).
        hidden_dim: hidden layer width.
        out_dim: embedding size D. Default 128.

    Shape:
        input ``(B, C, h, w)`` → output ``(B, D)``, not normalised.
    """

    def __init__(self, in_channels: int, hidden_dim: int, out_dim: int = 128) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.mlp = ProjectionHead(in_channels, hidden_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(torch.flatten(self.pool(x), 1))


class LocalHead(nn.Module):
    """Pixel-level head: 1×1 conv → ReLU → 1×1 conv, then L2 normalisation over channels.

    Args:
        in_channels: channels C of the decoder feature map.
        hidden_dim: hidden channels.
        out_dim: embedding size D. Default 128.

    Shape:
        input ``(B, C, H, W)`` → output ``(B, D, H, W)`` with unit L2 norm along D
        at every pixel.
    """

    def __init__(self, in_channels: int, hidden_dim: int, out_dim: int = 128) -> None:
        super().__init__()
        in_channels = _check_dim("in_channels", in_channels)
        hidden_dim = _check_dim("hidden_dim", hidden_dim)
        out_dim = _check_dim("out_dim", out_dim)
        self.conv1 = nn.Conv2d(in_channels, hidden_dim, kernel_size=1)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(hidden_dim, out_dim, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.conv2(self.relu(self.conv1(x))), p=2.0, dim=1)
