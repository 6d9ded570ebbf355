"""The trainable part of a network for one stage.

DDP requires every registered parameter to take part in the loss, so each
stage trains a view of the U-Net holding only the parts its loss uses
(global pretraining: encoder + global head; local pretraining: encoder,
decoder, local head; fine-tuning: encoder, decoder, segmentation head). Their
state_dict keys are the U-Net's own (``encoder.*``, ``decoder.*``, heads), so a
checkpoint of any stage hands over to the next with
``UNet.load_stage_weights``.
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from medcl.models import ProjectionHead, ResNetEncoder, UNet

__all__ = ["UNetPart", "ContrastiveResNet", "build_unet"]

UNetOutput = Literal["global", "local", "logits"]


def build_unet(spec, in_channels: int, num_classes: int) -> UNet:
    """A U-Net from a :class:`medcl.config.UNetSpec`."""
    return UNet(in_channels=in_channels, num_classes=max(num_classes, 2), features=tuple(spec.features),
                norm=spec.norm, embed_dim=spec.embed_dim)


class UNetPart(nn.Module):
    """The U-Net parts one stage trains.

    Args:
        unet: The full network (its modules are shared, not copied).
        output: ``"global"``: ``(B, C, H, W) -> (B, D)`` global embedding;
            ``"local"``: ``-> (B, D, H, W)`` L2-normalised pixel embeddings;
            ``"logits"``: ``-> (B, K, H, W)`` raw segmentation logits.
    """

    def __init__(self, unet: UNet, output: UNetOutput) -> None:
        super().__init__()
        if output not in ("global", "local", "logits"):
            raise ValueError(f"output must be 'global', 'local' or 'logits', got {output!r}")
        self.output = output
        self.encoder = unet.encoder
        if output == "global":
            self.global_head = unet.global_head
        else:
            self.decoder = unet.decoder
            if output == "local":
                self.local_head = unet.local_head
            else:
                self.seg_head = unet.seg_head
        self._divisor = unet.size_divisor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % self._divisor or x.shape[-2] % self._divisor:
            raise ValueError(f"H and W must be divisible by {self._divisor}, got input {tuple(x.shape)}")
        skips, bottleneck = self.encoder(x)
        if self.output == "global":
            return self.global_head(bottleneck)
        features = self.decoder(skips, bottleneck)
        return self.local_head(features) if self.output == "local" else self.seg_head(features)


class ContrastiveResNet(nn.Module):
    """ResNet encoder + projection head for SimCLR/MICLe: ``(B, C, H, W) -> (B, D)``.

    Keys ``encoder.backbone.*`` hand over to :class:`medcl.models.ResNetClassifier`
    (``encoder.*``); ``projection.*`` is dropped at fine-tuning.
    """

    def __init__(self, encoder: ResNetEncoder, projection_dim: int = 128) -> None:
        super().__init__()
        self.encoder = encoder
        self.projection = ProjectionHead(encoder.feature_dim, encoder.feature_dim, projection_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(self.encoder(x))
