"""Training infrastructure shared by every stage: metrics, checkpoints, LR schedule, runtime helpers.

Nothing here imports Ray at import time; the stages, the driver and the loop
(which do) are imported by name.
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
    patient_metrics,
)
from medcl.train.runtime import (
    autocast_context,
    prepare_model_for_device,
    seed_everything,
    unwrap,
)
from medcl.train.schedule import warmup_cosine

__all__ = [
    "DiceAccumulator",
    "PooledDice",
    "VolumeDice",
    "autocast_context",
    "classification_metrics",
    "load_checkpoint",
    "load_model_weights",
    "patient_metrics",
    "prepare_model_for_device",
    "save_checkpoint",
    "seed_everything",
    "unwrap",
    "warmup_cosine",
]
