"""Evaluation metrics: segmentation Dice (:mod:`.dice`), classification accuracy / AUC (:mod:`.classification`)
per image and per patient (:mod:`.patients`)."""
from __future__ import annotations

from medcl.train.metrics.classification import classification_metrics
from medcl.train.metrics.dice import DiceAccumulator, PooledDice, VolumeDice
from medcl.train.metrics.patients import patient_level, patient_metrics

__all__ = ["DiceAccumulator", "PooledDice", "VolumeDice", "classification_metrics", "patient_level", "patient_metrics"]
