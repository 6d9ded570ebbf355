"""Stage 4: classification pretraining of a ResNet: SimCLR or MICLe (methods §1a, §1c).

``method="simclr"``: two views of every training image. ``method="micle"``:
one view each of two *different* images of a patient's bag (a bag of one
image falls back to two views of it). NT-Xent with negatives from all ranks.
"""
from __future__ import annotations

import torch

from medcl.config import ClsPretrainConfig
from medcl.data.augment import make_views
from medcl.losses import nt_xent
from medcl.models import ResNetEncoder
from medcl.train.checkpoints import load_model_weights
from medcl.data.ray_datasets import StreamSpec
from medcl.train.context import StageContext
from medcl.train.loop import StageInputs, build_optimizer, epoch_batches, fit
from medcl.train.nets import ContrastiveResNet
from medcl.train.runtime import prepare_model_for_device, seed_everything
from medcl.train.tracking_hook import rank_zero_logger

__all__ = ["datasets", "run", "build_encoder"]


def build_encoder(spec, in_channels: int) -> ResNetEncoder:
    """A ResNet encoder from a :class:`medcl.config.ResNetSpec`."""
    weights = str(spec.weights_path) if spec.weights_path is not None else None
    return ResNetEncoder(spec.arch, in_channels=in_channels, small_input=spec.small_input, weights_path=weights)


def datasets(cfg: ClsPretrainConfig, dataset_dir: str) -> dict[str, StreamSpec]:
    """Ray Datasets this stage reads (driver side). No labels are used."""
    if cfg.method == "simclr":
        return {"train": StreamSpec.of("train_images", dataset_dir)}
    return {"train": StreamSpec.of("patient_bags", dataset_dir, split="train")}


def run(ctx: StageContext, cfg: ClsPretrainConfig, inputs: StageInputs) -> dict[str, float]:
    """Train on this worker; returns the last epoch's metrics."""
    from medcl.data.ray_datasets import MiclePairCollate

    generator = seed_everything(cfg.seed, ctx.world_rank)
    model = ContrastiveResNet(build_encoder(cfg.model, inputs.in_channels), cfg.model.projection_dim)
    if cfg.init_from is not None:
        model.encoder.load_weights(load_model_weights(cfg.init_from), strict=False)
    net = ctx.prepare_model(prepare_model_for_device(model, ctx.device, channels_last=inputs.amp))
    optimizer, scheduler = build_optimizer(net.parameters(), cfg, inputs.steps_per_epoch)
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

    def batches(epoch: int):
        if cfg.method == "simclr":
            return epoch_batches(ctx, cfg, epoch)
        return epoch_batches(ctx, cfg, epoch,
                             collate_fn=MiclePairCollate(seed=[cfg.seed, ctx.world_rank, epoch], device=ctx.device))

    return fit(ctx, cfg, net, optimizer, scheduler, batches, loss_fn,
               run_logger=rank_zero_logger(ctx, inputs), amp=inputs.amp)
