"""Evaluation figures (issue 16, item 7): the test-slice panel and the ROC curves, without Ray or MLflow.

References are independent of medcl: Dice counted by hand on tiny masks, the
case choice checked against hand-made scores, the ROC points against
scikit-learn's ``roc_curve`` (every threshold) and ``roc_auc_score``, patient
means computed with a dict. The figures' data is read back from the
matplotlib objects (the overlays' pixels, the curves' points), and the PNG
files are decoded with PIL. The wiring into a stage run and its MLflow run is
in tests/train/test_figure_logging.py.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score, roc_curve
from torch import nn

from medcl.train.evaluate import PANEL_SEED, evaluate_classification, evaluate_segmentation
from medcl.train.figures import (
    PanelCases,
    choose_cases,
    draw_panel,
    draw_roc,
    roc_figure,
    roc_points,
    segmentation_panel,
    slice_dice,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _png(path) -> tuple[int, int]:
    """The (width, height) of a PNG file after checking its magic bytes and decoding it fully."""
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as im:
        im.load()
        return im.size


def _cases(n: int, size: int = 64, seed: int = 0):
    """n slices of discs (classes 1 and 2) with shifted predictions, a few empty/empty ones; ids per volume."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    masks = np.zeros((n, size, size), np.int64)
    preds = np.zeros_like(masks)
    for i in range(n):
        r, cy, cx = rng.uniform(3, size / 5), rng.uniform(size / 4, 3 * size / 4), rng.uniform(size / 4, 3 * size / 4)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        masks[i][disc] = 1 + i % 2
        preds[i][np.roll(disc, int(rng.integers(0, 6)), axis=1)] = 1 + i % 2
    masks[:3] = preds[:3] = 0  # nothing to find, nothing found
    images = (rng.normal(size=(n, 1, size, size)) + masks[:, None]).astype(np.float32)
    ids = [f"vol{i // 8:02d}:{i % 8}" for i in range(n)]
    return images, masks, preds, ids


# ----------------------------------------------------------------------------- Dice of a slice
def test_slice_dice_by_hand_and_empty_empty_is_nan():
    masks = np.zeros((5, 4, 4), np.int64)
    preds = np.zeros_like(masks)
    preds[1, 0, 0] = 1  # 1: nothing to find, one false positive -> 0
    masks[2, 0, :2] = 1  # 2: |T| = 2, |P| = 2, one in common -> 2 * 1 / 4
    preds[2, 0, 1:3] = 1
    masks[3, 0, 0], masks[3, 3, 3], preds[3, 0, 0] = 1, 2, 1  # 3: class 1 right (1), class 2 missed (0) -> 0.5
    masks[4, 1, 1], preds[4, 1, 1] = -1, 1  # 4: an ignore pixel predicted 1 does not count ...
    masks[4, 2, 2] = preds[4, 2, 2] = 1  # ... and class 1 is right -> 1
    dice = slice_dice(preds, masks, num_classes=3)
    assert math.isnan(dice[0])  # 0: empty mask, empty prediction: nothing to score
    assert dice[1:].tolist() == [0.0, 0.5, 0.5, 1.0]
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        slice_dice(preds + 3, masks, num_classes=3)
    with pytest.raises(ValueError, match="shape"):
        slice_dice(preds[:, 0], masks, num_classes=3)


# ----------------------------------------------------------------------------- the choice of cases
HAND = [0.5, 0.9, math.nan, 0.1, 0.7, 0.3, math.nan, 0.95, 0.2, 0.6]
HAND_IDS = [f"c{i}" for i in range(len(HAND))]


