"""Stage 1: global contrastive pretraining of the U-Net encoder (methods §1a, §1c, §1d).

``positives="simclr"``: two augmented views of every training slice, NT-Xent.
``positives="micle"``: per training patient (bag) one view each of two *different*
slices (a one-slice patient: two views of its slice), NT-Xent over the batch of
patients, as classification's MICLe (:mod:`medcl.train.stages.cls_pretrain`).
``positives="partition"``: per volume one slice from each of S partitions by
slice position; same-partition slices of all volumes (and their views) are
positives (multi-positive NT-Xent with group id = partition).
Negatives come from all ranks (gathered with gradient). ``micle`` and
``partition`` read the ``patient_bags`` stream: ``batch_size_per_worker`` counts
patients and an epoch is one pass over the training patients.
"""
from __future__ import annotations

import logging
import os
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

logger = logging.getLogger(__name__)

__all__ = ["GlobalPretrain", "GLOBAL_PRETRAIN", "check_bag_batches"]


def check_bag_batches(cfg: GlobalPretrainConfig, dataset_dir: str, world_size: int = 1) -> None:
    """Refuse bag positives the dataset cannot feed: no ``bags.parquet``, or no full batch of patients per worker.

    Logs a warning when every training patient has one slice (``micle`` then equals ``simclr``).

    Args:
        cfg: The stage config (``positives`` ``micle`` or ``partition``).
        dataset_dir: The dataset directory.
        world_size: Workers sharing the training patients (Ray Data gives each ``patients // world_size``).

    Raises:
        ValueError: ``bags.parquet`` is missing (names the file and the setting), or the training split has
            fewer than ``batch_size_per_worker`` patients per worker (names both counts).
    """
    from medcl.data.manifest import read_manifest
    from medcl.data.schema import BAGS_NAME
    from medcl.data.splits import patients_by_split

    setting = f"global_pretrain positives={cfg.positives!r}"
    path = os.path.join(os.fspath(dataset_dir), BAGS_NAME)
    if not os.path.isfile(path):
        raise ValueError(f"{setting} samples slices from patient bags, but {path} does not exist; re-run the "
                         f"ingest of the dataset (it writes {BAGS_NAME}) or set positives: simclr")
    patients = len(patients_by_split(dataset_dir)["train"])
    per_worker = patients // max(1, world_size)
    if per_worker < cfg.batch_size_per_worker:
        workers = f", {per_worker} per worker on {world_size} workers" if world_size > 1 else ""
        fix = [f"set batch_size_per_worker <= {per_worker}" if per_worker else "use more training patients"]
        if world_size > 1:
            fix.append("use fewer workers")
        raise ValueError(f"{setting}: batch_size_per_worker={cfg.batch_size_per_worker} counts patients (one bag "
                         f"a row), but the training split of {dataset_dir} has {patients} patients{workers}; "
                         f"{' or '.join(fix)} (incomplete batches are dropped)")
    train = read_manifest(dataset_dir).splits.get("train", {})
    if cfg.positives == "micle" and train.get("images") == patients:
        logger.warning("%s: every training patient of %s has one slice, so every pair is two views of one slice "
                       "(as positives: simclr)", setting, dataset_dir)


class GlobalPretrain(UNetStage):
    """Encoder + global head; the encoder hands over to local pretraining or fine-tuning."""

    kind = "global_pretrain"
    output = "global"

    def datasets(self, cfg: GlobalPretrainConfig, dataset_dir: str) -> dict[str, StreamSpec]:
        """Training slices (``simclr``) or training patients' bags (``micle``, ``partition``; checked here)."""
        if cfg.positives == "simclr":
            return {"train": StreamSpec.of("train_images", dataset_dir)}
        check_bag_batches(cfg, dataset_dir)
        return {"train": StreamSpec.of("patient_bags", dataset_dir, split="train")}

    def collate(self, ctx: StageContext, cfg: GlobalPretrainConfig, epoch: int) -> Any | None:
        if cfg.positives == "simclr":
            return None
        from medcl.data.collate import MiclePairCollate, PartitionCollate

        seed = [cfg.seed, ctx.world_rank, epoch]  # per pass: a resumed run draws what an uninterrupted one does
        if cfg.positives == "micle":
            return MiclePairCollate(seed=seed, device=ctx.device)
        # batch_size_per_worker counts volumes; each brings num_partitions slices.
        return PartitionCollate(cfg.num_partitions, seed=seed, device=ctx.device)

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

        def micle(batch):
            # One view of each of the patient's two slices (the same slice twice for a one-slice patient).
            v1, v2 = views.view(batch["image_a"], generator), views.view(batch["image_b"], generator)
            z1, z2 = net(torch.cat([v1, v2])).chunk(2)
            loss = nt_xent(z1, z2, temperature=cfg.temperature, gather_distributed=ctx.distributed)
            return loss, {"batch_images": 2 * len(v1)}

        return {"simclr": simclr, "micle": micle, "partition": partition}[cfg.positives]


GLOBAL_PRETRAIN = GlobalPretrain()
