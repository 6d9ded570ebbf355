"""ROC curves of a classifier, per image and per patient, titled with their AUC values.

The curves follow the rules of :func:`medcl.train.metrics.classification_metrics`, so a
figure's AUC values are the logged ones: scores ``(N,)`` or two classes ``(N, 2)``: one
curve (class 1 against 0); ``K > 2`` classes: one one-vs-rest curve per class, titled
with their mean (macro) AUC; multi-label ``(N, K)``: one curve per target. A class whose
targets hold a single value has no curve (its legend entry says so; it is left out of
the mean). Per patient, each patient is scored by the mean of its images' probabilities
against its label (:func:`medcl.train.metrics.patient_level`).

A curve has a point at every distinct score, from (0, 0) to (1, 1), joined by straight
lines (ties make a diagonal step): the points of scikit-learn's
``roc_curve(..., drop_intermediate=False)``, and the area under them is the
Mann-Whitney AUC (ties count one half), ``roc_auc_score``.
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medcl.train.figures._png import new_figure, save_png
from medcl.train.metrics import patient_level

__all__ = ["RocCurve", "roc_points", "roc_curves", "draw_roc", "roc_figure"]

_PANEL_IN, _DPI = 4.2, 100


@dataclass(frozen=True)
class RocCurve:
    """One drawn curve.

    Attributes:
        label: Class or target name.
        fpr, tpr: The points, from (0, 0) to (1, 1); empty when the targets hold a single value.
        auc: Area under the points; NaN without a curve.
    """

    label: str
    fpr: np.ndarray
    tpr: np.ndarray
    auc: float


def roc_points(scores: Any, positives: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """False and true positive rates at every distinct score, highest first, from (0, 0).

    Args:
        scores: Higher means more likely positive. Shape: (N,).
        positives: 1 (or True) for a positive. Shape: (N,).

    Returns:
        ``(fpr, tpr, thresholds)``, each ``(T + 1,)`` for T distinct scores; ``thresholds[0]`` is ``inf``.

    Raises:
        ValueError: Shapes differ, scores are not finite, or the targets hold a single value.
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(positives).reshape(-1) == 1
    if s.size != y.size or not np.all(np.isfinite(s)):
        raise ValueError(f"scores must be finite and as long as positives, got {s.size} scores ({y.size} targets)")
    if y.all() or not y.any():
        raise ValueError("a ROC curve needs positives and negatives; the targets hold a single value")
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]  # the last index of each distinct score
    tps = np.cumsum(y)[last]
    fps = last + 1 - tps
    return np.r_[0, fps] / fps[-1], np.r_[0, tps] / tps[-1], np.r_[np.inf, s[last]]


def _curve(label: str, scores: np.ndarray, positives: np.ndarray) -> RocCurve:
    if np.unique(positives).size < 2:
        return RocCurve(f"{label} (n/a: one class)", np.empty(0), np.empty(0), math.nan)
    fpr, tpr, _ = roc_points(scores, positives)
    return RocCurve(label, fpr, tpr, float(np.trapezoid(tpr, fpr)))


def _name(class_names: Sequence[str] | None, k: int) -> str:
    return str(class_names[k]) if class_names is not None and k < len(class_names) else f"class {k}"


