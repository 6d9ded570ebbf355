"""Patient-level classification metrics (issue 15, item 3): a patient scores the mean of its images' probabilities.

References here are independent of medcl: a per-patient loop over a dict of
lists, and scikit-learn's ``roc_auc_score`` (or Mann-Whitney counts by hand).
The evaluation runs :func:`medcl.train.evaluate.evaluate_classification` on a
plain object with ``iter_batches`` (no Ray) and a model whose logits are its
input pixels, so that the probabilities are chosen by the test. The registry
(``medcl/config/metrics.py``) and the best-epoch record
(``medcl/train/selection.py``) are checked without training; a real
fine-tune's ``test/`` and ``shifted/`` patient AUC is checked in
tests/train/test_stages.py and every declared name in
tests/config/test_logged_metrics.py.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from medcl.config import ClsFinetuneConfig, SegFinetuneConfig
from medcl.config.metrics import check_metric, stage_metrics, validation_metric
from medcl.train.evaluate import evaluate_classification
from medcl.train.metrics import classification_metrics, patient_level, patient_metrics
from medcl.train.selection import BestEpoch

# 4 patients, 2-3 images each: per image AUC 20/25 = 0.8, per patient 1.0 (see the hand count below)
HAND_IDS = ["n1", "n1", "n2", "n2", "n2", "p1", "p1", "p2", "p2", "p2"]
HAND_P = np.array([0.2, 0.6, 0.1, 0.3, 0.45, 0.9, 0.35, 0.7, 0.55, 0.31])
HAND_Y = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1, 1])


def _reference(probs: np.ndarray, targets: np.ndarray, ids: list[str]):
    """Per patient, in first-seen order: mean probabilities and the label all its rows share."""
    rows: dict[str, list[int]] = {}
    for i, pid in enumerate(ids):
        rows.setdefault(pid, []).append(i)
    means = np.stack([probs[r].mean(axis=0) for r in rows.values()])
    labels = []
    for r in rows.values():
        assert all(np.array_equal(targets[i], targets[r[0]]) for i in r)
        labels.append(targets[r[0]])
    return means, np.asarray(labels)


class _Stream:
    """What ``evaluate_classification`` reads of a Ray Dataset: numpy batches."""

    def __init__(self, batches: list[dict]) -> None:
        self.batches = batches

    def iter_batches(self, batch_size, batch_format):
        assert batch_format == "numpy"
        yield from self.batches


class _PixelLogits(nn.Module):
    """Logits = the input pixels: images (B, K, 1, 1) -> (B, K)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


def _logit(p: np.ndarray) -> np.ndarray:
    return np.log(p / (1 - p))


def _batches(images: np.ndarray, key: str, targets: np.ndarray, ids: list[str], cut: int) -> _Stream:
    """Two batches split at ``cut`` (a patient spans both), images (N, K) as (N, K, 1, 1) float32."""
    x = images.astype(np.float32)[:, :, None, None]
    ids = np.asarray(ids, dtype=object)
    return _Stream([{"image": x[s], key: targets[s], "patient_id": ids[s]} for s in (slice(0, cut), slice(cut, None))])


# ----------------------------------------------------------------------------- hand example
def test_hand_example_per_patient_auc_differs_from_per_image_auc_through_the_evaluation():
    # per image: positives 0.9 > 5 negatives, 0.35 > 3 (0.2, 0.1, 0.3), 0.7 > 5, 0.55 > 4 (all but 0.6),
    # 0.31 > 3 -> 20 of 25 pairs
    # per patient: means n1 0.4, n2 0.2833, p1 0.625, p2 0.52 -> both positives above both negatives: 1.0;
    # thresholded at 0.5 all four right; per image 0.6, 0.35, 0.31 are wrong -> 7/10
    two_class = np.stack([np.zeros_like(HAND_P), _logit(HAND_P)], axis=1)  # softmax[:, 1] == HAND_P
    stream = _batches(two_class, "class_label", HAND_Y, HAND_IDS, cut=4)  # n2 spans both batches
    out = evaluate_classification(_PixelLogits(), stream, torch.device("cpu"), multilabel=False, prefix="shifted")
    assert out == pytest.approx({"shifted/accuracy": 0.7, "shifted/auc": 0.8,
                                 "shifted/patient_accuracy": 1.0, "shifted/patient_auc": 1.0})
    means, labels = _reference(HAND_P, HAND_Y, HAND_IDS)
    assert means == pytest.approx([0.4, 0.85 / 3, 0.625, 1.56 / 3])
    assert roc_auc_score(labels, means) == 1.0 and roc_auc_score(HAND_Y, HAND_P) == pytest.approx(0.8)


