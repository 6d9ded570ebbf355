"""Stage 5: classification fine-tuning on a label fraction: linear probe or full fine-tune.

Multi-class targets use softmax cross-entropy, multi-label targets sigmoid
binary cross-entropy. After the last epoch: top-1 and AUC on the test split,
and on the shifted site (evaluated without further fine-tuning) when the
dataset has one.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from medcl.config import ClsFinetuneConfig
from medcl.data.augment import make_views
from medcl.models import ResNetClassifier
from medcl.train.cls_pretrain import build_encoder
from medcl.train.checkpoints import load_model_weights
from medcl.data.ray_datasets import StreamSpec
from medcl.train.context import StageContext
from medcl.train.evaluate import evaluate_classification
from medcl.train.loop import StageInputs, build_optimizer, epoch_batches, fit
from medcl.train.runtime import prepare_model_for_device, seed_everything
from medcl.train.tracking_hook import rank_zero_logger

__all__ = ["datasets", "run"]


def datasets(cfg: ClsFinetuneConfig, dataset_dir: str) -> dict[str, StreamSpec]:
    """Ray Datasets this stage reads (driver side)."""
    from medcl.data.ray_datasets import has_shifted_site

    streams = {
        "train": StreamSpec.of("labelled_images", dataset_dir, fraction=cfg.label_fraction, seed=cfg.seed),
        "test": StreamSpec.of("eval_slices", dataset_dir, split="test", site="A"),
    }
    if has_shifted_site(dataset_dir):
        streams["test_shifted"] = StreamSpec.of("eval_slices", dataset_dir, split="test", site="B")
    return streams


def run(ctx: StageContext, cfg: ClsFinetuneConfig, inputs: StageInputs) -> dict[str, float]:
    """Train on this worker; returns the last epoch's metrics (+ test metrics on rank 0)."""
    generator = seed_everything(cfg.seed, ctx.world_rank)
    encoder = build_encoder(cfg.model, inputs.in_channels)
    if cfg.init_from is not None:
        encoder.load_weights(load_model_weights(cfg.init_from), strict=False)
    model = ResNetClassifier(encoder, inputs.num_classes, multilabel=inputs.multilabel)
    if cfg.protocol == "linear":
        model.freeze_encoder()
    net = ctx.prepare_model(prepare_model_for_device(model, ctx.device, channels_last=inputs.amp))
    optimizer, scheduler = build_optimizer(net.parameters(), cfg, inputs.steps_per_epoch)
    # Light augmentation for fine-tuning: one medical view per image.
    views = make_views("medical") if cfg.augment else None

    def loss_fn(batch):
        images = batch["image"]
        if views is not None:
            images, _ = views(images, generator=generator)
        logits = net(images)
        if inputs.multilabel:
            loss = F.binary_cross_entropy_with_logits(logits, batch["class_labels"].float())
        else:
            loss = F.cross_entropy(logits, batch["class_label"].long())
        return loss, {"batch_images": len(images)}

    def batches(epoch: int):
        return epoch_batches(ctx, cfg, epoch)

    def evaluate(model):
        metrics = evaluate_classification(model, ctx.dataset("test"), ctx.device, inputs.multilabel)
        if ctx.has_dataset("test_shifted"):
            metrics.update(evaluate_classification(model, ctx.dataset("test_shifted"), ctx.device,
                                                   inputs.multilabel, prefix="shifted"))
        return metrics

    return fit(ctx, cfg, net, optimizer, scheduler, batches, loss_fn, evaluate=evaluate,
               run_logger=rank_zero_logger(ctx, inputs), amp=inputs.amp)
