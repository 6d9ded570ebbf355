"""Typed configs of every training stage, and how they are scaled.

Each stage config is a frozen dataclass; ``to_dict`` feeds
``train_loop_config`` and MLflow params, ``stage_config_from_dict`` rebuilds it
inside a worker. Validation happens here, before any training starts; messages
name the key and the value. ``uses_labels`` says whether a stage trains on
labels (a label fraction then tells its jobs apart).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from medcl.config.binder import ConfigError, build, check, to_dict

__all__ = [
    "ConfigError",
    "UNetSpec",
    "ResNetSpec",
    "ScalingSpec",
    "GlobalPretrainConfig",
    "LocalPretrainConfig",
    "SegFinetuneConfig",
    "ClsPretrainConfig",
    "ClsFinetuneConfig",
    "STAGE_CONFIGS",
    "FINETUNE_KINDS",
    "StageConfig",
    "stage_config_from_dict",
    "check_fraction",
    "check_seed",
    "SEED_LIMIT",
    "to_dict",
]

#: Seeds lie in [0, SEED_LIMIT): every rank seeds with ``seed + rank``, which must fit in 32 bits.
SEED_LIMIT = 2**31


@dataclass(frozen=True)
class UNetSpec:
    """U-Net shape (methods §3). ``features``: encoder widths, the last is the bottleneck."""

    features: tuple[int, ...] = (16, 32, 64, 128, 256)
    norm: Literal["instance", "batch"] = "instance"
    embed_dim: int = 128

    def __post_init__(self) -> None:
        check(len(self.features) >= 2, f"features must list at least 2 widths, got {list(self.features)}")
        check(all(f > 0 for f in self.features), f"features must be positive, got {list(self.features)}")
        check(self.embed_dim > 0, f"embed_dim must be > 0, got {self.embed_dim}")


@dataclass(frozen=True)
class ResNetSpec:
    """torchvision ResNet encoder for classification."""

    arch: Literal["resnet18", "resnet50"] = "resnet18"
    small_input: bool = True  # 3x3 stride-1 stem, no max-pool: for 28-64 px images
    weights_path: Path | None = None  # e.g. ImageNet SimCLR weights; never downloaded
    projection_dim: int = 128


@dataclass(frozen=True)
class ScalingSpec:
    """How many Ray Train workers a stage runs on.

    In a pipeline or sweep, ``num_workers=1`` on CPU runs the stage loop inside
    its Ray Tune trial (no trainer start-up); ``num_workers>1`` or ``use_gpu``
    makes the trial drive a ``TorchTrainer``. ``medcl pretrain``/``finetune``
    (``run_stage``) always use a ``TorchTrainer`` with ``num_workers`` workers.
    ``max_failures``: worker-group restarts from the latest checkpoint.
    """

    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    max_failures: int = 1

    def __post_init__(self) -> None:
        check(self.num_workers >= 1, f"num_workers must be >= 1, got {self.num_workers}")
        check(self.cpus_per_worker > 0, f"cpus_per_worker must be > 0, got {self.cpus_per_worker}")
        check(self.max_failures >= 0, f"max_failures must be >= 0, got {self.max_failures}")


@dataclass(frozen=True)
class _StageBase:
    max_epochs: int = 10
    batch_size_per_worker: int = 16
    lr: float = 3e-4
    weight_decay: float = 0.0
    schedule: Literal["cosine", "constant"] = "cosine"  # after warm-up: cosine decay to min_lr_ratio * lr, or constant lr
    min_lr_ratio: float = 0.0  # where the cosine ends, as a fraction of lr
    warmup_steps: int = 0  # optimiser steps of linear warm-up from lr / (warmup_steps + 1) to lr
    checkpoint_every: int = 1  # epochs between checkpoints; the last epoch always checkpoints
    val_every: int = 1  # fine-tuning: validate every N epochs (and the last) and report the best epoch's test; 0: never
    min_steps_per_epoch: int = 0  # cycle small (labelled) data until an epoch has this many steps; 0: one pass
    max_steps_per_epoch: int = 0  # end an epoch after this many steps (a step budget on large data); 0: no cap
    seed: int = 0
    init_from: Path | None = None  # checkpoint dir or model.pt of an earlier stage (heads dropped); a URI (s3://...) stays a str

    @property
    def uses_labels(self) -> bool:
        """Whether the stage trains on labels (then its label fraction tells its jobs apart).

        Stages with a ``label_fraction`` do, except a self-supervised ``local_pretrain``.
        """
        return hasattr(self, "label_fraction")

    def __post_init__(self) -> None:
        check(self.max_epochs >= 1, f"max_epochs must be >= 1, got {self.max_epochs}")
        check_seed("seed", self.seed)
        check(self.batch_size_per_worker >= 1, f"batch_size_per_worker must be >= 1, got {self.batch_size_per_worker}")
        check(self.lr > 0, f"lr must be > 0, got {self.lr}")
        check(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        check(self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}")
        check(0.0 <= self.min_lr_ratio <= 1.0, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        check(self.checkpoint_every >= 1, f"checkpoint_every must be >= 1, got {self.checkpoint_every}")
        check(self.val_every >= 0, f"val_every must be >= 0 (0: never validate), got {self.val_every}")
        check(self.min_steps_per_epoch >= 0, f"min_steps_per_epoch must be >= 0, got {self.min_steps_per_epoch}")
        check(self.max_steps_per_epoch == 0 or self.max_steps_per_epoch >= max(1, self.min_steps_per_epoch),
               f"max_steps_per_epoch must be 0 (no cap) or >= max(1, min_steps_per_epoch="
               f"{self.min_steps_per_epoch}), got {self.max_steps_per_epoch}")


def check_fraction(name: str, value: float | list[float]) -> None:
    """Raise ``ValueError("<name> must be in (0, 1], ...")`` unless the fraction (or every listed one) is in (0, 1].

    A list (a pipeline's ``label_fractions``) is reported by its bad entries, a single value as it is.
    """
    values = value if isinstance(value, list) else [value]
    bad = [v for v in values if not 0.0 < v <= 1.0]
    check(not bad, f"{name} must be in (0, 1], got {bad if isinstance(value, list) else value}")


def check_seed(name: str, value: int | list[int]) -> None:
    """Raise ``ValueError("<name> must ...")`` unless the seed (or every listed one) lies in [0, 2**31).

    A list (a pipeline's ``seeds``) is reported entry by entry, one line each: ``seeds[1] must ...``.
    """
    if not isinstance(value, list):
        check(0 <= value < SEED_LIMIT, f"{name} must be an integer in [0, 2**31), got {value}")
        return
    bad = [f"{name}[{i}] must be an integer in [0, 2**31), got {v}" for i, v in enumerate(value)
           if not 0 <= v < SEED_LIMIT]
    check(not bad, "\n".join(bad))


def _check_temperature(value: float) -> None:
    check(value > 0, f"temperature must be > 0, got {value}")


@dataclass(frozen=True)
class GlobalPretrainConfig(_StageBase):
    """Stage 1: U-Net encoder, global contrastive loss without labels (methods §1a/§1c/§1d).

    ``positives``: ``simclr``, two views of one training slice; ``micle``, one view each of
    two *different* slices of one training patient (a one-slice patient: two views of it);
    ``partition``, one slice per ``num_partitions`` partition of each patient's volume, the
    same partition of every volume in the batch being positives. With ``simclr`` a row, and
    ``batch_size_per_worker``, is a slice and an epoch one pass over the training slices;
    with ``micle`` and ``partition`` a row is a patient (bag): an epoch is one pass over the
    training patients (each pass draws new slices), so it has about slices-per-patient
    times fewer steps; ``min_steps_per_epoch`` / ``max_steps_per_epoch`` count steps as
    for every stream (cycled passes, then the cap), e.g. to give ``micle`` the step
    budget of ``simclr``. ``micle`` and ``partition`` need the dataset's ``bags.parquet``
    and at least ``batch_size_per_worker`` training patients per worker.
    """

    kind: Literal["global_pretrain"] = "global_pretrain"
    positives: Literal["simclr", "micle", "partition"] = "simclr"
    temperature: float = 0.1
    num_partitions: int = 4
    views: Literal["medical", "simclr"] = "medical"
    model: UNetSpec = field(default_factory=UNetSpec)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_temperature(self.temperature)
        check(self.num_partitions >= 1, f"num_partitions must be >= 1, got {self.num_partitions}")


@dataclass(frozen=True)
class LocalPretrainConfig(_StageBase):
    """Stage 2: whole U-Net, local (pixel) contrastive loss (methods §2).

    ``loss``: ``supervised`` (2b) on the labelled patients' slices,
    ``self_supervised`` (2a) on all training slices, or ``both``: each step
    adds the supervised loss on a labelled batch and ``unsupervised_weight``
    times the dense loss on a batch of all training slices.
    """

    kind: Literal["local_pretrain"] = "local_pretrain"
    loss: Literal["supervised", "self_supervised", "both"] = "supervised"
    mode: Literal["exact", "stride", "block"] = "stride"
    stride: int = 4
    block_size: int = 32
    temperature: float = 0.1
    unsupervised_weight: float = 1.0
    label_fraction: float = 1.0
    lr: float = 1e-4
    model: UNetSpec = field(default_factory=UNetSpec)

    @property
    def uses_labels(self) -> bool:
        """True unless ``loss`` is ``self_supervised``."""
        return self.loss != "self_supervised"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_temperature(self.temperature)
        check_fraction("label_fraction", self.label_fraction)
        check(self.stride >= 1, f"stride must be >= 1, got {self.stride}")
        check(self.block_size >= 1, f"block_size must be >= 1, got {self.block_size}")
        check(self.unsupervised_weight >= 0, f"unsupervised_weight must be >= 0, got {self.unsupervised_weight}")


@dataclass(frozen=True)
class SegFinetuneConfig(_StageBase):
    """Stage 3: segmentation fine-tuning (CE + soft Dice) on the labelled fraction."""

    kind: Literal["seg_finetune"] = "seg_finetune"
    label_fraction: float = 1.0
    dice_weight: float = 1.0
    augment: bool = True
    lr: float = 5e-4
    schedule: Literal["cosine", "constant"] = "constant"  # as the reference fine-tuning code; cosine on request
    model: UNetSpec = field(default_factory=UNetSpec)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fraction("label_fraction", self.label_fraction)
        check(self.dice_weight >= 0, f"dice_weight must be >= 0, got {self.dice_weight}")


@dataclass(frozen=True)
class ClsPretrainConfig(_StageBase):
    """Stage 4: ResNet, SimCLR on all training images or MICLe on patient bags (methods §1a/§1c)."""

    kind: Literal["cls_pretrain"] = "cls_pretrain"
    method: Literal["simclr", "micle"] = "simclr"
    temperature: float = 0.1
    views: Literal["medical", "simclr"] = "medical"
    model: ResNetSpec = field(default_factory=ResNetSpec)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_temperature(self.temperature)


@dataclass(frozen=True)
class ClsFinetuneConfig(_StageBase):
    """Stage 5: classification fine-tuning on a label fraction: linear probe or full fine-tune."""

    kind: Literal["cls_finetune"] = "cls_finetune"
    protocol: Literal["linear", "full"] = "full"
    label_fraction: float = 1.0
    augment: bool = True
    schedule: Literal["cosine", "constant"] = "constant"  # as the reference fine-tuning code; cosine on request
    model: ResNetSpec = field(default_factory=ResNetSpec)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fraction("label_fraction", self.label_fraction)


StageConfig = GlobalPretrainConfig | LocalPretrainConfig | SegFinetuneConfig | ClsPretrainConfig | ClsFinetuneConfig

STAGE_CONFIGS: dict[str, type] = {
    "global_pretrain": GlobalPretrainConfig,
    "local_pretrain": LocalPretrainConfig,
    "seg_finetune": SegFinetuneConfig,
    "cls_pretrain": ClsPretrainConfig,
    "cls_finetune": ClsFinetuneConfig,
}

FINETUNE_KINDS = ("seg_finetune", "cls_finetune")  # end a method; report test/* (and shifted/*) after the last epoch


def stage_config_from_dict(data: dict[str, Any], *, path: str = "", source: str | None = None) -> StageConfig:
    """Build the stage config named by ``data["kind"]``; errors carry the key path."""
    kind = data.get("kind") if isinstance(data, dict) else None
    if kind not in STAGE_CONFIGS:
        where = f"{path}.kind" if path else "kind"
        raise ConfigError([f"{where}: must be one of {', '.join(map(repr, STAGE_CONFIGS))}, got {kind!r}"], source)
    return build(STAGE_CONFIGS[kind], data, path=path, source=source)