def test_choice_holds_the_best_first_and_the_worst_last_never_an_unscored_case():
    for k in (2, 4, 6):
        chosen = choose_cases(HAND, HAND_IDS, k=k, seed=3)
        assert len(chosen) == k and len(set(chosen)) == k
        assert chosen[0] == 7 and chosen[-1] == 3  # Dice 0.95 and 0.1
        scored = [i for i in chosen if not math.isnan(HAND[i])]
        assert len(scored) == k  # 8 scored cases: no unscored one is needed
        middle = [HAND[i] for i in chosen[1:-1]]
        assert middle == sorted(middle, reverse=True)  # shown by Dice
    # Too few scored cases: unscored ones fill the panel, after the scored, before the worst.
    assert sorted(choose_cases(HAND, HAND_IDS, k=10)) == list(range(10))
    assert choose_cases([math.nan, 0.4, math.nan, 0.8], list("abcd"), k=3)[::2] == [3, 1]
    # Equal scores: best and worst are still two cases; nothing scored: no best or worst, k cases.
    ties = choose_cases([1.0] * 5, list("abcde"), k=2)
    assert len(set(ties)) == 2
    assert len(choose_cases([math.nan] * 5, list("abcde"), k=3)) == 3


def test_choice_is_fixed_by_the_seed_and_the_order_of_the_cases_does_not_matter():
    scores = np.linspace(0.05, 0.95, 40)
    ids = [f"v{i // 10}:{i % 10}" for i in range(40)]
    first = choose_cases(scores, ids, k=6, seed=0)
    assert choose_cases(scores, ids, k=6, seed=0) == first
    perm = np.random.default_rng(1).permutation(40)
    again = choose_cases(scores[perm], [ids[i] for i in perm], k=6, seed=0)
    assert [ids[perm[i]] for i in again] == [ids[i] for i in first]
    other = choose_cases(scores, ids, k=6, seed=1)
    assert (other[0], other[-1]) == (first[0], first[-1]) == (39, 0)
    assert set(other[1:-1]) != set(first[1:-1])  # another seed, other middle cases
    with pytest.raises(ValueError, match="k must be an int >= 2"):
        choose_cases(scores, ids, k=1)
    with pytest.raises(ValueError, match="'v0:0' more than once"):
        choose_cases(scores[:3], ["v0:0", "v0:1", "v0:0"])


def test_streamed_cases_keep_at_most_2k_slices_and_draw_the_panel_of_all_cases(tmp_path):
    images, masks, preds, ids = _cases(61, size=24)
    full = segmentation_panel(images, masks, preds, slice_dice(preds, masks, 3), ids, tmp_path / "full.png", k=3,
                              seed=7, num_classes=3)
    cases = PanelCases(num_classes=3, k=3, seed=7)
    order = np.random.default_rng(2).permutation(61)
    for start in range(0, 61, 7):  # batches in another order
        b = order[start:start + 7]
        cases.update(images[b], masks[b], preds[b], [ids[i] for i in b])
        assert len(cases) <= 2 * 3
    streamed = cases.panel(tmp_path / "streamed.png")
    assert streamed.read_bytes() == full.read_bytes()
    assert PanelCases(num_classes=3).panel(tmp_path / "none.png") is None  # no case seen


# ----------------------------------------------------------------------------- the panel
def test_panel_is_a_small_png_of_the_expected_size_written_atomically(tmp_path):
    images, masks, preds, ids = _cases(30)
    path = segmentation_panel(images, masks, preds, slice_dice(preds, masks, 3), ids, tmp_path / "panel.png", k=6)
    assert _png(path) == (20 + 6 * 160, 40 + 3 * 160 + 30)  # row names, 6 cells, titles, 3 rows, legend
    assert path.stat().st_size <= 300_000
    assert [p.name for p in tmp_path.iterdir()] == ["panel.png"]  # no temp file left
    with pytest.raises(ValueError, match="must end in .png"):
        segmentation_panel(images, masks, preds, slice_dice(preds, masks, 3), ids, tmp_path / "panel.jpg")


