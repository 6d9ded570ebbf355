"""Stage 2: local (pixel-level) contrastive pretraining of the whole U-Net (methods §2).

``loss="supervised"`` (Hu et al., 2b) on the labelled patients' slices;
``loss="self_supervised"`` (2a, the baseline) on all training slices;
``loss="both"``: one stream of all training slices in which the unlabelled
patients' masks are all ``ignore``; the supervised loss uses the labelled
pixels and ``unsupervised_weight`` × the dense loss runs on the slices of
unlabelled patients. Views are intensity-only so pixels correspond. Both
losses are made affordable the same way (``mode``: every ``stride``-th pixel,
or within ``block_size`` blocks, or all pixels). A batch without an anchor pixel
(no foreground where the loss samples) takes no optimiser step; the epoch's
``train/skipped_steps`` counts them.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from medcl.config.stages import LocalPretrainConfig
from medcl.data.augment import make_views
from medcl.data.streams import StreamSpec
from medcl.data.schema import IGNORE_INDEX
from medcl.losses import dense_local_contrastive, has_anchor, supervised_local_contrastive
from medcl.train.stage import UNetStage

if TYPE_CHECKING:
    from medcl.train.context import StageContext
    from medcl.train.loop import LossFn, StageInputs

__all__ = ["LocalPretrain", "LOCAL_PRETRAIN"]


class LocalPretrain(UNetStage):
    """Encoder (from ``init_from``), decoder and local head; the encoder and decoder hand over to fine-tuning."""

    kind = "local_pretrain"
    output = "local"

    def datasets(self, cfg: LocalPretrainConfig, dataset_dir: str) -> dict[str, StreamSpec]:
        """Test patients never appear."""
        if cfg.loss == "supervised":
            return {"train": StreamSpec.of("labelled_slices", dataset_dir, fraction=cfg.label_fraction,
                                           seed=cfg.seed)}
        if cfg.loss == "self_supervised":
            return {"train": StreamSpec.of("train_images", dataset_dir)}
        return {"train": StreamSpec.of("partially_labelled_slices", dataset_dir, fraction=cfg.label_fraction,
                                       seed=cfg.seed)}

    def loss(self, ctx: StageContext, cfg: LocalPretrainConfig, inputs: StageInputs, net: nn.Module,
             generator: torch.Generator) -> LossFn:
        views = make_views("intensity")
        settings = {"temperature": cfg.temperature, "mode": cfg.mode, "stride": cfg.stride,
                    "block_size": cfg.block_size}

        def features_of(images: torch.Tensor) -> torch.Tensor:
            v1, v2 = views(images, generator=generator)
            f = net(torch.cat([v1, v2]))  # (2B, D, H, W)
            f1, f2 = f.chunk(2)
            return torch.stack([f1, f2], dim=1)  # (B, 2, D, H, W)

        def loss_fn(batch):
            images = batch["image"]
            features = features_of(images)
            logs = {"batch_images": 2 * len(images)}
            if cfg.loss == "self_supervised":
                return dense_local_contrastive(features, **settings), logs
            masks = batch["mask"].long()
            anchors = has_anchor(masks, cfg.mode, cfg.stride, cfg.block_size, IGNORE_INDEX)
            loss = supervised_local_contrastive(features, masks, **settings, ignore_index=IGNORE_INDEX)
            if cfg.loss == "supervised":
                logs["skip_step"] = not anchors  # no foreground pixel: nothing to learn from this batch
            if cfg.loss == "both":
                unlabelled = (masks == IGNORE_INDEX).flatten(1).all(dim=1)
                logs["skip_step"] = not anchors and not bool(unlabelled.any())
                dense_loss = (dense_local_contrastive(features[unlabelled], **settings) if unlabelled.any()
                              else features.sum() * 0.0)
                logs["supervised_loss"] = float(loss.detach())
                logs["dense_loss"] = float(dense_loss.detach())
                loss = loss + cfg.unsupervised_weight * dense_loss
            return loss, logs

        return loss_fn


LOCAL_PRETRAIN = LocalPretrain()
