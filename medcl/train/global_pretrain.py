"""Stage 1: global contrastive pretraining of the U-Net encoder (methods §1a, §1d).

``positives="simclr"``: two augmented views of every training slice, NT-Xent.
``positives="partition"``: per volume one slice from each of S partitions by
slice position; same-partition slices of all volumes (and their views) are
positives (multi-positive NT-Xent with group id = partition).
Negatives come from all ranks (gathered with gradient).
"""
from __future__ import annotations

import torch

from medcl.config import GlobalPretrainConfig
from medcl.data.augment import make_views
from medcl.losses import multi_positive_nt_xent, nt_xent
from medcl.train.checkpoints import load_model_weights
from medcl.data.ray_datasets import StreamSpec
from medcl.train.context import StageContext
from medcl.train.loop import StageInputs, build_optimizer, epoch_batches, fit
from medcl.train.nets import UNetPart, build_unet
from medcl.train.runtime import prepare_model_for_device, seed_everything
from medcl.train.tracking_hook import rank_zero_logger

__all__ = ["datasets", "run"]


def datasets(cfg: GlobalPretrainConfig, dataset_dir: str) -> dict[str, StreamSpec]:
    """Ray Datasets this stage reads (driver side)."""
    if cfg.positives == "simclr":
        return {"train": StreamSpec.of("train_images", dataset_dir)}
    return {"train": StreamSpec.of("patient_bags", dataset_dir, split="train")}


def run(ctx: StageContext, cfg: GlobalPretrainConfig, inputs: StageInputs) -> dict[str, float]:
    """Train on this worker; returns the last epoch's metrics."""
    from medcl.data.ray_datasets import PartitionCollate

    generator = seed_everything(cfg.seed, ctx.world_rank)
    unet = build_unet(cfg.model, inputs.in_channels, inputs.num_classes)
    if cfg.init_from is not None:
        unet.load_stage_weights(load_model_weights(cfg.init_from), keep=("encoder",), strict=False)
    net = prepare_model_for_device(UNetPart(unet, "global"), ctx.device, channels_last=inputs.amp)
    net = ctx.prepare_model(net)
    optimizer, scheduler = build_optimizer(net.parameters(), cfg, inputs.steps_per_epoch)
    views = make_views(cfg.views)

    if cfg.positives == "simclr":
        def batches(epoch: int):
            return epoch_batches(ctx, cfg, epoch)

        def loss_fn(batch):
            v1, v2 = views(batch["image"], generator=generator)
            z = net(torch.cat([v1, v2]))
            z1, z2 = z.chunk(2)
            loss = nt_xent(z1, z2, temperature=cfg.temperature, gather_distributed=ctx.distributed)
            return loss, {"batch_images": 2 * len(v1)}
    else:
        # batch_size_per_worker counts volumes; each brings num_partitions slices.
        def batches(epoch: int):
            collate = PartitionCollate(cfg.num_partitions, seed=[cfg.seed, ctx.world_rank, epoch], device=ctx.device)
            return epoch_batches(ctx, cfg, epoch, collate_fn=collate)

        def loss_fn(batch):
            images, groups = batch["image"], batch["group_id"].long()
            v1, v2 = views(images, generator=generator)
            z = net(torch.cat([v1, v2]))
            loss = multi_positive_nt_xent(z, torch.cat([groups, groups]), temperature=cfg.temperature,
                                          gather_distributed=ctx.distributed)
            return loss, {"batch_images": 2 * len(v1)}

    return fit(ctx, cfg, net, optimizer, scheduler, batches, loss_fn,
               run_logger=rank_zero_logger(ctx, inputs), amp=inputs.amp)
