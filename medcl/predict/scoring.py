"""``medcl predict --labels``: per-case Dice (segmentation) or AUC (classification), and the test-slice panel.

Dice is taken on the written prediction against the label file, in the input's own grid:
per foreground class ``2|P ∩ T| / (|P| + |T|)`` (NaN when the class is in neither), and
the case's foreground mean over the classes that are not NaN. The panel is the one a
fine-tune logs (:mod:`medcl.train.figures.panel`): slices at the model's size, the label
resized as the ingest resizes masks, a seeded choice with the best and worst slices.
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["case_dice", "dice_summary", "read_class_labels", "auc_summary"]


def case_dice(prediction: np.ndarray, label: np.ndarray, num_classes: int) -> dict[int, float]:
    """Dice of each foreground class ``1..K-1`` of one case (NaN: the class is in neither)."""
    out = {}
    for c in range(1, num_classes):
        p, t = prediction == c, label == c
        total = int(p.sum()) + int(t.sum())
        out[c] = 2.0 * int((p & t).sum()) / total if total else math.nan
    return out


def dice_summary(rows: Sequence[Mapping[str, Any]], class_names: Sequence[str]) -> dict[str, Any]:
    """Mean (and std) over cases of each class's Dice and of the foreground mean, NaNs left out."""

    def stats(values: list[float]) -> dict[str, float | int | None]:
        v = np.array([x for x in values if not math.isnan(x)], dtype=np.float64)
        return {"mean": float(v.mean()) if v.size else None, "std": float(v.std()) if v.size else None,
                "cases": int(v.size)}

    return {"metric": "dice", "cases": len(rows), "foreground_mean": stats([r["dice_mean"] for r in rows]),
            "per_class": {name: stats([r[f"dice_{name}"] for r in rows]) for name in class_names}}


def read_class_labels(csv: str | Path, column: str, image_column: str, class_names: Sequence[str],
                      multilabel: bool) -> dict[Path, Any]:
    """Classification labels by image path (resolved against the CSV's folder).

    A cell holds a class name of the model or an integer index; for a multi-label model, names joined
    by ``|`` (multi-hot). Empty cells are skipped.

    Raises:
        ValueError: a missing column or file, or a label that is not one of the model's classes (names the row).
    """
    import pandas as pd

    csv = Path(csv).absolute()
    if not csv.is_file():
        raise FileNotFoundError(f"{csv}: --labels CSV not found")
    df = pd.read_csv(csv, dtype=str, keep_default_na=False)
    for col in (image_column, column):
        if col not in df.columns:
            raise ValueError(f"{csv}: no column {col!r}; columns are {list(df.columns)}")
    index = {n: i for i, n in enumerate(class_names)}
    out: dict[Path, Any] = {}
    for i, (image, cell) in enumerate(zip(df[image_column], df[column])):
        cell = cell.strip()
        if not cell:
            continue
        tokens = [t.strip() for t in cell.split("|")] if multilabel else [cell]
        found = [index.get(t, int(t) if t.isdigit() and int(t) < len(class_names) else None) for t in tokens]
        if None in found:
            raise ValueError(f"{csv} row {i + 2}: label {cell!r} is not one of the model's classes {list(class_names)}")
        target = np.isin(np.arange(len(class_names)), found).astype(np.int64) if multilabel else found[0]
        out[Path(os.path.normpath(csv.parent / image.strip())).resolve()] = target
    return out


def auc_summary(probs: np.ndarray, targets: np.ndarray, class_names: Sequence[str],
                multilabel: bool) -> dict[str, Any]:
    """Accuracy and ROC AUC (macro one-vs-rest, and per class) of the scored images."""
    import warnings

    from medcl.train.metrics.classification import classification_metrics

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = classification_metrics(probs, targets, multilabel, from_logits=False)
    per_class = {name: m.get(f"auc_class{k}") for k, name in enumerate(class_names) if f"auc_class{k}" in m}
    clean = {k: (None if isinstance(v, float) and math.isnan(v) else float(v)) for k, v in m.items()}
    return {"metric": "auc", "cases": int(len(targets)), "auc": clean.get("auc"), "accuracy": clean.get("accuracy"),
            "per_class": {k: (None if v is None or math.isnan(v) else float(v)) for k, v in per_class.items()}}

