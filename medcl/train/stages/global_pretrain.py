"""Stage 1: global contrastive pretraining of the U-Net encoder (methods §1a, §1d).

``positives="simclr"``: two augmented views of every training slice, NT-Xent.
``positives="partition"``: per volume one slice from each of S partitions by
slice position; same-partition slices of all volumes (and their views) are
positives (multi-positive NT-Xent with group id = partition).
Negatives come from all ranks (gathered with gradient).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from medcl.config.stages import GlobalPretrainConfig
from medcl.data.augment import make_views
from medcl.data.streams import StreamSpec
from medcl.losses import multi_positive_nt_xent, nt_xent
from medcl.train.stage import UNetStage

if TYPE_CHECKING:
    from medcl.train.context import StageContext
    from medcl.train.loop import LossFn, StageInputs

__all__ = ["GlobalPretrain", "GLOBAL_PRETRAIN"]


class GlobalPretrain(UNetStage):
    """Encoder + global head; the encoder hands over to local pretraining or fine-tuning."""

    kind = "global_pretrain"
    output = "global"

    def datasets(self, cfg: GlobalPretrainConfig, dataset_dir: str) -> dict[str, StreamSpec]:
        if cfg.positives == "simclr":
            return {"train": StreamSpec.of("train_images", dataset_dir)}
        return {"train": StreamSpec.of("patient_bags", dataset_dir, split="train")}

    def collate(self, ctx: StageContext, cfg: GlobalPretrainConfig, epoch: int) -> Any | None:
        if cfg.positives == "simclr":
            return None
        from medcl.data.collate import PartitionCollate

        # batch_size_per_worker counts volumes; each brings num_partitions slices.
        return PartitionCollate(cfg.num_partitions, seed=[cfg.seed, ctx.world_rank, epoch], device=ctx.device)

    def loss(self, ctx: StageContext, cfg: GlobalPretrainConfig, inputs: StageInputs, net: nn.Module,
             generator: torch.Generator) -> LossFn:
        views = make_views(cfg.views)

        def simclr(batch):
            v1, v2 = views(batch["image"], generator=generator)
            z = net(torch.cat([v1, v2]))
            z1, z2 = z.chunk(2)
            loss = nt_xent(z1, z2, temperature=cfg.temperature, gather_distributed=ctx.distributed)
            return loss, {"batch_images": 2 * len(v1)}

        def partition(batch):
            images, groups = batch["image"], batch["group_id"].long()
            v1, v2 = views(images, generator=generator)
            z = net(torch.cat([v1, v2]))
            loss = multi_positive_nt_xent(z, torch.cat([groups, groups]), temperature=cfg.temperature,
                                          gather_distributed=ctx.distributed)
            return loss, {"batch_images": 2 * len(v1)}

        return simclr if cfg.positives == "simclr" else partition


GLOBAL_PRETRAIN = GlobalPretrain()
