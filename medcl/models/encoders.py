"""torchvision ResNet encoders and a linear classifier for image-level tasks (methods.md section 3).

He et al., "Deep Residual Learning", CVPR 2016; used as in SimCLR / MICLe
(Chen et al. 2020, Azizi et al. 2021). Networks are built with ``weights=None``:
nothing is downloaded. Start from existing weights by passing a file
(``weights_path``) or calling :meth:`ResNetEncoder.load_weights`.
"""
from __future__ import annotations

import logging
import os
from typing import Callable

import torch
from torch import nn
from torchvision import models as tv_models

from medcl.models.weights import (
    LoadReport,
    WeightSource,
    copy_matching_weights,
    read_state_dict,
    strip_key_prefixes,
    sum_input_channels,
)

__all__ = ["ARCHS", "ResNetEncoder", "ResNetClassifier"]

logger = logging.getLogger(__name__)

ARCHS: dict[str, Callable[..., tv_models.ResNet]] = {
    "resnet18": tv_models.resnet18,
    "resnet34": tv_models.resnet34,
    "resnet50": tv_models.resnet50,
    "resnet101": tv_models.resnet101,
    "wide_resnet50_2": tv_models.wide_resnet50_2,
}
#: Prefixes removed (repeatedly) from source keys before matching torchvision names.
SOURCE_PREFIXES = ("module.", "_orig_mod.", "encoder.", "backbone.")


