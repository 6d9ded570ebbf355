"""Patient-level splits and nested labelled subsets.

Splits are by patient (never by slice), assigned once at ingest into the
``split`` column. Labelled subsets are drawn from the *training* patients
only: a seeded permutation of the sorted training patients, of which the
first ``max(1, round(fraction * n))`` are labelled (rounding half up: 6.5 -> 7).
The same seed gives the same permutation for every fraction, so smaller subsets are prefixes of larger
ones (the 5% patients are inside the 10% ones), and validation/test patients
can never be drawn.

Classification draws per class instead (``labelled_patients(..., classes=patient_classes(...))``):
the same rule inside each class, with one labelled patient per class at least, so that a small
fraction never labels a single class only (see :func:`labelled_patients`).
"""
from __future__ import annotations

import math
import numbers
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from medcl.data.decode import read_bags_table
from medcl.data.manifest import Manifest
from medcl.data.schema import SPLITS

__all__ = [
    "check_split_ratios",
    "split_patients",
    "patients_by_split",
    "patient_classes",
    "labelled_patients",
    "unlabelled_patients",
]

PatientSource = Sequence[str] | str | os.PathLike | Manifest


def _round_half_up(x: float) -> int:
    """``round`` without banker's rounding: 6.5 -> 7 (Python's round gives 6)."""
    return math.floor(x + 0.5)


def _check_seed(seed: object) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed={seed!r} must be a non-negative int")
    return int(seed)


def check_split_ratios(ratios: Sequence[float]) -> tuple[float, float, float]:
    """Validate train/val/test ratios: three non-negative numbers summing to 1, train > 0.

    Raises:
        ValueError: naming the bad ratios.
    """
    try:
        r = tuple(float(x) for x in ratios)
    except (TypeError, ValueError):
        raise ValueError(f"split_ratios={ratios!r} must be three numbers (train, val, test)") from None
    if len(r) != 3 or any(not math.isfinite(x) or x < 0 for x in r) or r[0] <= 0 or abs(sum(r) - 1) > 1e-6:
        raise ValueError(f"split_ratios={list(ratios)!r} must be three non-negative numbers (train, val, test) "
                         "with train > 0 summing to 1, e.g. (0.5, 0.25, 0.25)")
    return r  # type: ignore[return-value]


def split_patients(patient_ids: Iterable[str], ratios: Sequence[float] = (0.5, 0.25, 0.25),
                   seed: int = 0) -> dict[str, str]:
    """Assign each patient to "train", "val" or "test".

    The sorted unique ids are permuted with ``numpy.random.default_rng(seed)``;
    the first ``round(r_train * n)`` go to train, up to ``round((r_train + r_val) * n)``
    to val, the rest to test (rounding half up; train gets at least one patient).

    Args:
        patient_ids: Patient ids (duplicates are ignored).
        ratios: (train, val, test) fractions summing to 1.
        seed: Permutation seed.

    Returns:
        ``{patient_id: split}``.

    Raises:
        ValueError: no patients, bad ratios or seed.
    """
    r = check_split_ratios(ratios)
    ids = sorted(set(patient_ids))
    if not ids:
        raise ValueError("patient_ids is empty; nothing to split")
    perm = np.random.default_rng(_check_seed(seed)).permutation(len(ids))
    n_train = max(1, _round_half_up(r[0] * len(ids)))
    n_train_val = max(n_train, _round_half_up((r[0] + r[1]) * len(ids)))
    return {ids[j]: ("train" if i < n_train else "val" if i < n_train_val else "test")
            for i, j in enumerate(perm)}


def patients_by_split(dataset: str | os.PathLike | Manifest) -> dict[str, list[str]]:
    """Sorted patient ids of each split of a dataset, read from its ``bags.parquet``.

    The one listing of a split's patients: the labelled subsets here and the
    streams of :mod:`medcl.data.streams` draw from it.

    Args:
        dataset: Dataset directory, or a :class:`Manifest` from :func:`read_manifest`.
    """
    root = _root(dataset)
    t = read_bags_table(root, columns=["patient_id", "split"])
    pids = t["patient_id"].to_pylist()
    splits = t["split"].to_pylist()
    return {s: sorted(p for p, q in zip(pids, splits) if q == s) for s in SPLITS}


def _root(dataset: str | os.PathLike | Manifest) -> Path:
    if isinstance(dataset, Manifest):
        if dataset.root is None:
            raise ValueError("this Manifest has no root directory; pass the dataset directory instead")
        return dataset.root
    return Path(dataset)


def _train_patients(patients: PatientSource) -> list[str]:
    if isinstance(patients, (str, os.PathLike, Manifest)):
        ids = patients_by_split(patients)["train"]
        if not ids:
            raise ValueError(f"dataset {str(_root(patients))!r} has no train patients")
        return ids
    ids = sorted(set(patients))
    if not ids:
        raise ValueError("train_patients is empty")
    if not all(isinstance(p, str) for p in ids):
        raise TypeError("train_patients must be patient-id strings (or a dataset directory)")
    return ids


def _check_fraction(fraction: object) -> float:
    if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real) or not 0 < fraction <= 1:
        raise ValueError(f"label fraction={fraction!r} must be a number in (0, 1], e.g. 0.05 for 5%")
    return float(fraction)


