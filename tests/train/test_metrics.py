"""Dice (pooled 2D, per-volume 3D, streaming, distributed) and accuracy/AUC against independent references."""
from __future__ import annotations

import math
import os
import warnings

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from medcl.train.metrics import DiceAccumulator, classification_metrics

# Two 2x3 slices, K = 3 (0 background, 1, 2); -1 = ignore.
TARGET = np.array(
    [
        [[0, 1, 1], [2, 2, 0]],
        [[1, 0, 0], [0, 0, -1]],
    ]
)
PRED = np.array(
    [
        [[0, 1, 0], [2, 1, 0]],
        [[1, 1, 0], [2, 0, 1]],  # the 1 at the ignored pixel must not count
    ]
)


def pooled_dice_2d(pred, target, num_classes):
    """Pooled Dice of one batch of slices, the way ``evaluate_segmentation`` counts them."""
    acc = DiceAccumulator(num_classes, per_volume=False)
    acc.update(pred, target)
    return acc.pooled()


def volume_dice_3d(pred, target, volume_ids, slice_index, num_classes):
    """Per-volume Dice of one batch of slices."""
    acc = DiceAccumulator(num_classes)
    acc.update(pred, target, volume_ids, slice_index)
    return acc.volumes()


# ---------------------------------------------------------------- Dice by hand
def test_pooled_dice_hand_computed():
    # class 1: I = 1 + 1, P = 2 + 2, T = 2 + 1  -> 4/7
    # class 2: I = 1 + 0, P = 1 + 1, T = 2 + 0  -> 2/4
    res = pooled_dice_2d(PRED, TARGET, num_classes=3)
    assert res.per_class[1] == pytest.approx(4 / 7)
    assert res.per_class[2] == pytest.approx(0.5)
    assert res.mean == pytest.approx((4 / 7 + 0.5) / 2)
    assert set(res.per_class) == {1, 2}  # background is not reported
    m = res.to_metrics("test/dice_2d")
    assert m == pytest.approx({"test/dice_2d_class1": 4 / 7, "test/dice_2d_class2": 0.5, "test/dice_2d": 15 / 28})


def test_pooled_dice_accepts_torch_tensors():
    res = pooled_dice_2d(torch.from_numpy(PRED), torch.from_numpy(TARGET), num_classes=3)
    assert res.per_class[1] == pytest.approx(4 / 7)


def test_volume_dice_hand_computed():
    # volume A = slice 0: class 1: 2*1/(2+2) = 1/2; class 2: 2*1/(1+2) = 2/3
    # volume B = slice 1: class 1: 2*1/(2+1) = 2/3; class 2: 2*0/(1+0) = 0 (false positive)
    res = volume_dice_3d(PRED, TARGET, ["A", "B"], [0, 0], num_classes=3)
    assert res.volume_ids == ("A", "B")
    np.testing.assert_allclose(res.scores, [[1 / 2, 2 / 3], [2 / 3, 0.0]])
    assert res.per_class_mean[1] == pytest.approx(7 / 12)
    assert res.per_class_std[1] == pytest.approx(1 / 12)
    assert res.per_class_mean[2] == pytest.approx(1 / 3)
    assert res.per_class_std[2] == pytest.approx(1 / 3)
    assert res.mean == pytest.approx(11 / 24)
    # per-volume means 7/12 and 1/3 -> population std 1/8
    assert res.std == pytest.approx(1 / 8)
    assert res.per_class_count == {1: 2, 2: 2}
    acc = DiceAccumulator(3)
    acc.update(PRED, TARGET, np.array(["A", "B"]), torch.tensor([0, 0]))
    assert acc.compute() == pytest.approx(
        {
            "dice_2d": 15 / 28, "dice_2d_class1": 4 / 7, "dice_2d_class2": 0.5,
            "dice_3d_mean": 11 / 24, "dice_3d_std": 1 / 8, "dice_3d_num_volumes": 2,
            "dice_3d_class1_mean": 7 / 12, "dice_3d_class1_std": 1 / 12,
            "dice_3d_class2_mean": 1 / 3, "dice_3d_class2_std": 1 / 3,
        }
    )


