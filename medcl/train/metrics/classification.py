"""Classification metrics: top-1 accuracy and ROC AUC (binary, multi-class one-vs-rest, multi-label).

Mann-Whitney form of AUC: the probability that a random positive scores above
a random negative, ties counting one half (scikit-learn's ``roc_auc_score``).
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import torch

from medcl.train.metrics._arrays import nanmean, to_numpy

__all__ = ["classification_metrics"]


def _binary_auc(y: np.ndarray, s: np.ndarray, what: str) -> float:
    if np.unique(y).size < 2:
        warnings.warn(f"AUC undefined for {what}: only one class present in targets; skipped", stacklevel=3)
        return math.nan
    from sklearn.metrics import roc_auc_score  # lazy: importing scikit-learn costs ~2 s

    return float(roc_auc_score(y, s))


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def classification_metrics(
    probs_or_logits: np.ndarray | torch.Tensor,
    targets: np.ndarray | torch.Tensor,
    multilabel: bool = False,
    *,
    from_logits: bool | None = None,
) -> dict[str, float]:
    """Top-1 accuracy and ROC AUC for binary, multi-class or multi-label outputs.

    * binary, scores (N,) or (N, 1): positive-class probability or logit;
      accuracy thresholds the probability at 0.5; AUC on the scores.
    * multi-class, scores (N, K), targets (N,) ints in [0, K): accuracy of the
      argmax; AUC one-vs-rest on softmax probabilities, macro-averaged (for K = 2
      the binary AUC of class 1); per-class ``auc_class{k}`` too when K > 2.
    * multi-label (``multilabel=True``), scores and targets (N, K), targets 0/1:
      accuracy is the mean per-label accuracy at probability 0.5; AUC is the
      mean over targets of each target's AUC, with ``auc_class{k}`` per target.

    A class/target whose targets hold a single value has no AUC: it is skipped
    with a warning (NaN in its ``auc_class{k}``); ``auc`` is NaN if all are.

    Args:
        probs_or_logits: Model outputs, probabilities or logits (see shapes above).
        targets: Ground truth (see shapes above); negative labels are refused.
        multilabel: Whether the K outputs are independent binary targets.
        from_logits: True: apply softmax/sigmoid; False: already probabilities;
            None: probabilities if all values lie in [0, 1] (and, multi-class,
            rows sum to 1), else logits.

    Returns:
        ``{"accuracy": ..., "auc": ...}`` plus ``auc_class{k}`` entries as above.

    Raises:
        ValueError: On shape mismatch, non-finite scores or invalid targets.
    """
    s = to_numpy("probs_or_logits", probs_or_logits).astype(np.float64)
    y = to_numpy("targets", targets)
    if not isinstance(multilabel, bool):
        raise TypeError(f"multilabel must be a bool, got {type(multilabel).__name__} {multilabel!r}")
    if s.ndim == 2 and s.shape[1] == 1 and not multilabel:
        s = s[:, 0]
    if s.ndim not in (1, 2) or s.shape[0] == 0:
        raise ValueError(f"probs_or_logits must have shape (N,) or (N, K) with N > 0, got {tuple(s.shape)}")
    if not np.all(np.isfinite(s)):
        raise ValueError("probs_or_logits contains NaN or infinite values")
    expected = s.shape if multilabel else s.shape[:1]
    if y.shape != expected:
        raise ValueError(
            f"targets must have shape {expected} for probs_or_logits {tuple(s.shape)}, got {tuple(y.shape)}"
        )
    in_unit = bool(np.all((s >= 0) & (s <= 1)))

    if multilabel or s.ndim == 1:
        if not np.all((y == 0) | (y == 1)):
            raise ValueError(f"targets must be 0/1 for binary or multi-label outputs, got values {np.unique(y)[:10]}")
        y = y.astype(np.int64)
        probs = 1.0 / (1.0 + np.exp(-s)) if (from_logits or (from_logits is None and not in_unit)) else s
        out = {"accuracy": float(np.mean((probs >= 0.5) == (y == 1)))}
        if s.ndim == 1:
            out["auc"] = _binary_auc(y, s, "the binary target")
            return out
        per = [_binary_auc(y[:, k], s[:, k], f"target {k}") for k in range(s.shape[1])]
    else:
        k_classes = s.shape[1]
        if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= k_classes:
            raise ValueError(
                f"targets must be integer class indices in [0, {k_classes}), got {y.dtype} {np.unique(y)[:10]}"
            )
        is_probs = in_unit and bool(np.allclose(s.sum(axis=1), 1.0, atol=1e-3))
        probs = _softmax(s) if (from_logits or (from_logits is None and not is_probs)) else s
        out = {"accuracy": float(np.mean(np.argmax(s, axis=1) == y))}
        if k_classes == 2:
            out["auc"] = _binary_auc((y == 1).astype(np.int64), probs[:, 1], "class 1 vs 0")
            return out
        per = [
            _binary_auc((y == k).astype(np.int64), probs[:, k], f"class {k} (one-vs-rest)") for k in range(k_classes)
        ]
    out.update({f"auc_class{k}": a for k, a in enumerate(per)})
    out["auc"] = nanmean(np.asarray(per))
    return out
