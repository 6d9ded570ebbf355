"""Stage 4: classification pretraining of a ResNet: SimCLR or MICLe (methods §1a, §1c).

``method="simclr"``: two views of every training image. ``method="micle"``:
one view each of two *different* images of a patient's bag (a bag of one
image falls back to two views of it). NT-Xent with negatives from all ranks.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from medcl.config.stages import ClsPretrainConfig
from medcl.data.augment import make_views
from medcl.data.streams import StreamSpec
from medcl.losses import nt_xent
from medcl.train.nets import ContrastiveResNet
from medcl.train.stage import ResNetStage, build_encoder

if TYPE_CHECKING:
    from medcl.train.context import StageContext
    from medcl.train.loop import LossFn, StageInputs

__all__ = ["ClsPretrain", "CLS_PRETRAIN"]


class ClsPretrain(ResNetStage):
    """ResNet encoder + projection head; the encoder hands over to fine-tuning."""

    kind = "cls_pretrain"

    def datasets(self, cfg: ClsPretrainConfig, dataset_dir: str) -> dict[str, StreamSpec]:
        """No labels are used."""
        if cfg.method == "simclr":
            return {"train": StreamSpec.of("train_images", dataset_dir)}
        return {"train": StreamSpec.of("patient_bags", dataset_dir, split="train")}

    def build(self, cfg: ClsPretrainConfig, inputs: StageInputs) -> ContrastiveResNet:
        return ContrastiveResNet(build_encoder(cfg.model, inputs.in_channels), cfg.model.projection_dim)

    def collate(self, ctx: StageContext, cfg: ClsPretrainConfig, epoch: int) -> Any | None:
        if cfg.method == "simclr":
            return None
        from medcl.data.collate import MiclePairCollate

        return MiclePairCollate(seed=[cfg.seed, ctx.world_rank, epoch], device=ctx.device)

    def loss(self, ctx: StageContext, cfg: ClsPretrainConfig, inputs: StageInputs, net: nn.Module,
             generator: torch.Generator) -> LossFn:
        views = make_views(cfg.views)

        def loss_fn(batch):
            if cfg.method == "simclr":
                v1, v2 = views(batch["image"], generator=generator)
            else:
                v1, _ = views(batch["image_a"], generator=generator)
                v2, _ = views(batch["image_b"], generator=generator)
            z1, z2 = net(torch.cat([v1, v2])).chunk(2)
            loss = nt_xent(z1, z2, temperature=cfg.temperature, gather_distributed=ctx.distributed)
            return loss, {"batch_images": 2 * len(v1)}

        return loss_fn


CLS_PRETRAIN = ClsPretrain()
