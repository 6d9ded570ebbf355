"""Stage 2: local (pixel-level) contrastive pretraining of the whole U-Net (methods §2).

``loss="supervised"`` (Hu et al., 2b) on the labelled patients' slices;
``loss="self_supervised"`` (2a, the baseline) on all training slices;
``loss="both"``: one stream of all training slices in which the unlabelled
patients' masks are all ``ignore``; the supervised loss uses the labelled
pixels and ``unsupervised_weight`` × the dense loss runs on the slices of
unlabelled patients. Views are intensity-only so pixels correspond. The dense
loss is made affordable the same way as the supervised one (``mode``: every
``stride``-th pixel, or within ``block_size`` blocks, or all pixels).
"""
from __future__ import annotations

import torch

from medcl.config import LocalPretrainConfig
from medcl.data.augment import make_views
from medcl.data.schema import IGNORE_INDEX
from medcl.losses import dense_local_contrastive, supervised_local_contrastive
from medcl.train.checkpoints import load_model_weights
from medcl.data.ray_datasets import StreamSpec
from medcl.train.context import StageContext
from medcl.train.loop import StageInputs, build_optimizer, epoch_batches, fit
from medcl.train.nets import UNetPart, build_unet
from medcl.train.runtime import prepare_model_for_device, seed_everything
from medcl.train.tracking_hook import rank_zero_logger

__all__ = ["datasets", "run"]


def datasets(cfg: LocalPretrainConfig, dataset_dir: str) -> dict[str, StreamSpec]:
    """Ray Datasets this stage reads (driver side). Test patients never appear."""
    if cfg.loss == "supervised":
        return {"train": StreamSpec.of("labelled_slices", dataset_dir, fraction=cfg.label_fraction, seed=cfg.seed)}
    if cfg.loss == "self_supervised":
        return {"train": StreamSpec.of("train_images", dataset_dir)}
    return {"train": StreamSpec.of("partially_labelled_slices", dataset_dir, fraction=cfg.label_fraction,
                                   seed=cfg.seed)}


def run(ctx: StageContext, cfg: LocalPretrainConfig, inputs: StageInputs) -> dict[str, float]:
    """Train on this worker; returns the last epoch's metrics."""
    generator = seed_everything(cfg.seed, ctx.world_rank)
    unet = build_unet(cfg.model, inputs.in_channels, inputs.num_classes)
    if cfg.init_from is not None:
        unet.load_stage_weights(load_model_weights(cfg.init_from), keep=("encoder",), strict=False)
    net = prepare_model_for_device(UNetPart(unet, "local"), ctx.device, channels_last=inputs.amp)
    net = ctx.prepare_model(net)
    optimizer, scheduler = build_optimizer(net.parameters(), cfg, inputs.steps_per_epoch)
    views = make_views("intensity")

    def features_of(images: torch.Tensor) -> torch.Tensor:
        v1, v2 = views(images, generator=generator)
        f = net(torch.cat([v1, v2]))  # (2B, D, H, W)
        f1, f2 = f.chunk(2)
        return torch.stack([f1, f2], dim=1)  # (B, 2, D, H, W)

    def dense(features):
        # The same affordability choice as the supervised loss: stride or blocks.
        if cfg.mode == "stride":
            return dense_local_contrastive(features[..., ::cfg.stride, ::cfg.stride], temperature=cfg.temperature)
        if cfg.mode == "block":
            b = cfg.block_size
            h, w = (features.shape[-2] // b) * b, (features.shape[-1] // b) * b
            losses = [dense_local_contrastive(features[..., i:i + b, j:j + b], temperature=cfg.temperature)
                      for i in range(0, h, b) for j in range(0, w, b)]
            return torch.stack(losses).mean()
        return dense_local_contrastive(features, temperature=cfg.temperature)

    def supervised(features, masks):
        return supervised_local_contrastive(features, masks, temperature=cfg.temperature, mode=cfg.mode,
                                            stride=cfg.stride, block_size=cfg.block_size,
                                            ignore_index=IGNORE_INDEX)

    def loss_fn(batch):
        images = batch["image"]
        features = features_of(images)
        logs = {"batch_images": 2 * len(images)}
        if cfg.loss == "self_supervised":
            return dense(features), logs
        masks = batch["mask"].long()
        loss = supervised(features, masks)
        if cfg.loss == "both":
            unlabelled = (masks == IGNORE_INDEX).flatten(1).all(dim=1)
            dense_loss = dense(features[unlabelled]) if unlabelled.any() else features.sum() * 0.0
            logs["supervised_loss"] = float(loss.detach())
            logs["dense_loss"] = float(dense_loss.detach())
            loss = loss + cfg.unsupervised_weight * dense_loss
        return loss, logs

    def batches(epoch: int):
        return epoch_batches(ctx, cfg, epoch)

    return fit(ctx, cfg, net, optimizer, scheduler, batches, loss_fn,
               run_logger=rank_zero_logger(ctx, inputs), amp=inputs.amp)
