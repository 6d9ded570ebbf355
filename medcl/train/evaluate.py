"""Evaluation after training: segmentation Dice (pooled 2D and per-volume 3D) and classification metrics
(per image and per patient).

Runs on rank 0 with the unwrapped model over the whole evaluation stream.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from medcl.train.metrics import DiceAccumulator, classification_metrics, patient_metrics

__all__ = ["evaluate_segmentation", "evaluate_classification"]


@torch.no_grad()
def evaluate_segmentation(model: torch.nn.Module, stream: Any, num_classes: int, device: torch.device,
                          batch_size: int = 64, prefix: str = "test") -> dict[str, float]:
    """Dice per foreground class over an evaluation stream.

    Args:
        model: ``(B, C, H, W) -> (B, K, H, W)`` logits.
        stream: Ray Dataset of evaluation slices with ``image``, ``mask``, ``volume_id``, ``slice_index``.
        num_classes: K, background included.

    Returns:
        ``{prefix}/dice_2d`` (pooled over slices, mean over foreground classes, the paper's form),
        ``{prefix}/dice_3d_mean`` and ``_std`` (per-volume 3D Dice over volumes), and per-class values.
    """
    was_training = model.training
    model.eval()
    acc = DiceAccumulator(num_classes=num_classes)
    for batch in stream.iter_batches(batch_size=batch_size, batch_format="numpy"):
        images = torch.as_tensor(np.ascontiguousarray(batch["image"]), device=device)
        pred = model(images).argmax(dim=1).cpu().numpy()
        acc.update(pred, batch["mask"], volume_ids=batch["volume_id"])
    model.train(was_training)
    return {f"{prefix}/{k}": float(v) for k, v in acc.compute().items()}


@torch.no_grad()
def evaluate_classification(model: torch.nn.Module, stream: Any, device: torch.device, multilabel: bool,
                            batch_size: int = 256, prefix: str = "test") -> dict[str, float]:
    """Top-1 accuracy and AUC (mean AUC for multi-label) over an evaluation stream, per image and per patient.

    Args:
        model: ``(B, C, H, W) -> (B, K)`` logits.
        stream: Ray Dataset of evaluation images with ``image``, ``class_label`` (``class_labels``
            when ``multilabel``) and ``patient_id``.
        multilabel: Sigmoid per target instead of softmax over classes.

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
    metrics.update(patient_metrics(scores, labels, np.concatenate(patients), multilabel=multilabel))
    return {f"{prefix}/{k}": float(v) for k, v in metrics.items()}
