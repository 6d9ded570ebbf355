"""Training infrastructure shared by every stage: metrics, checkpoints, LR schedule, runtime helpers.

Nothing here imports Ray at import time; the stage modules, the driver and the
loop (which do) are imported by name.
"""
from __future__ import annotations

from medcl.train.checkpoints import (
    load_checkpoint,
    load_model_weights,
    save_checkpoint,
)
from medcl.train.metrics import (
    DiceAccumulator,
    PooledDice,
    VolumeDice,
    classification_metrics,
    pooled_dice_2d,
    volume_dice_3d,
)
from medcl.train.runtime import (
    autocast_context,
    is_rank_zero,
    prepare_model_for_device,
    rank,
    seed_everything,
    unwrap,
    world_size,
)
from medcl.train.schedule import warmup_cosine

__all__ = [
    "DiceAccumulator",
    "PooledDice",
    "VolumeDice",
    "autocast_context",
    "classification_metrics",
    "is_rank_zero",
    "load_checkpoint",
    "load_model_weights",
    "pooled_dice_2d",
    "prepare_model_for_device",
    "rank",
    "save_checkpoint",
    "seed_everything",
    "unwrap",
    "volume_dice_3d",
    "warmup_cosine",
    "world_size",
]
