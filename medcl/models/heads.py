"""Projection heads for contrastive pretraining (methods.md sections 1a and 3).

* :class:`ProjectionHead` — Linear → ReLU → Linear on feature vectors (SimCLR).
* :class:`GlobalHead` — average pool of a feature map to a small ``grid × grid``
  map, flattened, then a :class:`ProjectionHead` (the U-Net's image-level head).
* :class:`LocalHead` — 1×1 conv → ReLU → 1×1 conv, L2-normalised per pixel
  (the U-Net's pixel-level head).
* :func:`init_to_prior_` — start a classifier layer at a class prior (the U-Net's
  segmentation head before fine-tuning).

The heads are dropped at every stage hand-over; only encoders/decoders carry on.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ProjectionHead", "GlobalHead", "LocalHead", "init_to_prior_"]


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
    """Image-level head: average pool to ``grid × grid`` → flatten → Linear → ReLU → Linear.

    ``grid=1`` is the global average pool of methods §3. The U-Net uses ``grid=4``
    (see :class:`medcl.models.UNet`): its bottleneck ends in InstanceNorm → ReLU,
    which fixes every channel's spatial mean whatever the image, so a global
    average pool hands the MLP nearly the same vector for every image (mean
    pairwise cosine 0.996 over real hippocampus slices at init). Keeping a coarse
    spatial layout keeps the image-level signal (0.56), as the reference code of
    Chaitanya et al. does by flattening its bottleneck. On a bottleneck of exactly
    ``grid × grid`` the pool is the identity; a smaller one is repeated
    (``AdaptiveAvgPool2d``), a larger one averaged in near-equal bins.

    Args:
        in_channels: channels C of the pooled feature map (the U-Net bottleneck width).
        hidden_dim: hidden layer width.
        out_dim: embedding size D. Default 128.
        grid: side of the pooled map; the MLP sees ``C * grid**2`` features. Default 1.

    Shape:
        input ``(B, C, h, w)`` → output ``(B, D)``, not normalised.
    """

    def __init__(self, in_channels: int, hidden_dim: int, out_dim: int = 128, grid: int = 1) -> None:
        super().__init__()
        in_channels = _check_dim("in_channels", in_channels)
        self.grid = _check_dim("grid", grid)
        self.pool = nn.AdaptiveAvgPool2d(self.grid)
        self.mlp = ProjectionHead(in_channels * self.grid**2, hidden_dim, out_dim)

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """The MLP's input: ``(B, C, h, w)`` → ``(B, C * grid**2)`` (channel-major, then row, column)."""
        return torch.flatten(self.pool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.pooled(x))


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


@torch.no_grad()
def init_to_prior_(layer: nn.Conv2d | nn.Linear, class_frequencies, weight_std: float | None = None,
                   generator: torch.Generator | None = None) -> None:
    """Start a K-output classifier layer at a class prior: bias ``log p_k`` (weights kept, or ``N(0, weight_std²)``).

    The bias shifts every output's softmax towards ``p``; with near-zero weights it is
    ~``p`` whatever the input. Near-zero weights also starve everything below the layer of
    gradient (``dL/dfeatures = Wᵀ dL/dlogits``): on the hippocampus U-Net (5 % labels, 600
    steps) weights of std 1e-3 ended at test Dice 0.28 where the bias alone reached 0.79,
    so the default keeps the layer's weights.

    Args:
        layer: a layer with ``weight`` and a ``bias`` of K outputs (1×1 conv or linear).
        class_frequencies: ``(K,)`` non-negative class frequencies or counts, normalised here.
            A class with frequency 0 gets a floor of ``1e-6`` (a finite bias).
        weight_std: standard deviation of new weights; None (default) keeps the current ones.
        generator: draws the new weights (None: the global torch RNG).

    Raises:
        ValueError: not K values, a negative or non-finite value, all zero, ``weight_std < 0``,
            or a layer without bias.
    """
    if getattr(layer, "bias", None) is None:
        raise ValueError(f"layer {layer} has no bias to hold the prior")
    k = layer.bias.numel()
    freq = torch.as_tensor(class_frequencies, dtype=torch.float64).flatten().cpu()
    if freq.numel() != k:
        raise ValueError(f"class_frequencies has {freq.numel()} values, expected {k} (the layer's outputs)")
    if not torch.isfinite(freq).all() or (freq < 0).any() or freq.sum() <= 0:
        raise ValueError(f"class_frequencies must be finite, >= 0 and not all 0, got {freq.tolist()}")
    if weight_std is not None and weight_std < 0:
        raise ValueError(f"weight_std must be >= 0 or None, got {weight_std!r}")
    prior = (freq / freq.sum()).clamp(min=1e-6)
    if weight_std is not None:
        noise = torch.randn(layer.weight.shape, generator=generator, dtype=torch.float64,
                            device=generator.device if generator is not None else "cpu")
        layer.weight.copy_((weight_std * noise).to(layer.weight))
    layer.bias.copy_(torch.log(prior / prior.sum()).to(layer.bias))
