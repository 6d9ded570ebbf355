"""Patient splits and nested labelled fractions."""
from __future__ import annotations

import math
import re

import pytest

from medcl.data.manifest import read_manifest
from medcl.data.splits import (
    check_split_ratios,
    labelled_patients,
    patients_by_split,
    split_patients,
    unlabelled_patients,
)
from medcl.data.sources.synthetic import ingest_synthetic

PATIENTS = [f"hippocampus_{i:03d}" for i in range(260)]
FRACTIONS = (0.05, 0.1, 0.2, 0.5, 1.0)


def test_split_is_a_deterministic_partition_with_paper_ratios():
    a = split_patients(PATIENTS, (0.5, 0.25, 0.25), seed=0)
    assert a == split_patients(list(reversed(PATIENTS)), (0.5, 0.25, 0.25), seed=0)  # input order irrelevant
    assert set(a) == set(PATIENTS)
    counts = {s: sum(v == s for v in a.values()) for s in ("train", "val", "test")}
    assert counts == {"train": 130, "val": 65, "test": 65}
    assert a != split_patients(PATIENTS, (0.5, 0.25, 0.25), seed=1)


def test_split_small_and_uneven():
    a = split_patients(["p1", "p2", "p3"], (0.6, 0.2, 0.2), seed=0)
    assert sorted(a.values()).count("train") == 2  # round half up of 1.8
    assert split_patients(["only"], (0.5, 0.25, 0.25)) == {"only": "train"}


@pytest.mark.parametrize("ratios", [(0.5, 0.5), (0.5, 0.3, 0.3), (0, 0.5, 0.5), (1.2, -0.1, -0.1), ("a", 1, 1)])
def test_bad_split_ratios(ratios):
    with pytest.raises(ValueError, match="split_ratios"):
        check_split_ratios(ratios)


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_labelled_subsets_are_nested_and_sized(seed):
    train = PATIENTS[:130]
    subsets = [labelled_patients(train, f, seed) for f in FRACTIONS]
    # max(1, round half up(f * 130)), worked by hand: 6.5 -> 7, 13, 26, 65, 130
    assert [len(s) for s in subsets] == [7, 13, 26, 65, 130]
    for small, big in zip(subsets, subsets[1:]):
        assert set(small) <= set(big) and big[: len(small)] == small
    assert sorted(subsets[-1]) == sorted(train)
    assert len(set(subsets[2])) == len(subsets[2])


def test_labelled_deterministic_and_seeded():
    train = PATIENTS[:130]
    assert labelled_patients(train, 0.1, 3) == labelled_patients(list(reversed(train)), 0.1, 3)
    assert labelled_patients(train, 0.1, 3) != labelled_patients(train, 0.1, 4)
    assert labelled_patients(["a", "b", "c"], 0.05, 0) != []  # at least one patient
    assert len(labelled_patients(["a", "b", "c"], 0.05, 0)) == 1


def test_unlabelled_is_the_complement():
    train = PATIENTS[:40]
    lab, unlab = labelled_patients(train, 0.2, 0), unlabelled_patients(train, 0.2, 0)
    assert not set(lab) & set(unlab) and sorted(lab + unlab) == sorted(train)


@pytest.mark.parametrize("fraction", [0, -0.1, 1.01, 2, float("nan"), True, "0.5", None])
def test_fraction_outside_unit_interval(fraction):
    with pytest.raises(ValueError, match=re.escape(f"fraction={fraction!r}")):
        labelled_patients(PATIENTS[:10], fraction, 0)


def test_labelled_from_dataset_dir_never_includes_val_or_test(tmp_path):
    out = tmp_path / "syn"
    ingest_synthetic(out, num_patients=20, images_per_patient=2, size=16, shifted_patients=3)
    groups = patients_by_split(out)
    assert len(groups["train"]) == 12 and len(groups["val"]) == 4 and len(groups["test"]) == 4 + 3
    held_out = set(groups["val"]) | set(groups["test"])
    for f in FRACTIONS:
        for source in (out, str(out), read_manifest(out)):
            chosen = labelled_patients(source, f, seed=0)
            assert not set(chosen) & held_out
            assert len(chosen) == max(1, math.floor(f * 12 + 0.5))
            assert chosen == labelled_patients(groups["train"], f, seed=0)
    with pytest.raises(ValueError, match="seed"):
        labelled_patients(out, 0.5, seed=-1)
    with pytest.raises(ValueError, match="empty"):
        labelled_patients([], 0.5)