def test_per_patient_auc_can_also_be_below_the_per_image_one():
    # n: (0.1, 0.9) mean 0.5; p: (0.6, 0.4) mean 0.5 and q: (0.45, 0.45) -> per patient 0.5 > nothing: ties
    ids, p = ["n", "n", "p", "p", "q", "q"], np.array([0.1, 0.9, 0.6, 0.4, 0.45, 0.45])
    y = np.array([0, 0, 1, 1, 1, 1])
    # per image: negatives 0.1, 0.9; each positive beats 0.1 only -> 4 of 8 = 0.5; per patient: n 0.5 vs
    # p 0.5 (tie, 1/2) and q 0.45 (below) -> 0.25
    out = patient_metrics(p, y, ids)
    assert out["patient_auc"] == pytest.approx(0.25)
    assert classification_metrics(p, y)["auc"] == pytest.approx(0.5)
    means, labels = _reference(p, y, ids)
    assert out["patient_auc"] == pytest.approx(roc_auc_score(labels, means))


# ----------------------------------------------------------------------------- against scikit-learn
def test_multiclass_patient_auc_is_the_one_vs_rest_macro_auc_of_patient_means():
    rng = np.random.default_rng(0)
    labels = np.arange(15) % 3
    sizes = rng.integers(1, 5, size=15)
    ids = [f"pt{i:02d}" for i, n in enumerate(sizes) for _ in range(n)][::-1]  # unsorted rows
    y = np.repeat(labels, sizes)[::-1]
    logits = rng.normal(size=(len(y), 3)) + 0.8 * np.eye(3)[y]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    stream = _batches(np.log(probs), "class_label", y, ids, cut=7)
    out = evaluate_classification(_PixelLogits(), stream, torch.device("cpu"), multilabel=False)
    means, plabels = _reference(probs, y, ids)
    assert out["test/patient_auc"] == pytest.approx(roc_auc_score(plabels, means, multi_class="ovr"))
    for k in range(3):
        assert out[f"test/patient_auc_class{k}"] == pytest.approx(roc_auc_score(plabels == k, means[:, k]))
        assert out[f"test/auc_class{k}"] == pytest.approx(roc_auc_score(y == k, probs[:, k]))  # per image unchanged
    assert out["test/patient_accuracy"] == pytest.approx(np.mean(means.argmax(1) == plabels))
    assert out["test/auc"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr"))


def test_multilabel_patient_auc_is_the_mean_per_target_auc_and_skips_a_single_class_target():
    rng = np.random.default_rng(1)
    plabels = np.array([[0, 1, 0], [1, 0, 0], [1, 1, 0], [0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0]])
    sizes = np.array([2, 3, 1, 2, 3, 2, 2])
    ids = [f"pt{i}" for i, n in enumerate(sizes) for _ in range(n)]
    y = np.repeat(plabels, sizes, axis=0)
    probs = 1 / (1 + np.exp(-(rng.normal(size=y.shape) + 1.2 * y)))
    stream = _batches(_logit(probs), "class_labels", y, ids, cut=5)
    with pytest.warns(UserWarning, match="AUC undefined for target 2: only one class"):  # no patient has target 2
        out = evaluate_classification(_PixelLogits(), stream, torch.device("cpu"), multilabel=True)
    means, ref_labels = _reference(probs, y, ids)
    assert np.array_equal(ref_labels, plabels)
    per = [roc_auc_score(plabels[:, k], means[:, k]) for k in range(2)]
    assert out["test/patient_auc_class0"] == pytest.approx(per[0])
    assert out["test/patient_auc_class1"] == pytest.approx(per[1])
    assert math.isnan(out["test/patient_auc_class2"]) and math.isnan(out["test/auc_class2"])
    assert out["test/patient_auc"] == pytest.approx(np.mean(per))
    assert out["test/patient_accuracy"] == pytest.approx(np.mean((means >= 0.5) == (plabels == 1)))


def test_a_split_whose_patients_share_one_class_has_no_patient_auc_like_images_do():
    # image labels 0/1 within one patient give a defined per-image AUC, but the patients (majority:
    # a 0, b 0) all carry 0: NaN with the warning classification_metrics gives for images
    p, y, ids = np.array([0.2, 0.7, 0.1, 0.4, 0.3]), np.array([0, 1, 0, 0, 0]), ["a", "a", "a", "b", "b"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = patient_metrics(p, y, ids)
    mixed, undefined = sorted(str(w.message) for w in caught)
    assert mixed.startswith("1 of 2 patients have images with different labels (first: a)")
    assert undefined.startswith("AUC undefined for the binary target: only one class")
    assert math.isnan(out["patient_auc"]) and out["patient_accuracy"] == 1.0  # means 1/3, 0.35
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert classification_metrics(p, y)["auc"] == 1.0


# ----------------------------------------------------------------------------- rows that disagree
def test_a_patient_whose_rows_disagree_takes_the_majority_label_ties_to_the_higher_class():
    ids = ["a", "a", "a", "b", "b", "c", "c", "c", "d"]
    y = np.array([0, 1, 1, 0, 1, 2, 0, 0, 2])
    with pytest.warns(UserWarning, match=r"3 of 4 patients have images with different labels \(first: a, b, c\)"):
        uniq, means, labels = patient_level(np.full((9, 3), 1 / 3), y, ids)
    assert list(uniq) == ["a", "b", "c", "d"]
    assert labels.tolist() == [1, 1, 0, 2]  # majority 1; tie 0/1 -> 1; majority 0; one row
    ml = np.array([[1, 0], [0, 0], [1, 1], [1, 0], [0, 1], [0, 1]])  # positives per target: a 2/3, 1/3; b 1/2, 1/2
    with pytest.warns(UserWarning, match="2 of 3 patients"):
        _, _, labels = patient_level(np.full((6, 2), 0.5), ml, ["a", "a", "a", "b", "b", "c"], multilabel=True)
    assert labels.tolist() == [[1, 0], [1, 1], [0, 1]]  # majority per target, ties positive
    with warnings.catch_warnings():  # agreeing rows: no warning
        warnings.simplefilter("error")
        patient_level(HAND_P, HAND_Y, HAND_IDS)


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match=r"must be probabilities in \[0, 1\]"):
        patient_metrics(np.array([-2.0, 3.0]), np.array([0, 1]), ["a", "b"])
    with pytest.raises(ValueError, match="same length N, got 2, 2 and 3"):
        patient_metrics(np.array([0.2, 0.8]), np.array([0, 1]), ["a", "b", "c"])
    with pytest.raises(ValueError, match="must not be negative"):
        patient_metrics(np.array([0.2, 0.8]), np.array([0, -1]), ["a", "b"])


# ----------------------------------------------------------------------------- registry and selection
def test_patient_metrics_are_declared_under_every_prefix_and_select_the_best_epoch():
    cfg = ClsFinetuneConfig()
    declared = stage_metrics(cfg)
    for name in ("patient_auc", "patient_accuracy", "patient_auc_class3", "auc", "accuracy", "auc_class3"):
        for prefix in ("test", "shifted", "best/test", "best/shifted"):
            assert declared.when(f"{prefix}/{name}") == "final", f"{prefix}/{name}"
    assert declared.when("val/patient_auc") == declared.when("val/auc") == "per_epoch"  # val_every: 1
    assert declared.when("best/val/patient_auc") == declared.when("best/val/auc") == "final"
    assert declared.when("val/patient_accuracy") is None
    every3 = stage_metrics(replace(cfg, val_every=3))
    assert every3.when("val/patient_auc") == every3.when("val/auc") == "final"
    assert validation_metric(cfg) == "val/patient_auc"
    assert validation_metric(SegFinetuneConfig()) == "val/dice_2d"
    for metric in ("test/patient_auc", "shifted/patient_auc", "best/val/patient_auc", "val/auc"):
        assert check_metric(metric, "finetune", cfg, "method 'random'") is None, metric
    assert "needs validation" in check_metric("val/patient_auc", "finetune", replace(cfg, val_every=0), "x")


def test_best_epoch_is_chosen_by_patient_auc_and_reports_the_image_auc_of_that_epoch(tmp_path):
    # epoch 1 has the best per-image AUC, epoch 2 the best per-patient AUC
    scripted = [{"val/patient_auc": 0.6, "val/auc": 0.55}, {"val/patient_auc": 0.7, "val/auc": 0.8},
                {"val/patient_auc": 0.9, "val/auc": 0.6}, {"val/patient_auc": 0.8, "val/auc": 0.7}]
    model = nn.Linear(1, 1)
    cfg = ClsFinetuneConfig(max_epochs=4)
    names = ("val/patient_auc", "val/auc")

    def record() -> BestEpoch:
        return BestEpoch(lambda m: {**scripted[int(m.bias.item())], "val/accuracy": 0.5}, validation_metric(cfg),
                         every=1, max_epochs=4, also=names)

    best = record()
    for epoch in range(4):
        with torch.no_grad():
            model.bias.fill_(epoch)
        assert best.update(model, epoch) == scripted[epoch]
    best.save(tmp_path, 3)
    test = {"test/patient_auc": 1.0}
    out = best.report(model, lambda m: {"test/patient_auc": float(m.bias.item())}, test, 3)
    assert out == {"best/epoch": 2.0, "best/val/patient_auc": 0.9, "best/val/auc": 0.6, "best/test/patient_auc": 2.0}
    resumed = record()
    resumed.restore(tmp_path, 3, model)
    assert resumed.report(model, lambda m: {}, test, 3) == {"best/epoch": 2.0, "best/val/patient_auc": 0.9,
                                                             "best/val/auc": 0.6}