def test_empty_empty_class_is_skipped_not_counted_as_one():
    acc = DiceAccumulator(num_classes=3)
    acc.update(PRED, TARGET, ["A", "B"], [0, 0])
    # volume C: a 1x2 slice (other size is fine), class 2 absent from both pred and target
    acc.update(np.array([[[1, 0]]]), np.array([[[1, 1]]]), ["C"], [0])
    res = acc.volumes()
    assert math.isnan(res.scores[2, 1])  # C, class 2
    assert res.scores[2, 0] == pytest.approx(2 * 1 / (1 + 2))
    assert res.per_class_count == {1: 3, 2: 2}
    assert res.per_class_mean[2] == pytest.approx(1 / 3)  # unchanged by C (not averaged in as 1.0)
    assert res.per_class_mean[1] == pytest.approx((1 / 2 + 2 / 3 + 2 / 3) / 3)


def test_pooled_dice_nan_when_class_absent_everywhere():
    pred = np.array([[[0, 1]]])
    target = np.array([[[0, 1]]])
    res = pooled_dice_2d(pred, target, num_classes=3)
    assert res.per_class[1] == 1.0 and math.isnan(res.per_class[2])
    assert res.mean == 1.0  # class 2 skipped
    with pytest.warns(UserWarning, match="no foreground class"):
        res = pooled_dice_2d(np.zeros((1, 2, 2), int), np.zeros((1, 2, 2), int), num_classes=3)
    assert math.isnan(res.mean)


# ---------------------------------------------------------------- 3D vs naive
def _random_volumes(rng, n_vol=5, k=3, hw=(6, 7)):
    vols = {}
    for v in range(n_vol):
        depth = int(rng.integers(2, 6))
        t = rng.integers(0, k, size=(depth, *hw))
        t[rng.random(t.shape) < 0.05] = -1
        p = np.where(rng.random(t.shape) < 0.7, np.clip(t, 0, None), rng.integers(0, k, size=t.shape))
        if v == 0:  # class 2 absent from both prediction and reference
            t[t == 2] = 0
            p[p == 2] = 1
        vols[f"vol{v}"] = (p, t)
    return vols


def _naive_3d(p, t, c):
    keep = t != -1
    inter = np.sum((p == c) & (t == c) & keep)
    denom = np.sum((p == c) & keep) + np.sum((t == c) & keep)
    return np.nan if denom == 0 else 2 * inter / denom


def test_streaming_3d_dice_matches_naive_volumes_across_two_merged_ranks():
    rng = np.random.default_rng(0)
    k = 3
    vols = _random_volumes(rng, k=k)
    # flatten to shuffled slices, stream in uneven batches split over two "ranks"
    rows = [(vid, z) for vid, (p, _) in vols.items() for z in range(p.shape[0])]
    order = rng.permutation(len(rows))
    ranks = [DiceAccumulator(k), DiceAccumulator(k)]
    pos = 0
    while pos < len(order):
        size = int(rng.integers(1, 5))
        idx = order[pos : pos + size]
        pos += size
        batch = [rows[i] for i in idx]
        pred = np.stack([vols[v][0][z] for v, z in batch])
        target = np.stack([vols[v][1][z] for v, z in batch])
        ids, slices = [v for v, _ in batch], [z for _, z in batch]
        ranks[pos % 2].update(torch.from_numpy(pred), torch.from_numpy(target), ids, slices)
    assert ranks[0].state_dict()["volumes"] and ranks[1].state_dict()["volumes"]
    acc = ranks[0].merge(ranks[1].state_dict())
    res = acc.volumes()

    expected = np.array([[_naive_3d(*vols[v], c) for c in range(1, k)] for v in sorted(vols)])
    assert res.volume_ids == tuple(sorted(vols))
    np.testing.assert_allclose(res.scores, expected)
    assert math.isnan(expected[0, 1])
    for c in range(1, k):
        col = expected[:, c - 1][~np.isnan(expected[:, c - 1])]
        assert res.per_class_mean[c] == pytest.approx(col.mean())
        assert res.per_class_std[c] == pytest.approx(col.std())
    # pooled over every slice == Dice of all volumes concatenated
    all_p = np.concatenate([vols[v][0].reshape(-1) for v in vols])
    all_t = np.concatenate([vols[v][1].reshape(-1) for v in vols])
    pooled = acc.pooled()
    for c in range(1, k):
        assert pooled.per_class[c] == pytest.approx(_naive_3d(all_p, all_t, c))


