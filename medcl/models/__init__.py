"""Networks: a 2D U-Net with contrastive heads, torchvision ResNet encoders, weight hand-over.

Pure torch (no Ray/MLflow imports); nothing is downloaded.
"""
from __future__ import annotations

from medcl.models.encoders import ARCHS, ResNetClassifier, ResNetEncoder
from medcl.models.heads import GlobalHead, LocalHead, ProjectionHead
from medcl.models.unet import STAGE_PREFIXES, ConvBlock, Down, UNet, UNetDecoder, UNetEncoder, Up
from medcl.models.weights import LoadReport, read_state_dict, strip_key_prefixes, sum_input_channels

__all__ = [
    "ARCHS",
    "STAGE_PREFIXES",
    "ConvBlock",
    "Down",
    "Up",
    "UNetEncoder",
    "UNetDecoder",
    "UNet",
    "ProjectionHead",
    "GlobalHead",
    "LocalHead",
    "ResNetEncoder",
    "ResNetClassifier",
    "LoadReport",
    "read_state_dict",
    "strip_key_prefixes",
    "sum_input_channels",
]
