"""Stage 3: segmentation fine-tuning (cross-entropy + soft Dice) on the labelled fraction.

Starts from random init, or from a global (encoder) or local (encoder +
decoder) pretraining checkpoint. Validates pooled Dice every ``val_every``
epochs and keeps the best epoch's weights (:mod:`medcl.train.selection`);
evaluates Dice on the test split (and the shifted site, when the dataset has
one) after the last epoch, for the last and the best-validation weights; a
tracked run also gets a panel of test slices, ``figures/test_panel.png``
(:func:`medcl.train.figures.segmentation_panel`).

Before training, :meth:`SegFinetune.prepare` sets the segmentation head's bias
to the log class prior of the slices the run trains on (``log p_k``; the
weights keep their default init): the first loss is near the prior's, whatever
the seed.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from medcl.config.stages import SegFinetuneConfig
from medcl.data.augment import JointTransform
from medcl.data.collate import torch_batches
from medcl.data.streams import StreamSpec
from medcl.data.schema import IGNORE_INDEX
from medcl.losses import segmentation_loss
from medcl.models import UNet
from medcl.train.evaluate import evaluate_segmentation
from medcl.train.stage import UNetStage, evaluation_streams

if TYPE_CHECKING:
    from medcl.train.context import StageContext
    from medcl.train.loop import LossFn, StageInputs

__all__ = ["SegFinetune", "SEG_FINETUNE", "class_pixel_counts"]


def class_pixel_counts(ctx: StageContext, num_classes: int, name: str = "train",
                       batch_size: int = 256) -> torch.Tensor:
    """Pixels per class ``(K,)`` float64 of stream ``name``, summed over all ranks (ignore pixels left out).

    Each rank counts its own shard of the stream (one pass, no shuffle); the counts are
    all-reduced when distributed, so every rank gets the same totals.
    """
    counts = torch.zeros(num_classes, dtype=torch.float64)
    for batch in torch_batches(ctx.dataset(name), batch_size, device="cpu"):
        mask = batch["mask"].long()
        mask = mask[(mask >= 0) & (mask < num_classes)]
        counts += torch.bincount(mask, minlength=num_classes).to(torch.float64)
    if ctx.distributed and dist.is_initialized():
        counts = counts.to(ctx.device)
        dist.all_reduce(counts)
    return counts.cpu()


class SegFinetune(UNetStage):
    """Encoder, decoder, segmentation head; Dice on the test slices after the last epoch."""

    kind = "seg_finetune"
    output = "logits"
    # A global checkpoint has only the encoder; a local one the encoder and decoder.
    init_parts = ("encoder", "decoder")
    figure = "{prefix}_panel.png"

    def datasets(self, cfg: SegFinetuneConfig, dataset_dir: str) -> dict[str, StreamSpec]:
        """Labelled training slices, test slices."""
        train = StreamSpec.of("labelled_slices", dataset_dir, fraction=cfg.label_fraction, seed=cfg.seed)
        return {"train": train, **evaluation_streams(dataset_dir, validation=cfg.val_every > 0)}

    def prepare(self, network: UNet, ctx: StageContext, cfg: SegFinetuneConfig, inputs: StageInputs) -> None:
        """Set the segmentation head's bias to the log class prior of the training stream (:meth:`UNet.init_seg_head`).

        The prior counts the labelled pixels of every rank's shard (all-reduced), so all ranks
        set the same bias; the weights keep their seeded default init (near-zero weights
        starved the decoder: see :func:`medcl.models.heads.init_to_prior_`). A resumed run
        recomputes it and then loads its checkpoint over it.

        Raises:
            ValueError: the training stream has no labelled pixel.
        """
        counts = class_pixel_counts(ctx, network.num_classes)
        if counts.sum() <= 0:
            raise ValueError(f"stage {self.kind}: the training stream (label_fraction={cfg.label_fraction}) has no "
                             "labelled pixel (every mask is ignore); check the masks of the labelled subjects")
        network.init_seg_head(counts)  # the bias only: the weights keep their seeded default init

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
                 prefix: str, figure: str | os.PathLike[str] | None = None) -> dict[str, float]:
        return evaluate_segmentation(model, stream, inputs.num_classes, device, prefix=prefix, panel=figure)


SEG_FINETUNE = SegFinetune()