class ResNetEncoder(nn.Module):
    """torchvision ResNet without its ``fc`` layer: images → pooled feature vectors.

    The backbone keeps torchvision's module names under ``backbone.`` (``backbone.conv1``,
    ``backbone.layer1.0.conv1``, …), so torchvision-format weights load directly.

    Args:
        arch: one of :data:`ARCHS` (``"resnet18"``: F=512, ``"resnet50"``: F=2048, ...).
        in_channels: 1 (grey) or 3 (RGB). For 1 the first conv is replaced by a
            1-input-channel conv of the same geometry.
        small_input: replace the 7×7/2 first conv + max-pool by a 3×3/1 conv and
            no max-pool (CIFAR style), for 28×28–64×64 images that the ImageNet stem
            would shrink 4× before the first block. Default False.
        weights_path: optional torchvision-format weights file to start from
            (``.pth``/``.pt`` via ``torch.load(weights_only=True)``, or ``.safetensors``
            when the optional ``safetensors`` package is installed); see :meth:`load_weights`.
            The resulting report is kept in ``self.load_report``.

    Shape:
        input ``(B, C, H, W)`` → output ``(B, F)`` with ``F = self.feature_dim``.

    Raises:
        ValueError: unknown ``arch`` or ``in_channels`` not 1 or 3, plus the errors of
            :meth:`load_weights` when ``weights_path`` is given.

    Example:
        >>> enc = ResNetEncoder("resnet18", in_channels=1, small_input=True).eval()
        >>> enc(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 512])
    """

    def __init__(
        self,
        arch: str = "resnet18",
        in_channels: int = 3,
        small_input: bool = False,
        weights_path: str | os.PathLike | None = None,
    ) -> None:
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"arch must be one of {sorted(ARCHS)}, got {arch!r}")
        if isinstance(in_channels, bool) or in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 or 3, got {in_channels!r}")
        self.arch = arch
        self.in_channels = in_channels
        self.small_input = bool(small_input)

        backbone = ARCHS[arch](weights=None)
        if self.small_input:
            backbone.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
            backbone.maxpool = nn.Identity()
        elif in_channels != 3:
            backbone.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        # Same init torchvision gives its convs.
        nn.init.kaiming_normal_(backbone.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.feature_dim: int = backbone.fc.in_features
        backbone.fc = nn.Identity()
        self.backbone = backbone
        self.load_report: LoadReport | None = None
        if weights_path is not None:
            self.load_report = self.load_weights(weights_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Encode images.

        Args:
            x: shape ``(B, C, H, W)`` with C = ``in_channels``.

        Returns:
            Features after global average pooling, shape ``(B, F)``.

        Raises:
            ValueError: wrong rank or channel count.
        """
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must have shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        return self.backbone(x)

    def load_weights(self, source: WeightSource, strict: bool = True) -> LoadReport:
        """Load torchvision-format ResNet weights into the backbone.

        Source keys may carry the prefixes ``module.``, ``_orig_mod.``, ``encoder.``,
        ``backbone.`` (in any combination; they are removed), so files saved from a
        :class:`ResNetEncoder`, a :class:`ResNetClassifier` or a DDP-wrapped model load
        too. ``fc.*`` is ignored; other keys the backbone lacks (e.g. a projection
        head) are reported as ``unexpected`` and not loaded.

        A 3-channel ``conv1.weight`` loaded into a 1-channel encoder is summed over
        its input channels (``w.sum(dim=1, keepdim=True)``), so a grey image responds
        as its 3-channel grey copy did to the original weights.

        Args:
            source: a state_dict or a path to a ``.pth``/``.pt``/``.safetensors`` file.
            strict: raise if a backbone key is missing from the source (the encoder is
                then left unchanged).

        Returns:
            A :class:`~medcl.models.weights.LoadReport`, keys named as in torchvision
            (``conv1.weight``, ``layer1.0.bn1.running_mean``, ...).

        Raises:
            FileNotFoundError: the file does not exist.
            ValueError: a shape mismatch (key and both shapes named; e.g. a 7×7 ``conv1``
                into a ``small_input`` encoder), nothing matched, or ``strict`` with missing keys.
        """
        state_dict = strip_key_prefixes(read_state_dict(source), SOURCE_PREFIXES)
        report = copy_matching_weights(
            self.backbone,
            state_dict,
            scope=None,
            strict=strict,
            ignore_unexpected=True,
            ignore=("fc.",),
            adapt={"conv1.weight": lambda src, tgt: sum_input_channels(src, tgt.shape[1])},
        )
        if report.unexpected:
            logger.warning("ignored %d source keys the backbone lacks, e.g. %s", len(report.unexpected), list(report.unexpected[:5]))
        return report


class ResNetClassifier(nn.Module):
    """A linear classifier on :class:`ResNetEncoder` features (fine-tuning / linear probe).

    Args:
        encoder: the feature extractor (its ``feature_dim`` sets the classifier input).
        num_classes: output logits K (>= 1).
        multilabel: K independent binary labels (sigmoid / BCE) instead of one of K
            classes (softmax / cross-entropy). Only changes :meth:`predict_proba`.

    Shape:
        input ``(B, C, H, W)`` → raw logits ``(B, K)``.

    Raises:
        TypeError: ``encoder`` is not a :class:`ResNetEncoder`.
        ValueError: ``num_classes < 1``.
    """

    def __init__(self, encoder: ResNetEncoder, num_classes: int, multilabel: bool = False) -> None:
        super().__init__()
        if not isinstance(encoder, ResNetEncoder):
            raise TypeError(f"encoder must be a ResNetEncoder, got {type(encoder).__name__}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
        self.encoder = encoder
        self.classifier = nn.Linear(encoder.feature_dim, num_classes)
        self.num_classes = num_classes
        self.multilabel = bool(multilabel)
        self._encoder_frozen = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Raw logits, shape ``(B, K)``."""
        return self.classifier(self.encoder(x))

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """Probabilities ``(B, K)``: sigmoid if ``multilabel`` or ``K == 1``, else softmax over K."""
        logits = self(x)
        if self.multilabel or self.num_classes == 1:
            return torch.sigmoid(logits)
        return torch.softmax(logits, dim=1)

    @property
    def encoder_frozen(self) -> bool:
        """Whether :meth:`freeze_encoder` is in effect."""
        return self._encoder_frozen

    def freeze_encoder(self) -> ResNetClassifier:
        """Linear probe: stop gradients into the encoder and keep it in eval mode.

        The encoder stays in eval mode (BatchNorm statistics frozen) even after
        ``model.train()``. Only ``classifier`` parameters keep ``requires_grad``.
        """
        for p in self.encoder.parameters():
            p.requires_grad_(False)
        self._encoder_frozen = True
        self.encoder.eval()
        return self

    def unfreeze_encoder(self) -> ResNetClassifier:
        """Undo :meth:`freeze_encoder` (full fine-tuning)."""
        for p in self.encoder.parameters():
            p.requires_grad_(True)
        self._encoder_frozen = False
        self.encoder.train(self.training)
        return self

    def train(self, mode: bool = True) -> ResNetClassifier:
        super().train(mode)
        if self._encoder_frozen:
            self.encoder.eval()
        return self
