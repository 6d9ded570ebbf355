"""Stage 5: classification fine-tuning on a label fraction: linear probe or full fine-tune.

Multi-class targets use softmax cross-entropy, multi-label targets sigmoid
binary cross-entropy. After the last epoch: top-1 and AUC on the test split,
and on the shifted site (evaluated without further fine-tuning) when the
dataset has one; a tracked run also gets their ROC curves,
``figures/roc_test.png`` (:func:`medcl.train.figures.roc_figure`).
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from medcl.config.stages import ClsFinetuneConfig
from medcl.data.augment import make_views
from medcl.data.streams import StreamSpec
from medcl.models import ResNetClassifier
from medcl.train.evaluate import evaluate_classification
from medcl.train.stage import ResNetStage, build_encoder, evaluation_streams

if TYPE_CHECKING:
    from medcl.train.context import StageContext
    from medcl.train.loop import LossFn, StageInputs

__all__ = ["ClsFinetune", "CLS_FINETUNE"]


class ClsFinetune(ResNetStage):
    """ResNet encoder + linear classifier; accuracy and AUC on the test images after the last epoch."""

    kind = "cls_finetune"
    figure = "roc_{prefix}.png"

    def datasets(self, cfg: ClsFinetuneConfig, dataset_dir: str) -> dict[str, StreamSpec]:
        train = StreamSpec.of("labelled_images", dataset_dir, fraction=cfg.label_fraction, seed=cfg.seed)
        return {"train": train, **evaluation_streams(dataset_dir, validation=cfg.val_every > 0)}

    def build(self, cfg: ClsFinetuneConfig, inputs: StageInputs) -> ResNetClassifier:
        return ResNetClassifier(build_encoder(cfg.model, inputs.in_channels), inputs.num_classes,
                                multilabel=inputs.multilabel)

    def trainable(self, network: ResNetClassifier, cfg: ClsFinetuneConfig) -> nn.Module:
        if cfg.protocol == "linear":
            network.freeze_encoder()
        return network

    def loss(self, ctx: StageContext, cfg: ClsFinetuneConfig, inputs: StageInputs, net: nn.Module,
             generator: torch.Generator) -> LossFn:
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

        return loss_fn

    def evaluate(self, model: nn.Module, stream: Any, device: torch.device, inputs: StageInputs,
                 prefix: str, figure: str | os.PathLike[str] | None = None) -> dict[str, float]:
        return evaluate_classification(model, stream, device, inputs.multilabel, prefix=prefix, roc=figure)


CLS_FINETUNE = ClsFinetune()