def test_panel_overlays_each_class_where_the_mask_and_the_prediction_have_it():
    from matplotlib import colormaps

    images, masks, preds, ids = _cases(6, size=32)
    scores = slice_dice(preds, masks, 3)
    fig = draw_panel(images, masks, preds, scores, ids, num_classes=3)
    assert len(fig.axes) == 3 * 6  # column by column: image, ground truth, prediction
    for col in range(6):
        image, truth, pred = fig.axes[3 * col: 3 * col + 3]
        assert len(image.images) == 1 and len(truth.images) == len(pred.images) == 2
        shown = image.images[0].get_array()
        x = images[col, 0]
        assert np.allclose(shown, (x - x.min()) / (x.max() - x.min()), atol=1e-6)
        for ax, labels in ((truth, masks[col]), (pred, preds[col])):
            rgba = np.asarray(ax.images[1].get_array())
            assert np.array_equal(rgba[..., 3] > 0, labels > 0)
            for c in (1, 2):
                assert np.allclose(rgba[labels == c, :3], colormaps["tab10"](c - 1)[:3], atol=1e-6)
        title = image.get_title()
        assert ids[col] in title
        assert ("Dice n/a" in title) if math.isnan(scores[col]) else (f"Dice {scores[col]:.3f}" in title)
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["class 1", "class 2"]


# ----------------------------------------------------------------------------- ROC curves
def _curves(ax) -> list[np.ndarray]:
    return [line.get_xydata() for line in ax.get_lines() if not line.get_label().startswith("_")]


def test_binary_roc_points_are_sklearns_and_the_title_holds_its_auc():
    s = np.array([0.1, 0.4, 0.35, 0.8, 0.8, 0.2, 0.9, 0.35])
    y = np.array([0, 0, 1, 1, 0, 0, 1, 0])  # ties at 0.8 and 0.35 across the classes
    fpr, tpr, thresholds = roc_curve(y, s, drop_intermediate=False)
    mine = roc_points(s, y)
    assert np.allclose(mine[0], fpr) and np.allclose(mine[1], tpr) and np.array_equal(mine[2], thresholds)
    for probs in (s, np.stack([1 - s, s], axis=1)):  # scores (N,) and two softmax columns: one curve
        ax = draw_roc(probs, y).axes[0]
        (curve,) = _curves(ax)
        assert np.allclose(curve, np.stack([fpr, tpr], axis=1))
        assert f"AUC {roc_auc_score(y, s):.3f}" in ax.get_title()


def test_multiclass_roc_per_image_and_per_patient_are_one_vs_rest_curves_of_sklearn():
    rng = np.random.default_rng(0)
    patients = [f"p{i // 3}" for i in range(45)]
    y = np.repeat(rng.permutation(np.arange(15) % 3), 3)  # one class per patient, 5 patients a class
    logits = rng.normal(size=(45, 3)) + 1.5 * np.eye(3)[y]
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    fig = draw_roc(probs, y, patient_ids=patients, class_names=["a", "b", "c"])
    per_image, per_patient = fig.axes
    rows: dict[str, list[int]] = {}
    for i, p in enumerate(patients):
        rows.setdefault(p, []).append(i)
    mean = np.stack([probs[r].mean(axis=0) for r in rows.values()])
    label = np.array([y[r[0]] for r in rows.values()])
    for ax, s, t, n in ((per_image, probs, y, 45), (per_patient, mean, label, 15)):
        curves = _curves(ax)
        assert len(curves) == 3
        for k, curve in enumerate(curves):
            fpr, tpr, _ = roc_curve(t == k, s[:, k], drop_intermediate=False)
            assert np.allclose(curve, np.stack([fpr, tpr], axis=1))
        macro = np.mean([roc_auc_score(t == k, s[:, k]) for k in range(3)])
        assert f"(n={n}): macro AUC {macro:.3f}" in ax.get_title()
    labels = [t.get_text() for t in per_image.get_legend().get_texts()]
    assert [name.split(" ")[0] for name in labels] == ["a", "b", "c"]


