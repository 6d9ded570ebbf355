"""Stratified label fractions for classification (issue 15, item 2), and the plain (segmentation) draw pinned."""
from __future__ import annotations

import math
import re

import numpy as np
import pyarrow.parquet as pq
import pytest

from medcl.data.image_block import ImageBlock
from medcl.data.shards import write_dataset
from medcl.data.sources.synthetic import ingest_synthetic
from medcl.data.splits import labelled_patients, patient_classes, unlabelled_patients

FRACTIONS = (0.01, 0.05, 0.1, 0.2, 0.5, 1.0)
# 130 training patients in three imbalanced classes, 3 without a class (never labelled) and one
# missing from the mapping (same); ids interleave the classes.
PATIENTS = [f"p{i:03d}" for i in range(134)]
CLASSES = {p: (0 if i % 5 else 1) if i < 125 else 2 for i, p in enumerate(PATIENTS[:130])}
CLASSES.update({p: None for p in PATIENTS[130:133]})
ELIGIBLE = {c: sorted(p for p, k in CLASSES.items() if k == c) for c in (0, 1, 2)}


def _half_up(x: float) -> int:
    return math.floor(x + 0.5)


def _plain_reference(patients, fraction, seed):
    """The draw before issue 15, written out independently: it must not change (segmentation benchmarks)."""
    ids = sorted(set(patients))
    perm = np.random.default_rng(seed).permutation(len(ids))
    return [ids[i] for i in perm[: max(1, _half_up(fraction * len(ids)))]]


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_plain_draw_is_unchanged(seed):
    for n in (3, 13, 130):
        for f in FRACTIONS:
            assert labelled_patients(PATIENTS[:n], f, seed) == _plain_reference(PATIENTS[:n], f, seed)
    assert labelled_patients(["a", "b", "c", "d"], 0.5, seed=0) == ["c", "a"]  # the value before issue 15


def test_classes_none_is_the_plain_draw():
    assert labelled_patients(PATIENTS[:130], 0.05, seed=0, classes=None) == _plain_reference(PATIENTS[:130], 0.05, 0)
    assert unlabelled_patients(PATIENTS[:9], 0.5, 2, classes=None) == unlabelled_patients(PATIENTS[:9], 0.5, 2)


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_stratified_nested_every_class_and_proportional(seed):
    subsets = [labelled_patients(PATIENTS, f, seed, classes=CLASSES) for f in FRACTIONS]
    for f, chosen in zip(FRACTIONS, subsets):
        assert len(set(chosen)) == len(chosen)
        for c, members in ELIGIBLE.items():
            got = [p for p in chosen if CLASSES[p] == c]
            assert len(got) >= 1, (f, c)  # every class labelled at every fraction, 1 % included
            assert abs(len(got) - f * len(members)) < 1, (f, c, len(got))
            assert len(got) == max(1, _half_up(f * len(members)))
        assert set(chosen) <= {p for m in ELIGIBLE.values() for p in m}  # never a patient without a class
    for small, big in zip(subsets, subsets[1:]):
        assert set(small) <= set(big)
        for c in ELIGIBLE:  # per class, a prefix
            s, b = [p for p in small if CLASSES[p] == c], [p for p in big if CLASSES[p] == c]
            assert b[: len(s)] == s
    assert sorted(subsets[-1]) == sorted(p for m in ELIGIBLE.values() for p in m)
    # 1 %: 1 + 1 + 1 patients (1.0, 0.25, 0.05 expected) where the plain draw takes 1 (of one class)
    assert len(subsets[0]) == 3 and len(labelled_patients(PATIENTS, 0.01, seed)) == 1


def test_stratified_matches_the_documented_rule():
    """One generator seeded with ``seed``, a permutation per class in ascending class order."""
    for seed in (0, 3):
        rng = np.random.default_rng(seed)
        expected = []
        for c in (0, 1, 2):
            perm = rng.permutation(len(ELIGIBLE[c]))
            expected += [ELIGIBLE[c][i] for i in perm[: max(1, _half_up(0.2 * len(ELIGIBLE[c])))]]
        assert labelled_patients(PATIENTS, 0.2, seed, classes=CLASSES) == expected