def test_duplicate_slice_is_refused():
    acc = DiceAccumulator(3)
    acc.update(PRED, TARGET, ["A", "B"], [0, 0])
    with pytest.raises(ValueError, match=r"\('A', 0\) was already counted"):
        acc.update(PRED[:1], TARGET[:1], ["A"], [0])
    with pytest.raises(ValueError, match=r"\('B', 3\) was already counted"):
        DiceAccumulator(3).update(np.concatenate([PRED, PRED]), np.concatenate([TARGET, TARGET]),
                                  ["A", "B", "B", "C"], [0, 3, 3, 1])
    # the refused batch counted nothing
    assert acc.state_dict()["seen"] == [("A", 0), ("B", 0)]
    assert acc.pooled().per_class == pytest.approx({1: 4 / 7, 2: 0.5})
    other = DiceAccumulator(3)
    other.update(PRED[1:], TARGET[1:], ["B"], [0])
    with pytest.raises(ValueError, match="both accumulators counted"):
        acc.merge(other)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_classes": 1}, "num_classes must be >= 2"),
        ({"num_classes": 3, "ignore_index": 1}, "ignore_index must not be a class"),
        ({"num_classes": 3.0}, "num_classes must be an int"),
    ],
)
def test_accumulator_validation(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        DiceAccumulator(**kwargs)


def test_update_validation():
    acc = DiceAccumulator(3)
    with pytest.raises(ValueError, match="shape"):
        acc.update(PRED[0], TARGET[0], ["A"], [0])
    with pytest.raises(ValueError, match=r"pred labels must lie in \[0, 3\)"):
        acc.update(PRED + 5, TARGET, ["A", "B"])
    with pytest.raises(ValueError, match="target labels"):
        acc.update(PRED, TARGET - 2, ["A", "B"])
    with pytest.raises(ValueError, match="volume_ids is required"):
        acc.update(PRED, TARGET)
    with pytest.raises(ValueError, match="one id per slice"):
        acc.update(PRED, TARGET, ["A"])
    with pytest.raises(ValueError, match="integer labels"):
        acc.update(PRED.astype(float), TARGET, ["A", "B"])
    with pytest.raises(ValueError, match="different num_classes"):
        acc.merge(DiceAccumulator(4))
    with pytest.raises(ValueError, match="per_volume=True"):
        DiceAccumulator(3, per_volume=False).volumes()


def _reduce_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        acc = DiceAccumulator(3)
        acc.update(PRED[rank : rank + 1], TARGET[rank : rank + 1], ["AB"], [rank])  # one volume split over ranks
        acc.reduce()
        res = acc.volumes()
        np.save(os.path.join(out_dir, f"rank{rank}.npy"), res.scores)
    finally:
        dist.destroy_process_group()


def test_reduce_over_real_gloo_group(tmp_path):
    # fork: the children need no fresh torch import (spawn costs ~8 s here)
    mp.start_processes(_reduce_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, start_method="fork")
    # both slices form one volume: class 1: I=2, P=4, T=3 -> 4/7; class 2: I=1, P=2, T=2 -> 1/2
    for r in range(2):
        np.testing.assert_allclose(np.load(tmp_path / f"rank{r}.npy"), [[4 / 7, 0.5]])


def test_reduce_is_noop_without_process_group():
    acc = DiceAccumulator(3)
    acc.update(PRED, TARGET, ["A", "B"], [0, 0])
    before = acc.state_dict()
    assert acc.reduce() is acc and acc.state_dict() == before


# ---------------------------------------------------------------- classification
def _mann_whitney_auc(y, s):
    pos, neg = s[y == 1], s[y == 0]
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def _softmax(x):
    e = np.exp(x - x.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_binary_auc_with_ties_and_accuracy():
    s = np.array([0.1, 0.4, 0.4, 0.8, 0.35, 0.9, 0.4, 0.05])
    y = np.array([0, 0, 1, 1, 1, 1, 0, 0])
    out = classification_metrics(s, y)
    assert out["auc"] == pytest.approx(_mann_whitney_auc(y, s))
    # predictions >= 0.5: only 0.8 and 0.9 -> correct on 0,1,3,5,6,7 -> 6/8
    assert out["accuracy"] == pytest.approx(6 / 8)
    logits = np.log(s / (1 - s))
    out_logits = classification_metrics(torch.from_numpy(logits), torch.from_numpy(y))
    assert out_logits == pytest.approx(out)


def test_multiclass_ovr_macro_auc_from_logits():
    rng = np.random.default_rng(1)
    y = np.tile(np.arange(4), 6)
    logits = rng.normal(size=(24, 4)) + 1.5 * np.eye(4)[y]
    logits[3, :] = logits[5, :]  # a tie
    probs = _softmax(logits)
    expected = [_mann_whitney_auc((y == k).astype(int), probs[:, k]) for k in range(4)]
    out = classification_metrics(logits, y)
    assert out["auc"] == pytest.approx(np.mean(expected))
    for k in range(4):
        assert out[f"auc_class{k}"] == pytest.approx(expected[k])
    assert out["accuracy"] == pytest.approx(np.mean(logits.argmax(1) == y))
    assert classification_metrics(probs, y) == pytest.approx(out)  # probabilities detected


def test_two_class_output_gives_binary_auc():
    logits = np.array([[2.0, 1.0], [0.0, 1.0], [1.0, 1.5], [0.3, 0.1]])
    y = np.array([0, 1, 0, 1])
    out = classification_metrics(logits, y)
    assert out["auc"] == pytest.approx(_mann_whitney_auc(y, _softmax(logits)[:, 1]))
    assert out["accuracy"] == pytest.approx(2 / 4)
    assert "auc_class0" not in out


def test_multilabel_mean_auc_skips_single_class_target():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, size=(30, 3))
    y[:, 1] = 0  # target 1 has no positive
    s = rng.normal(size=(30, 3)) + y
    with pytest.warns(UserWarning, match="target 1: only one class"):
        out = classification_metrics(s, y, multilabel=True)
    expected = [_mann_whitney_auc(y[:, k], s[:, k]) for k in (0, 2)]
    assert out["auc"] == pytest.approx(np.mean(expected))
    assert math.isnan(out["auc_class1"])
    p = 1 / (1 + np.exp(-s))
    assert out["accuracy"] == pytest.approx(np.mean((p >= 0.5) == (y == 1)))


def test_from_logits_override():
    s = np.array([0.2, 0.4, 0.6, 0.9])  # in [0, 1] but declared logits: sigmoid > 0.5 everywhere
    y = np.array([0, 0, 1, 1])
    assert classification_metrics(s, y, from_logits=True)["accuracy"] == pytest.approx(0.5)
    assert classification_metrics(s, y)["accuracy"] == pytest.approx(1.0)


def test_classification_validation():
    with pytest.raises(ValueError, match="targets must have shape"):
        classification_metrics(np.zeros((4, 3)), np.zeros(5, int))
    with pytest.raises(ValueError, match="NaN or infinite"):
        classification_metrics(np.array([0.1, np.nan]), np.array([0, 1]))
    with pytest.raises(ValueError, match=r"class indices in \[0, 3\)"):
        classification_metrics(np.zeros((2, 3)), np.array([0, 3]))
    with pytest.raises(ValueError, match="0/1"):
        classification_metrics(np.array([0.1, 0.2]), np.array([0, 2]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UserWarning, match="only one class"):
            classification_metrics(np.array([0.1, 0.2]), np.array([1, 1]))
