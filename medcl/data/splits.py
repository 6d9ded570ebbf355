"""Patient-level splits and nested labelled subsets.

Splits are by patient (never by slice), assigned once at ingest into the
``split`` column. Labelled subsets are drawn from the *training* patients
only: a seeded permutation of the sorted training patients, of which the
first ``max(1, round(fraction * n))`` are labelled (rounding half up: 6.5 -> 7).
The same seed gives the same permutation for every fraction, so smaller subsets are prefixes of larger
ones (the 5% patients are inside the 10% ones), and validation/test patients
can never be drawn.
"""
from __future__ import annotations

import math
import numbers
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from medcl.data.decode import read_bags_table
from medcl.data.manifest import Manifest
from medcl.data.schema import SPLITS

__all__ = [
    "check_split_ratios",
    "split_patients",
    "patients_by_split",
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


def labelled_patients(train_patients: PatientSource, fraction: float, seed: int = 0) -> list[str]:
    """The labelled subset of the training patients for a label fraction.

    Args:
        train_patients: Training patient ids, or a dataset directory / :class:`Manifest`
            (its ``split == "train"`` patients are used; val/test never are).
        fraction: Labelled fraction in (0, 1].
        seed: Permutation seed; fixed across fractions so subsets are nested.

    Returns:
        ``max(1, round_half_up(fraction * n))`` patient ids, in permutation order: the
        result for a smaller fraction is a prefix of the result for a larger one.

    Raises:
        ValueError: fraction outside (0, 1] (naming it), no patients, bad seed.

    Example:
        >>> labelled_patients(["a", "b", "c", "d"], 0.5, seed=0)  # doctest: +SKIP
        ['c', 'a']
    """
    f = _check_fraction(fraction)
    ids = _train_patients(train_patients)
    perm = np.random.default_rng(_check_seed(seed)).permutation(len(ids))
    k = max(1, _round_half_up(f * len(ids)))
    return [ids[i] for i in perm[:k]]


def unlabelled_patients(train_patients: PatientSource, fraction: float, seed: int = 0) -> list[str]:
    """The training patients not in :func:`labelled_patients` (same arguments), sorted."""
    labelled = set(labelled_patients(train_patients, fraction, seed))
    return [p for p in _train_patients(train_patients) if p not in labelled]