def patient_classes(dataset: str | os.PathLike | Manifest, split: str = "train") -> dict[str, int]:
    """The class of each patient of a split that has one, for a stratified :func:`labelled_patients`.

    A patient's class is its bag's ``class_label`` in ``bags.parquet``, fixed at ingest: the most
    frequent ``class_label`` of its images (ties -> the smallest), so a patient whose images
    disagree still has one class. Patients none of whose images has a ``class_label`` are left
    out: they are never labelled for classification (their rows carry no target).

    Args:
        dataset: Dataset directory, or a :class:`Manifest` from :func:`read_manifest`.
        split: One of ``SPLITS``.

    Returns:
        ``{patient_id: class index}``.

    Raises:
        ValueError: unknown split.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    t = read_bags_table(_root(dataset), columns=["patient_id", "class_label"], filter=[("split", "=", split)])
    return {p: int(c) for p, c in zip(t["patient_id"].to_pylist(), t["class_label"].to_pylist()) if c is not None}


def _check_classes(classes: object) -> Mapping[str, int | None]:
    if not isinstance(classes, Mapping):
        raise TypeError(f"classes must be a mapping patient_id -> class index (patient_classes), "
                        f"got {type(classes).__name__}")
    for p, c in classes.items():
        if c is not None and (isinstance(c, bool) or not isinstance(c, numbers.Integral)):
            raise TypeError(f"classes[{p!r}]={c!r} must be an int class index (or None: no class)")
    return classes


def _stratified(ids: list[str], classes: Mapping[str, int | None], fraction: float, seed: int) -> list[str]:
    by_class: dict[int, list[str]] = {}
    for p in ids:  # sorted, so each class's list is sorted
        if classes.get(p) is not None:
            by_class.setdefault(int(classes[p]), []).append(p)
    if not by_class:
        raise ValueError(f"none of the {len(ids)} train patients has a class in classes; "
                         "nothing to label for classification")
    rng = np.random.default_rng(seed)
    out: list[str] = []
    for c in sorted(by_class):
        members = by_class[c]
        perm = rng.permutation(len(members))
        out += [members[i] for i in perm[: max(1, _round_half_up(fraction * len(members)))]]
    return out


def labelled_patients(train_patients: PatientSource, fraction: float, seed: int = 0, *,
                      classes: Mapping[str, int | None] | None = None) -> list[str]:
    """The labelled subset of the training patients for a label fraction.

    Without ``classes`` (segmentation, multi-label classification): a seeded permutation of the
    ``n`` sorted training patients, of which the first ``max(1, round_half_up(fraction * n))``.

    With ``classes`` (single-label classification: stratified): only the patients with a class are
    eligible; the eligible patients of each class ``c`` (``n_c`` of them) get their own seeded
    permutation (one generator seeded with ``seed``, drawn class by class in ascending class
    order), and the first ``max(1, round_half_up(fraction * n_c))`` of each are labelled. So
    ``fraction`` is a fraction *of each class*: every class has at least one labelled patient at
    every fraction, and each class's count is within one patient of ``fraction * n_c``. Where a
    class has fewer than ``1 / (2 * fraction)`` patients (``fraction * n_c`` rounds to 0) the floor
    of one makes the realised fraction larger than ``fraction``: 1 % of 60 training patients, 30
    per class, labels 2 patients (one per class, 3.3 %), and a plain draw would label 1.

    Either way the same seed gives the same permutations for every fraction, so the subsets are
    nested: a smaller fraction's patients are inside a larger one's.

    Args:
        train_patients: Training patient ids, or a dataset directory / :class:`Manifest`
            (its ``split == "train"`` patients are used; val/test never are).
        fraction: Labelled fraction in (0, 1].
        seed: Permutation seed; fixed across fractions so subsets are nested.
        classes: ``{patient_id: class index}`` (:func:`patient_classes`) to draw per class;
            patients missing from it or mapped to None are never labelled. None: the plain draw.

    Returns:
        Patient ids in permutation order (stratified: class by class, each class in its
        permutation order): the result for a smaller fraction is a prefix of the result for a
        larger one (stratified: per class).

    Raises:
        ValueError: fraction outside (0, 1] (naming it), no patients, no patient with a class, bad seed.
        TypeError: ``classes`` not a mapping of int class indices.

    Example:
        >>> labelled_patients(["a", "b", "c", "d"], 0.5, seed=0)  # doctest: +SKIP
        ['c', 'a']
        >>> labelled_patients(["a", "b", "c", "d"], 0.01, seed=0, classes={"a": 0, "b": 0, "c": 1, "d": 1})
        ... # doctest: +SKIP
        ['a', 'c']
    """
    f = _check_fraction(fraction)
    ids = _train_patients(train_patients)
    seed = _check_seed(seed)
    if classes is not None:
        return _stratified(ids, _check_classes(classes), f, seed)
    perm = np.random.default_rng(seed).permutation(len(ids))
    k = max(1, _round_half_up(f * len(ids)))
    return [ids[i] for i in perm[:k]]


def unlabelled_patients(train_patients: PatientSource, fraction: float, seed: int = 0, *,
                        classes: Mapping[str, int | None] | None = None) -> list[str]:
    """The training patients not in :func:`labelled_patients` (same arguments), sorted.

    With ``classes``, the patients without a class are unlabelled too.
    """
    labelled = set(labelled_patients(train_patients, fraction, seed, classes=classes))
    return [p for p in _train_patients(train_patients) if p not in labelled]
