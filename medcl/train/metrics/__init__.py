"""Evaluation metrics: segmentation Dice (:mod:`.dice`) and classification accuracy / AUC (:mod:`.classification`)."""
from __future__ import annotations

from medcl.train.metrics.classification import classification_metrics
from medcl.train.metrics.dice import DiceAccumulator, PooledDice, VolumeDice

__all__ = ["DiceAccumulator", "PooledDice", "VolumeDice", "classification_metrics"]
