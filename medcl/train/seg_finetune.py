"""Stage 3: segmentation fine-tuning (cross-entropy + soft Dice) on the labelled fraction.

Starts from random init, or from a global (encoder) or local (encoder +
decoder) pretraining checkpoint. Evaluates Dice on the test split (and the
shifted site, when the dataset has one) after the last epoch.
"""
from __future__ import annotations

from medcl.config import SegFinetuneConfig
from medcl.data.augment import JointTransform
from medcl.data.schema import IGNORE_INDEX
from medcl.losses import segmentation_loss
from medcl.train.checkpoints import load_model_weights
from medcl.data.ray_datasets import StreamSpec
from medcl.train.context import StageContext
from medcl.train.evaluate import evaluate_segmentation
from medcl.train.loop import StageInputs, build_optimizer, epoch_batches, fit
from medcl.train.nets import UNetPart, build_unet
from medcl.train.runtime import prepare_model_for_device, seed_everything
from medcl.train.tracking_hook import rank_zero_logger

__all__ = ["datasets", "run"]


def datasets(cfg: SegFinetuneConfig, dataset_dir: str) -> dict[str, StreamSpec]:
    """Ray Datasets this stage reads (driver side): labelled train slices, test slices."""
    from medcl.data.ray_datasets import has_shifted_site

    streams = {
        "train": StreamSpec.of("labelled_slices", dataset_dir, fraction=cfg.label_fraction, seed=cfg.seed),
        "test": StreamSpec.of("eval_slices", dataset_dir, split="test", site="A"),
    }
    if has_shifted_site(dataset_dir):
        streams["test_shifted"] = StreamSpec.of("eval_slices", dataset_dir, split="test", site="B")
    return streams


def run(ctx: StageContext, cfg: SegFinetuneConfig, inputs: StageInputs) -> dict[str, float]:
    """Train on this worker; returns the last epoch's metrics (+ test Dice on rank 0)."""
    generator = seed_everything(cfg.seed, ctx.world_rank)
    unet = build_unet(cfg.model, inputs.in_channels, inputs.num_classes)
    if cfg.init_from is not None:
        # A global checkpoint has only the encoder; a local one the encoder and decoder.
        unet.load_stage_weights(load_model_weights(cfg.init_from), keep=("encoder", "decoder"), strict=False)
    net = prepare_model_for_device(UNetPart(unet, "logits"), ctx.device, channels_last=inputs.amp)
    net = ctx.prepare_model(net)
    optimizer, scheduler = build_optimizer(net.parameters(), cfg, inputs.steps_per_epoch)
    joint = JointTransform() if cfg.augment else None

    def loss_fn(batch):
        images, masks = batch["image"], batch["mask"].long()
        if joint is not None:
            images, masks = joint(images, masks, generator=generator)
        loss = segmentation_loss(net(images), masks, ignore_index=IGNORE_INDEX, dice_weight=cfg.dice_weight)
        return loss, {"batch_images": len(images)}

    def batches(epoch: int):
        return epoch_batches(ctx, cfg, epoch)

    def evaluate(model):
        metrics = evaluate_segmentation(model, ctx.dataset("test"), inputs.num_classes, ctx.device)
        if ctx.has_dataset("test_shifted"):
            metrics.update(evaluate_segmentation(model, ctx.dataset("test_shifted"), inputs.num_classes,
                                                 ctx.device, prefix="shifted"))
        return metrics

    return fit(ctx, cfg, net, optimizer, scheduler, batches, loss_fn, evaluate=evaluate,
               run_logger=rank_zero_logger(ctx, inputs), amp=inputs.amp)
