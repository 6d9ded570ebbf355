"""Stage hand-over loads exactly the expected parts (issue 14, defect 7).

A global checkpoint hands over the encoder, a local one the encoder and decoder;
a checkpoint that holds only part of a part (a renamed or dropped layer) must fail
naming the missing keys instead of training on from random weights.
"""
from __future__ import annotations

import pytest
import torch

from medcl.models import UNet
from medcl.train.nets import UNetPart
from medcl.train.stages import STAGES

FEATURES = (4, 8, 16)


def _unet(seed: int) -> UNet:
    torch.manual_seed(seed)
    return UNet(in_channels=1, num_classes=3, features=FEATURES)


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_global_checkpoint_hands_over_the_encoder_only():
    source = _unet(1)
    weights = UNetPart(source, "global").state_dict()  # encoder.* + global_head.*
    target = _unet(2)
    decoder_before = {k: v.clone() for k, v in target.decoder.state_dict().items()}
    STAGES["seg_finetune"].load_init(target, weights)
    assert _same(target.encoder, source.encoder)
    assert all(torch.equal(v, decoder_before[k]) for k, v in target.decoder.state_dict().items())


def test_local_checkpoint_hands_over_encoder_and_decoder():
    source = _unet(1)
    weights = UNetPart(source, "local").state_dict()  # encoder, decoder, local_head
    target = _unet(2)
    STAGES["seg_finetune"].load_init(target, weights)
    assert _same(target.encoder, source.encoder) and _same(target.decoder, source.decoder)
    assert not _same(target.seg_head, source.seg_head)  # heads start fresh


@pytest.mark.parametrize("kind, dropped", [("seg_finetune", "decoder.up1.conv.conv2.weight"),
                                           ("seg_finetune", "encoder.down2.conv.norm1.bias"),
                                           ("local_pretrain", "encoder.conv0.conv1.weight")])
def test_a_partly_missing_part_fails_naming_the_key(kind, dropped):
    weights = UNetPart(_unet(1), "local").state_dict()
    del weights[dropped]
    target = _unet(2)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError, match=rf"init_from checkpoint does not fit stage {kind}.*{dropped}"):
        STAGES[kind].load_init(target, weights)
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())  # nothing half-loaded


def test_a_checkpoint_without_an_encoder_fails():
    weights = {k: v for k, v in UNetPart(_unet(1), "local").state_dict().items() if not k.startswith("encoder.")}
    with pytest.raises(ValueError, match="has no encoder weights"):
        STAGES["seg_finetune"].load_init(_unet(2), weights)


def test_ddp_prefixed_keys_still_load():
    source = _unet(1)
    weights = {f"module.{k}": v for k, v in UNetPart(source, "local").state_dict().items()}
    target = _unet(2)
    STAGES["seg_finetune"].load_init(target, weights)
    assert _same(target.decoder, source.decoder)


def test_resnet_backbone_hand_over_is_whole():
    from medcl.models import ResNetClassifier, ResNetEncoder
    from medcl.train.nets import ContrastiveResNet

    torch.manual_seed(0)
    pretrained = ContrastiveResNet(ResNetEncoder("resnet18", in_channels=1, small_input=True))
    weights = pretrained.state_dict()  # encoder.backbone.* + projection.*
    target = ResNetClassifier(ResNetEncoder("resnet18", in_channels=1, small_input=True), num_classes=2)
    STAGES["cls_finetune"].load_init(target, weights)
    assert _same(target.encoder, pretrained.encoder)
    del weights["encoder.backbone.layer3.1.bn2.weight"]
    with pytest.raises(ValueError, match=r"stage cls_finetune.*layer3\.1\.bn2\.weight"):
        STAGES["cls_finetune"].load_init(target, weights)