def roc_curves(probs: Any, targets: Any, multilabel: bool = False,
               class_names: Sequence[str] | None = None) -> list[RocCurve]:
    """The curves of one level (images or patients), by the rules in the module doc.

    Args:
        probs: Probabilities (any per-column ranking score). Shape: (N,), (N, K), or (N, K) multi-label.
        targets: Class indices (N,), or 0/1 (N, K) when ``multilabel``.
        multilabel: Whether the K outputs are independent binary targets.
        class_names: Names by class index / target column (default ``class k``).

    Raises:
        ValueError: Shapes do not match.
    """
    s = np.asarray(probs, dtype=np.float64)
    y = np.asarray(targets)
    if s.ndim == 2 and s.shape[1] == 1 and not multilabel:
        s = s[:, 0]
    expected = s.shape if multilabel else s.shape[:1]
    if s.ndim not in (1, 2) or s.shape[0] == 0 or y.shape != expected:
        raise ValueError(f"probs must be (N,) or (N, K) with N > 0 and targets {expected}, got probs {s.shape} "
                         f"and targets {y.shape}")
    if s.ndim == 1:
        return [_curve(_name(class_names, 1), s, y)]
    if multilabel:
        return [_curve(_name(class_names, k), s[:, k], y[:, k]) for k in range(s.shape[1])]
    if s.shape[1] == 2:
        return [_curve(f"{_name(class_names, 1)} vs {_name(class_names, 0)}", s[:, 1], (y == 1).astype(int))]
    return [_curve(_name(class_names, k), s[:, k], (y == k).astype(int)) for k in range(s.shape[1])]


def _title(level: str, n: int, curves: list[RocCurve]) -> str:
    aucs = [c.auc for c in curves if math.isfinite(c.auc)]
    if not aucs:
        return f"{level} (n={n}): AUC n/a"
    if len(curves) == 1:
        return f"{level} (n={n}): AUC {aucs[0]:.3f}"
    return f"{level} (n={n}): macro AUC {np.mean(aucs):.3f}"


def draw_roc(probs: Any, targets: Any, *, patient_ids: Any = None, multilabel: bool = False,
             class_names: Sequence[str] | None = None) -> Any:
    """A figure of the ROC curves per image and, with ``patient_ids``, per patient beside them.

    Each axes is titled with its level, its count and its AUC (macro AUC for several curves);
    each curve's legend entry holds its own AUC. The chance diagonal is the axes' first line
    (label ``_chance``); the curves follow in :func:`roc_curves` order.

    Args:
        probs, targets, multilabel, class_names: See :func:`roc_curves`; ``probs`` are probabilities
            in [0, 1] when ``patient_ids`` is given.
        patient_ids: The patient of each image, shape (N,), for the per-patient curves
            (:func:`~medcl.train.metrics.patient_level`); None: images only.

    Returns:
        A ``matplotlib.figure.Figure``, 420 px wide per level and 440 px high.
    """
    levels = [("per image", probs, targets)]
    if patient_ids is not None:
        ids, mean, labels = patient_level(probs, targets, patient_ids, multilabel)
        levels.append(("per patient", mean, labels))
    fig = new_figure(_PANEL_IN * len(levels), _PANEL_IN + 0.2, _DPI)
    for i, (level, s, y) in enumerate(levels):
        curves = roc_curves(s, y, multilabel, class_names)
        ax = fig.add_subplot(1, len(levels), i + 1)
        ax.plot([0, 1], [0, 1], linestyle="--", color="0.6", linewidth=0.8, label="_chance")
        for curve in curves:
            if curve.fpr.size:
                ax.plot(curve.fpr, curve.tpr, linewidth=1.4, label=f"{curve.label} (AUC {curve.auc:.3f})")
            else:
                ax.plot([], [], linewidth=1.4, label=curve.label)
        ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), aspect="equal", xlabel="false positive rate",
               ylabel="true positive rate")
        ax.set_title(_title(level, len(np.asarray(y)), curves), fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    return fig


def roc_figure(probs: Any, targets: Any, path: str | os.PathLike[str], *, patient_ids: Any = None,
               multilabel: bool = False, class_names: Sequence[str] | None = None) -> Path:
    """Write :func:`draw_roc`'s figure as a PNG, atomically (temp name + ``os.replace``).

    ``patient_ids`` given: the per-patient curves beside the per-image ones (the patient
    level of :func:`medcl.train.metrics.patient_metrics`).

    Raises:
        ValueError: Shapes do not match, or ``path`` is not a ``.png``.

    Example:
        >>> roc_figure(probs, labels, "roc_test.png", patient_ids=patients)  # doctest: +SKIP
    """
    return save_png(draw_roc(probs, targets, patient_ids=patient_ids, multilabel=multilabel,
                             class_names=class_names), path)
