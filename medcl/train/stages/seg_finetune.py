"""Stage 3: segmentation fine-tuning (cross-entropy + soft Dice) on the labelled fraction.

Starts from random init, or from a global (encoder) or local (encoder +
decoder) pretraining checkpoint. Evaluates Dice on the test split (and the
shifted site, when the dataset has one) after the last epoch.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from medcl.config.stages import SegFinetuneConfig
from medcl.data.augment import JointTransform
from medcl.data.streams import StreamSpec
from medcl.data.schema import IGNORE_INDEX
from medcl.losses import segmentation_loss
from medcl.train.evaluate import evaluate_segmentation
from medcl.train.stage import UNetStage, evaluation_streams

if TYPE_CHECKING:
    from medcl.train.context import StageContext
    from medcl.train.loop import LossFn, StageInputs

__all__ = ["SegFinetune", "SEG_FINETUNE"]


class SegFinetune(UNetStage):
    """Encoder, decoder, segmentation head; Dice on the test slices after the last epoch."""

    kind = "seg_finetune"
    output = "logits"
    # A global checkpoint has only the encoder; a local one the encoder and decoder.
    init_parts = ("encoder", "decoder")

    def datasets(self, cfg: SegFinetuneConfig, dataset_dir: str) -> dict[str, StreamSpec]:
        """Labelled training slices, test slices."""
        train = StreamSpec.of("labelled_slices", dataset_dir, fraction=cfg.label_fraction, seed=cfg.seed)
        return {"train": train, **evaluation_streams(dataset_dir)}

    def loss(self, ctx: StageContext, cfg: SegFinetuneConfig, inputs: StageInputs, net: nn.Module,
             generator: torch.Generator) -> LossFn:
        joint = JointTransform() if cfg.augment else None

        def loss_fn(batch):
            images, masks = batch["image"], batch["mask"].long()
            if joint is not None:
                images, masks = joint(images, masks, generator=generator)
            loss = segmentation_loss(net(images), masks, ignore_index=IGNORE_INDEX, dice_weight=cfg.dice_weight)
            return loss, {"batch_images": len(images)}

        return loss_fn

    def evaluate(self, model: nn.Module, stream: Any, device: torch.device, inputs: StageInputs,
                 prefix: str) -> dict[str, float]:
        return evaluate_segmentation(model, stream, inputs.num_classes, device, prefix=prefix)


SEG_FINETUNE = SegFinetune()
