"""Per-bag sampling for image-level contrastive pretraining (MICLe pairs, volume partitions).

A *bag* is one row of ``bags.parquet`` (``BAG_SCHEMA``): every image of one patient, flattened
(``images`` = n*C*H*W floats, ``image_shape`` = [C, H, W], ``volume_ids`` and
``slice_positions`` of length n). The functions here take a **batch of bag rows** as a dict
of columns, the form Ray Data hands to ``collate_fn`` / ``iter_batches(batch_format="numpy")``
(list columns arrive as object arrays of 1-D arrays, or as 2-D arrays when all rows have
the same length; plain lists are accepted too), and return torch tensors ready for the
encoder. They use numpy randomness (``numpy.random.Generator``) and no Ray.

References: MICLe, Azizi et al. 2021 (methods.md 1c); volume partitions ("G^D"),
Chaitanya et al. 2020 (methods.md 1d).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["bag_images", "sample_micle_pairs", "sample_partitions"]

_RngLike = np.random.Generator | int | None


def _rng(rng: _RngLike) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    if rng is None or isinstance(rng, (int, np.integer)):
        return np.random.default_rng(rng)
    raise TypeError(f"rng must be a numpy Generator, an int seed or None, got {type(rng).__name__}")


def _column(batch: Mapping[str, Any], name: str) -> Sequence[Any]:
    if not isinstance(batch, Mapping):
        raise TypeError(f"batch must be a mapping of column name -> values, got {type(batch).__name__}")
    if name not in batch:
        raise ValueError(f"bag batch has no column {name!r}; got columns {sorted(batch)} (expected BAG_SCHEMA rows)")
    return batch[name]


def bag_images(batch: Mapping[str, Any], row: int) -> np.ndarray:
    """The images of bag ``row`` as float32 ``(n, C, H, W)``.

    Raises:
        ValueError: the flattened images do not fit ``image_shape`` / ``num_images``.
    """
    shape = tuple(int(s) for s in np.asarray(_column(batch, "image_shape")[row]).reshape(-1))
    if len(shape) != 3:
        raise ValueError(f"bag row {row}: image_shape must be [C, H, W], got {list(shape)}")
    flat = np.asarray(_column(batch, "images")[row], dtype=np.float32).reshape(-1)
    per_image = int(np.prod(shape))
    if per_image == 0 or flat.size % per_image or flat.size == 0:
        pid = str(_column(batch, "patient_id")[row])
        raise ValueError(f"bag of patient {pid!r}: {flat.size} image values is not a positive multiple of "
                         f"C*H*W={per_image} (image_shape={list(shape)})")
    images = flat.reshape(-1, *shape)
    if "num_images" in batch and int(batch["num_images"][row]) != images.shape[0]:
        pid = str(_column(batch, "patient_id")[row])
        raise ValueError(f"bag of patient {pid!r}: num_images={int(batch['num_images'][row])} but "
                         f"images hold {images.shape[0]}")
    return images


def _stack(images: list[np.ndarray], patients: list[str]) -> torch.Tensor:
    if not images:
        raise ValueError("bag batch is empty (0 rows)")
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise ValueError(f"bags of one batch must share one image shape, got {sorted(shapes)} "
                         f"for patients {patients}; resize at ingest")
    return torch.from_numpy(np.stack(images).astype(np.float32, copy=False))


def sample_micle_pairs(batch: Mapping[str, Any], rng: _RngLike = None) -> dict[str, Any]:
    """One MICLe positive pair per bag: two **different** randomly chosen images of the bag.

    A bag of one image yields that image twice; its two views then differ only by augmentation
    (apply the view transform to ``image_a`` and ``image_b`` independently afterwards).

    Args:
        batch: B bag rows (columns ``patient_id``, ``images``, ``image_shape``; ``num_images``
            is checked when present).
        rng: numpy Generator (keep one per stream for a reproducible sequence), seed or None.

    Returns:
        ``image_a``, ``image_b``: float32 tensors ``(B, C, H, W)``; ``index_a``, ``index_b``:
        int64 ``(B,)`` positions of the chosen images in their bags; ``patient_id``: str array ``(B,)``.

    Example:
        >>> collate = functools.partial(sample_micle_pairs, rng=np.random.default_rng(0))
    """
    gen = _rng(rng)
    patients = [str(p) for p in _column(batch, "patient_id")]
    image_a, image_b, idx_a, idx_b = [], [], [], []
    for row in range(len(patients)):
        images = bag_images(batch, row)
        n = images.shape[0]
        if n >= 2:
            a, b = gen.choice(n, size=2, replace=False)
        else:
            a = b = 0
        image_a.append(images[a])
        image_b.append(images[b])
        idx_a.append(int(a))
        idx_b.append(int(b))
    return {
        "image_a": _stack(image_a, patients),
        "image_b": _stack(image_b, patients),
        "index_a": torch.tensor(idx_a, dtype=torch.int64),
        "index_b": torch.tensor(idx_b, dtype=torch.int64),
        "patient_id": np.asarray(patients, dtype=object),
    }


def sample_partitions(batch: Mapping[str, Any], num_partitions: int = 4, rng: _RngLike = None) -> dict[str, Any]:
    """One random slice from each of S equal partitions of a volume, for every bag (G^D sampling).

    Partition of a slice: ``min(floor(slice_position * S), S - 1)``. When a bag holds several
    volumes, one volume is chosen at random (partitions are defined within a volume). When a
    volume has no slice in partition k (fewer than S slices, or uneven positions), the slice
    whose position is nearest to the partition centre ``(k + 0.5) / S`` is taken instead (ties:
    the lower slice), so every bag always contributes exactly S images.

    Args:
        batch: B bag rows (columns ``patient_id``, ``images``, ``image_shape``, ``volume_ids``,
            ``slice_positions``).
        num_partitions: S >= 1.
        rng: numpy Generator, seed or None.

    Returns:
        Bag-major rows (row ``b * S + k`` = bag b, partition k): ``image`` float32
        ``(B*S, C, H, W)``; ``group_id`` int64 ``(B*S,)`` = partition index k (the positive
        group of methods.md 1d); ``bag_index`` int64 ``(B*S,)``; ``slice_position`` float32
        ``(B*S,)``; ``patient_id`` and ``volume_id``: str arrays ``(B*S,)``.

    Raises:
        ValueError: ``num_partitions`` < 1, or ``volume_ids``/``slice_positions`` lengths
            that do not match the bag's images.
    """
    if isinstance(num_partitions, bool) or not isinstance(num_partitions, (int, np.integer)) or num_partitions < 1:
        raise ValueError(f"num_partitions must be an integer >= 1, got {num_partitions!r}")
    s = int(num_partitions)
    gen = _rng(rng)
    patients = [str(p) for p in _column(batch, "patient_id")]
    volumes_col, positions_col = _column(batch, "volume_ids"), _column(batch, "slice_positions")
    images_out, group, bag_index, pos_out, pid_out, vid_out = [], [], [], [], [], []
    centres = (np.arange(s) + 0.5) / s
    for row, pid in enumerate(patients):
        images = bag_images(batch, row)
        volume_ids = np.asarray([str(v) for v in np.asarray(volumes_col[row], dtype=object).reshape(-1)])
        positions = np.asarray(positions_col[row], dtype=np.float64).reshape(-1)
        if not len(volume_ids) == len(positions) == images.shape[0]:
            raise ValueError(f"bag of patient {pid!r}: {images.shape[0]} images but {len(volume_ids)} volume_ids "
                             f"and {len(positions)} slice_positions")
        unique = np.unique(volume_ids)
        volume = unique[gen.integers(len(unique))] if len(unique) > 1 else unique[0]
        idx = np.flatnonzero(volume_ids == volume)
        pos = positions[idx]
        part = np.clip(np.floor(pos * s).astype(np.int64), 0, s - 1)
        for k in range(s):
            candidates = idx[part == k]
            if candidates.size:
                chosen = int(candidates[gen.integers(candidates.size)])
            else:
                chosen = int(idx[np.argmin(np.abs(pos - centres[k]))])
            images_out.append(images[chosen])
            group.append(k)
            bag_index.append(row)
            pos_out.append(positions[chosen])
            pid_out.append(pid)
            vid_out.append(str(volume))
    return {
        "image": _stack(images_out, patients),
        "group_id": torch.tensor(group, dtype=torch.int64),
        "bag_index": torch.tensor(bag_index, dtype=torch.int64),
        "slice_position": torch.tensor(pos_out, dtype=torch.float32),
        "patient_id": np.asarray(pid_out, dtype=object),
        "volume_id": np.asarray(vid_out, dtype=object),
    }
