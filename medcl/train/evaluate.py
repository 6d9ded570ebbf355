"""Evaluation after training: segmentation Dice (pooled 2D and per-volume 3D) and classification metrics
(per image and per patient), and, on request, their figures (:mod:`medcl.train.figures`).

Runs on rank 0 with the unwrapped model over the whole evaluation stream. A figure is drawn
from the same pass: the segmentation panel keeps at most ``2k`` slices
(:class:`~medcl.train.figures.PanelCases`), the ROC curves the probabilities the metrics
already hold. A figure that cannot be drawn is a warning, never a lost evaluation.
"""
from __future__ import annotations

import logging
import os
import warnings
from typing import Any, Callable

import numpy as np
import torch

from medcl.train.metrics import DiceAccumulator, classification_metrics, patient_metrics

__all__ = ["evaluate_segmentation", "evaluate_classification", "PANEL_SEED"]

logger = logging.getLogger(__name__)

#: Seed of the panel's choice of slices: fixed, so every run on a test set shows the same seeded slices.
PANEL_SEED = 0


def _draw(what: str, path: str | os.PathLike[str], draw: Callable[[], Any]) -> None:
    try:
        with warnings.catch_warnings():  # what a figure would warn about (one-class AUC), the metrics already did
            warnings.simplefilter("ignore")
            draw()
    except Exception:  # a figure is a view of the metrics: never lose the evaluation to it
        logger.warning("could not draw the %s %s", what, os.fspath(path), exc_info=True)


@torch.no_grad()
def evaluate_segmentation(model: torch.nn.Module, stream: Any, num_classes: int, device: torch.device,
                          batch_size: int = 64, prefix: str = "test", *, panel: str | os.PathLike[str] | None = None,
                          class_names: Any = None) -> dict[str, float]:
    """Dice per foreground class over an evaluation stream.

    Args:
        model: ``(B, C, H, W) -> (B, K, H, W)`` logits.
        stream: Ray Dataset of evaluation slices with ``image``, ``mask``, ``volume_id``, ``slice_index``.
        num_classes: K, background included.
        panel: Also write a PNG of 6 slices, the best and worst by Dice among them, here
            (:func:`~medcl.train.figures.segmentation_panel`, seed :data:`PANEL_SEED`; case ids
            ``"<volume_id>:<slice_index>"``). None: no figure.
        class_names: Legend names of the panel's classes (``{index: name}``).

    Returns:
        ``{prefix}/dice_2d`` (pooled over slices, mean over foreground classes, the paper's form),
        ``{prefix}/dice_3d_mean`` and ``_std`` (per-volume 3D Dice over volumes), and per-class values.
    """
    was_training = model.training
    model.eval()
    acc = DiceAccumulator(num_classes=num_classes)
    cases = None
    if panel is not None:
        from medcl.train.figures import PanelCases

        cases = PanelCases(num_classes, seed=PANEL_SEED)
    for batch in stream.iter_batches(batch_size=batch_size, batch_format="numpy"):
        images = torch.as_tensor(np.ascontiguousarray(batch["image"]), device=device)
        pred = model(images).argmax(dim=1).cpu().numpy()
        acc.update(pred, batch["mask"], volume_ids=batch["volume_id"])
        if cases is not None:
            volumes, slices = np.asarray(batch["volume_id"]).tolist(), np.asarray(batch["slice_index"]).tolist()
            cases.update(batch["image"], batch["mask"], pred, [f"{v}:{i}" for v, i in zip(volumes, slices)])
    model.train(was_training)
    metrics = {f"{prefix}/{k}": float(v) for k, v in acc.compute().items()}
    if cases is not None:
        _draw("segmentation panel", panel, lambda: cases.panel(panel, class_names=class_names))
    return metrics


@torch.no_grad()
def evaluate_classification(model: torch.nn.Module, stream: Any, device: torch.device, multilabel: bool,
                            batch_size: int = 256, prefix: str = "test", *,
                            roc: str | os.PathLike[str] | None = None, class_names: Any = None) -> dict[str, float]:
    """Top-1 accuracy and AUC (mean AUC for multi-label) over an evaluation stream, per image and per patient.

    Args:
        model: ``(B, C, H, W) -> (B, K)`` logits.
        stream: Ray Dataset of evaluation images with ``image``, ``class_label`` (``class_labels``
            when ``multilabel``) and ``patient_id``.
        multilabel: Sigmoid per target instead of softmax over classes.
        roc: Also write a PNG of the ROC curves here, per image and per patient
            (:func:`~medcl.train.figures.roc_figure`). None: no figure.
        class_names: Legend names of the classes / targets, by index.

    Returns:
        ``{prefix}/accuracy``, ``{prefix}/auc`` (and ``auc_class{k}``) over images, and the same
        over patients, each scored by the mean of its images' probabilities:
        ``{prefix}/patient_accuracy``, ``{prefix}/patient_auc`` (and ``patient_auc_class{k}``)
        (:func:`~medcl.train.metrics.patient_metrics`). ``{}`` for an empty stream.
    """
    was_training = model.training
    model.eval()
    probs, targets, patients = [], [], []
    key = "class_labels" if multilabel else "class_label"
    for batch in stream.iter_batches(batch_size=batch_size, batch_format="numpy"):
        images = torch.as_tensor(np.ascontiguousarray(batch["image"]), device=device)
        logits = model(images).float()
        probs.append((torch.sigmoid(logits) if multilabel else torch.softmax(logits, dim=1)).cpu().numpy())
        targets.append(np.asarray(batch[key]))
        patients.append(np.asarray(batch["patient_id"]))
    model.train(was_training)
    if not probs:
        return {}
    scores, labels = np.concatenate(probs), np.concatenate(targets)
    metrics = classification_metrics(scores, labels, multilabel=multilabel, from_logits=False)
    patient_ids = np.concatenate(patients)
    metrics.update(patient_metrics(scores, labels, patient_ids, multilabel=multilabel))
    if roc is not None:
        from medcl.train.figures import roc_figure

        _draw("ROC figure", roc, lambda: roc_figure(scores, labels, roc, patient_ids=patient_ids,
                                                    multilabel=multilabel, class_names=class_names))
    return {f"{prefix}/{k}": float(v) for k, v in metrics.items()}
