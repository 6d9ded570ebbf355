"""Patient-level classification metrics: a patient's score is the mean of its images' probabilities.

The class label of the cohorts is per patient, but a positive patient's images
do not all show the finding (on the synthetic cohort ~80 % show the lesion), so
a per-image AUC is capped below 1 even for a perfect reader. Averaging each
patient's image probabilities (per class, or per target for multi-label) and
scoring one row per patient gives the metric that matches the label (Azizi et
al. 2021 report patient-level results for multi-image cases).

A patient's label is what its rows say. When they disagree (datasets with
per-image labels, e.g. an ``image_folder`` CSV), it is the label most of its
rows carry, ties going to the higher class index (for a 0/1 target: to
positive); such patients are counted in one warning.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch

from medcl.train.metrics._arrays import to_numpy
from medcl.train.metrics.classification import classification_metrics

__all__ = ["PATIENT_PREFIX", "patient_level", "patient_metrics"]

#: Name prefix of the patient-level metrics: ``patient_accuracy``, ``patient_auc``, ``patient_auc_class{k}``.
PATIENT_PREFIX = "patient_"


def _majority(counts: np.ndarray) -> np.ndarray:
    """Per row of ``counts`` (P, K), the column with the most counts; ties to the highest column."""
    k = counts.shape[1]
    return (k - 1 - np.argmax(counts[:, ::-1], axis=1)).astype(np.int64)


def patient_level(
    probs: np.ndarray | torch.Tensor,
    targets: np.ndarray | torch.Tensor,
    patient_ids: np.ndarray | list[str],
    multilabel: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One row per patient: the mean of its images' probabilities and its label.

    Args:
        probs: Image probabilities (not logits). Shape: (N,) binary, (N, K) softmax or, multi-label, sigmoid.
        targets: Image labels: class indices (N,), or 0/1 (N, K) when ``multilabel``.
        patient_ids: The patient of each image. Shape: (N,).
        multilabel: Whether the K outputs are independent binary targets.

    Returns:
        ``(ids, mean_probs, labels)``: sorted patient ids (P,), mean probabilities (P,) or (P, K),
        patient labels (P,) or (P, K): the majority of the patient's rows (per target for
        multi-label), ties to the higher class index / to 1.

    Raises:
        ValueError: On shape mismatch, probabilities outside [0, 1] or invalid targets.
    """
    s = to_numpy("probs", probs).astype(np.float64)
    y = to_numpy("targets", targets)
    ids = np.asarray([str(p) for p in to_numpy("patient_ids", patient_ids).reshape(-1)], dtype=object)
    if s.ndim not in (1, 2) or s.shape[0] == 0:
        raise ValueError(f"probs must have shape (N,) or (N, K) with N > 0, got {tuple(s.shape)}")
    if ids.shape[0] != s.shape[0] or y.shape[0] != s.shape[0]:
        raise ValueError(f"probs, targets and patient_ids must have the same length N, got {s.shape[0]}, "
                         f"{y.shape[0]} and {ids.shape[0]}")
    if not np.all(np.isfinite(s)) or s.min() < 0 or s.max() > 1:
        raise ValueError("probs must be probabilities in [0, 1] (apply softmax/sigmoid to logits first)")
    if not np.issubdtype(y.dtype, np.integer) and not np.all(y == np.round(y)):
        raise ValueError(f"targets must be integer class indices or 0/1, got {y.dtype} values {np.unique(y)[:10]}")
    if y.size and y.min() < 0:
        raise ValueError(f"targets must not be negative, got {np.unique(y)[:10]}")
    y = y.astype(np.int64)
    uniq, inv = np.unique(ids, return_inverse=True)
    n = np.bincount(inv, minlength=len(uniq)).astype(np.float64)
    sums = np.zeros((len(uniq),) + s.shape[1:])
    np.add.at(sums, inv, s)
    mean = sums / n.reshape((-1,) + (1,) * (s.ndim - 1))
    if multilabel:
        if y.ndim != 2 or not np.all((y == 0) | (y == 1)):
            raise ValueError(f"multi-label targets must be 0/1 of shape (N, K), got shape {y.shape}")
        positives = np.zeros((len(uniq), y.shape[1]))
        np.add.at(positives, inv, y)
        labels = (2 * positives >= n[:, None]).astype(np.int64)
        mixed = np.any((positives > 0) & (positives < n[:, None]), axis=1)
    else:
        if y.ndim != 1:
            raise ValueError(f"targets must be class indices of shape (N,), got shape {y.shape}")
        counts = np.zeros((len(uniq), int(y.max()) + 1))
        np.add.at(counts, (inv, y), 1)
        labels = _majority(counts)
        mixed = counts.max(axis=1) < n
    if mixed.any():
        warnings.warn(f"{int(mixed.sum())} of {len(uniq)} patients have images with different labels "
                      f"(first: {', '.join(uniq[mixed][:3])}); each is scored with the label most of its images "
                      "carry (ties: the higher class index / positive)", stacklevel=2)
    return uniq, mean, labels


def patient_metrics(
    probs: np.ndarray | torch.Tensor,
    targets: np.ndarray | torch.Tensor,
    patient_ids: np.ndarray | list[str],
    multilabel: bool = False,
) -> dict[str, float]:
    """Top-1 accuracy and AUC over patients, each scored by the mean of its images' probabilities.

    The patients' mean probabilities and labels (:func:`patient_level`) go through
    :func:`~medcl.train.metrics.classification_metrics`, so the rules are the image-level
    ones: one-vs-rest macro AUC for multi-class (binary AUC of class 1 for K = 2),
    mean per-target AUC for multi-label, a class whose patients all share one label
    skipped with a warning (NaN; ``patient_auc`` NaN if all are).

    Args:
        probs: Image probabilities. Shape: (N,) or (N, K).
        targets: Image labels. Shape: (N,) class indices, or (N, K) 0/1 when ``multilabel``.
        patient_ids: The patient of each image. Shape: (N,).
        multilabel: Whether the K outputs are independent binary targets.

    Returns:
        ``{"patient_accuracy": ..., "patient_auc": ...}`` plus ``patient_auc_class{k}`` where
        :func:`~medcl.train.metrics.classification_metrics` gives ``auc_class{k}``.

    Example:
        >>> patient_metrics(np.array([0.2, 0.6, 0.7, 0.9]), np.array([0, 0, 1, 1]), ["a", "a", "b", "b"])
        {'patient_accuracy': 1.0, 'patient_auc': 1.0}
    """
    _, mean, labels = patient_level(probs, targets, patient_ids, multilabel)
    metrics = classification_metrics(mean, labels, multilabel=multilabel, from_logits=False)
    return {f"{PATIENT_PREFIX}{k}": v for k, v in metrics.items()}
