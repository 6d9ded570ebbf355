"""Array helpers shared by the metrics: numpy views of tensors, NaN-skipping means."""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

__all__ = ["to_numpy", "nanmean"]


def to_numpy(name: str, value: Any) -> np.ndarray:
    """``value`` (tensor, array, list or tuple) as a numpy array; ``name`` is used in the TypeError."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, (list, tuple)):
        return np.asarray(value)
    raise TypeError(f"{name} must be a numpy array or torch tensor, got {type(value).__name__}")


def nanmean(values: np.ndarray) -> float:
    """Mean of the non-NaN entries, NaN when there are none."""
    return float(np.mean(values[~np.isnan(values)])) if np.any(~np.isnan(values)) else math.nan
