"""Batch prediction with an exported model (``medcl predict``): inputs, the Ray Data run, outputs, ``--labels``."""
from __future__ import annotations

from medcl.predict.core import PredictResult, model_directory, predict

__all__ = ["PredictResult", "model_directory", "predict"]