def test_stratified_deterministic_and_seeded():
    a = labelled_patients(PATIENTS, 0.1, 3, classes=CLASSES)
    assert a == labelled_patients(list(reversed(PATIENTS)), 0.1, 3, classes=dict(reversed(CLASSES.items())))
    assert a == labelled_patients(PATIENTS, 0.1, 3, classes=CLASSES)
    draws = {tuple(sorted(labelled_patients(PATIENTS, 0.1, s, classes=CLASSES))) for s in range(5)}
    assert len(draws) == 5
    assert labelled_patients(["a", "b", "c", "d"], 0.01, 0, classes={"a": 0, "b": 0, "c": 1, "d": 1}) == ["a", "c"]


def test_stratified_unlabelled_is_the_complement():
    lab = labelled_patients(PATIENTS, 0.2, 0, classes=CLASSES)
    unlab = unlabelled_patients(PATIENTS, 0.2, 0, classes=CLASSES)
    assert not set(lab) & set(unlab) and sorted(lab + unlab) == PATIENTS
    assert set(PATIENTS[130:]) <= set(unlab)  # no class: unlabelled


@pytest.mark.parametrize("classes, error, match", [
    (["a", "b"], TypeError, "classes must be a mapping"),
    ({"a": 0.5}, TypeError, re.escape("classes['a']=0.5 must be an int class index")),
    ({"a": True}, TypeError, re.escape("classes['a']=True must be an int class index")),
    ({"a": None, "zz": 1}, ValueError, "none of the 2 train patients has a class"),
])
def test_bad_classes(classes, error, match):
    with pytest.raises(error, match=match):
        labelled_patients(["a", "b"], 0.5, 0, classes=classes)


def test_patient_classes_read_from_the_bags(tmp_path):
    """A patient's class is its images' most frequent class (ties -> smallest); no class -> not listed."""
    rows = {"p0": [1, 1, 0], "p1": [0, 1], "p2": [-1, 1, 1], "p3": None, "p4": [2, 2]}
    split = {"p0": "train", "p1": "train", "p2": "train", "p3": "train", "p4": "val"}
    blocks = [ImageBlock(images=np.zeros((2 if lab is None else len(lab), 1, 4, 4), np.float32), patient_id=p,
                         volume_id=f"{p}-v", split=split[p], source_path=f"{p}.png", class_label=lab)
              for p, lab in rows.items()]
    out = tmp_path / "ds"
    write_dataset(out, blocks, source={"kind": "test", "path": "", "options": {}}, task="multiclass",
                  fingerprint="test-stratified", class_names=["a", "b", "c"])
    assert patient_classes(out) == {"p0": 1, "p1": 0, "p2": 1}
    assert patient_classes(out, "val") == {"p4": 2} and patient_classes(out, "test") == {}
    with pytest.raises(ValueError, match="split must be one of"):
        patient_classes(out, "training")


def _synthetic(root):
    """12 training patients, 2 of class 1 ("lesion"), 2 images each."""
    ingest_synthetic(root, num_patients=20, images_per_patient=2, size=16, positive_fraction=0.25)
    return root


def test_patient_classes_of_the_synthetic_cohort(tmp_path):
    out = _synthetic(tmp_path / "syn")
    t = pq.read_table(sorted(out.glob("shard-*.parquet")), columns=["patient_id", "split", "class_label"])
    expected = {p: c for p, s, c in zip(*(t[k].to_pylist() for k in ("patient_id", "split", "class_label")))
                if s == "train"}
    assert patient_classes(out) == expected and sorted(expected.values()).count(1) == 2
    for seed in range(3):
        chosen = labelled_patients(out, 0.05, seed, classes=patient_classes(out))
        assert sorted(expected[p] for p in chosen) == [0, 1]


@pytest.mark.ray
@pytest.mark.timeout(180)
def test_labelled_images_stream_has_every_class_at_a_small_fraction(ray_session, tmp_path):
    from medcl.data import streams

    out = _synthetic(tmp_path / "syn")
    # seed 1: the plain draw labels one class-0 patient at 5 %; the stratified one adds a class-1 patient.
    ds = streams.labelled_images(out, 0.05, seed=1, materialize=False)
    rows = [(str(p), int(c)) for b in ds.iter_batches(batch_size=64, batch_format="numpy")
            for p, c in zip(b["patient_id"], b["class_label"])]
    classes = patient_classes(out)
    assert {c for _, c in rows} == {0, 1} and len(rows) == 2 * 2
    assert {p for p, _ in rows} == set(labelled_patients(out, 0.05, 1, classes=classes))
    assert all(classes[p] == c for p, c in rows)