def test_multilabel_roc_has_one_curve_per_target_and_a_one_class_target_none():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, size=(30, 3))
    y[:, 2] = 1  # target 2: only positives
    s = rng.random((30, 3))
    ax = draw_roc(s, y, multilabel=True).axes[0]
    curves = _curves(ax)
    for k in (0, 1):
        fpr, tpr, _ = roc_curve(y[:, k], s[:, k], drop_intermediate=False)
        assert np.allclose(curves[k], np.stack([fpr, tpr], axis=1))
    assert curves[2].size == 0
    assert "n/a: one class" in ax.get_legend().get_texts()[2].get_text()
    macro = np.mean([roc_auc_score(y[:, k], s[:, k]) for k in (0, 1)])
    assert f"macro AUC {macro:.3f}" in ax.get_title()


def test_roc_figure_is_a_png_one_panel_per_level_written_atomically(tmp_path):
    s = np.array([0.2, 0.7, 0.4, 0.9, 0.1, 0.6])
    y = np.array([0, 0, 1, 1, 0, 0])
    assert _png(roc_figure(s, y, tmp_path / "roc.png")) == (420, 440)
    assert _png(roc_figure(s, y, tmp_path / "roc2.png", patient_ids=list("aabbcc"))) == (840, 440)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["roc.png", "roc2.png"]


# ----------------------------------------------------------------------------- inside the evaluation
class _Stream:
    """What the evaluation reads of a Ray Dataset: numpy batches."""

    def __init__(self, batches: list[dict]) -> None:
        self.batches = batches

    def iter_batches(self, batch_size, batch_format):
        yield from self.batches


class _Threshold(nn.Module):
    """Logits (B, 3, H, W) from the image: class 1 where it is > 0.5, class 2 where > 1.5."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, 0]
        return torch.stack([torch.zeros_like(x), (x > 0.5).float(), 2 * (x > 1.5).float()], dim=1)


def test_evaluate_segmentation_draws_the_panel_of_every_slice_it_scored(tmp_path):
    images, masks, _, _ = _cases(20, size=16)
    vol = np.array([f"vol{i // 5}" for i in range(20)], dtype=object)
    idx = np.arange(20) % 5
    stream = _Stream([{"image": images[s], "mask": masks[s].astype(np.int16), "volume_id": vol[s],
                       "slice_index": idx[s]} for s in (slice(0, 8), slice(8, 20))])
    plain = evaluate_segmentation(_Threshold(), stream, 3, torch.device("cpu"))
    out = evaluate_segmentation(_Threshold(), stream, 3, torch.device("cpu"), panel=tmp_path / "test_panel.png")
    assert out == plain
    preds = _Threshold()(torch.from_numpy(images)).argmax(1).numpy()
    ids = [f"{v}:{i}" for v, i in zip(vol, idx)]
    ref = segmentation_panel(images, masks, preds, slice_dice(preds, masks, 3), ids, tmp_path / "ref.png",
                             seed=PANEL_SEED, num_classes=3)
    assert (tmp_path / "test_panel.png").read_bytes() == ref.read_bytes()


def test_evaluate_classification_draws_its_roc_curves(tmp_path):
    p = np.array([0.2, 0.6, 0.1, 0.3, 0.9, 0.35, 0.7, 0.55])
    x = np.log(np.stack([1 - p, p], axis=1))[:, :, None, None].astype(np.float32)  # softmax(x) = (1 - p, p)
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    ids = np.array(["a", "a", "b", "b", "c", "c", "d", "d"], dtype=object)
    stream = _Stream([{"image": x, "class_label": y, "patient_id": ids}])
    model = nn.Flatten()
    plain = evaluate_classification(model, stream, torch.device("cpu"), multilabel=False)
    out = evaluate_classification(model, stream, torch.device("cpu"), multilabel=False, roc=tmp_path / "roc_test.png")
    assert out == plain
    assert _png(tmp_path / "roc_test.png") == (840, 440)  # per image and per patient
