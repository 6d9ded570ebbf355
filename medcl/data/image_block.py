"""Shard rows in column form: :class:`ImageBlock`, what every ingest source yields.

A block is consecutive rows of :data:`~medcl.data.schema.SHARD_SCHEMA` (one volume, one
patient, or a chunk of 2D images) held as arrays; :meth:`ImageBlock.to_record_batch` turns it
into the Arrow record batch that :func:`medcl.data.shards.write_dataset` writes.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from medcl.data.schema import IGNORE_INDEX, SHARD_SCHEMA, SPLITS

__all__ = ["ImageBlock"]


def _per_row(value: Any, n: int, name: str) -> list[Any]:
    if value is None or isinstance(value, (str, int, float, np.integer, np.floating)):
        return [value] * n
    out = list(value)
    if len(out) != n:
        raise ValueError(f"{name} has {len(out)} entries for {n} images")
    return out


def _list_array(flat: np.ndarray, n: int, width: int, pa_type: pa.DataType) -> pa.ListArray:
    offsets = pa.array(np.arange(n + 1, dtype=np.int64) * width, pa.int32())
    return pa.ListArray.from_arrays(offsets, pa.array(flat.reshape(-1), pa_type))


@dataclass
class ImageBlock:
    """Consecutive shard rows (one volume, one patient, or a chunk of 2D images) in column form.

    Per-row fields take a sequence of length n or one value for every row.

    Attributes:
        images: Intensities. Shape: (n, C, H, W), finite floats.
        patient_id, volume_id, split, source_path: Per-row strings; split in SPLITS.
        site: Acquisition site ("A" unless a shifted site).
        slice_index: Slice number in its volume / view index (default 0).
        slice_position: slice_index / slices of the volume, in [0, 1) (default 0).
        view: View name per row, or None.
        masks: Class indices, -1 = unlabelled pixel. Shape: (n, H, W); None = no masks.
        class_label: Single-label class per row, -1 = none; None = no labels.
        class_labels: Multi-hot targets. Shape: (n, K) or (K,); None = none.
    """

    images: np.ndarray
    patient_id: str | Sequence[str]
    volume_id: str | Sequence[str]
    split: str | Sequence[str]
    source_path: str | Sequence[str]
    site: str | Sequence[str] = "A"
    slice_index: int | Sequence[int] = 0
    slice_position: float | Sequence[float] = 0.0
    view: str | Sequence[str | None] | None = None
    masks: np.ndarray | None = None
    class_label: int | Sequence[int] | None = None
    class_labels: np.ndarray | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.images, np.ndarray) or self.images.ndim != 4:
            got = getattr(self.images, "shape", self.images)
            raise ValueError(f"images must be an array of shape (n, C, H, W), got {got!r}")
        if not np.isfinite(self.images).all():
            raise ValueError(f"images of {self.source_paths()[0]!r} contain NaN or inf")
        n, _, h, w = self.images.shape
        if self.masks is not None and tuple(self.masks.shape) != (n, h, w):
            raise ValueError(f"masks shape {list(self.masks.shape)} != images (n, H, W) {[n, h, w]}")
        bad = set(_per_row(self.split, n, "split")) - set(SPLITS)
        if bad:
            raise ValueError(f"split values {sorted(map(str, bad))} not in {SPLITS}")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def source_paths(self) -> list[str]:
        return _per_row(self.source_path, len(self), "source_path")

    def to_record_batch(self) -> pa.RecordBatch:
        """The rows as a :data:`SHARD_SCHEMA` record batch."""
        n, c, h, w = self.images.shape
        images = _list_array(np.ascontiguousarray(self.images, np.float32), n, c * h * w, pa.float32())
        shape = _list_array(np.tile(np.array([c, h, w], np.int32), n), n, 3, pa.int32())
        if self.masks is None:
            masks = pa.nulls(n, pa.list_(pa.int16()))
        else:
            m = np.asarray(self.masks)
            if m.size and (m.min() < IGNORE_INDEX or m.max() > np.iinfo(np.int16).max):
                raise ValueError(f"mask values must lie in [-1, 32767], got [{m.min()}, {m.max()}]")
            masks = _list_array(m.astype(np.int16), n, h * w, pa.int16())
        if self.class_label is None:
            label = pa.nulls(n, pa.int32())
        else:
            lab = np.asarray(_per_row(self.class_label, n, "class_label"), dtype=np.int64)
            label = pa.array(lab, pa.int32(), mask=lab < 0)
        if self.class_labels is None:
            labels = pa.nulls(n, pa.list_(pa.uint8()))
        else:
            multi = np.asarray(self.class_labels)
            multi = np.broadcast_to(multi, (n, multi.shape[-1])) if multi.ndim == 1 else multi
            if multi.shape[0] != n or not np.isin(multi, (0, 1)).all():
                raise ValueError(f"class_labels must be 0/1 of shape (n={n}, K), got shape {list(multi.shape)}")
            labels = _list_array(np.ascontiguousarray(multi, np.uint8), n, multi.shape[1], pa.uint8())
        cols = {
            "patient_id": pa.array(_per_row(self.patient_id, n, "patient_id"), pa.string()),
            "volume_id": pa.array(_per_row(self.volume_id, n, "volume_id"), pa.string()),
            "slice_index": pa.array(_per_row(self.slice_index, n, "slice_index"), pa.int32()),
            "slice_position": pa.array(_per_row(self.slice_position, n, "slice_position"), pa.float32()),
            "view": pa.array(_per_row(self.view, n, "view"), pa.string()),
            "split": pa.array(_per_row(self.split, n, "split"), pa.string()),
            "site": pa.array(_per_row(self.site, n, "site"), pa.string()),
            "image": images,
            "image_shape": shape,
            "mask": masks,
            "class_label": label,
            "class_labels": labels,
            "source_path": pa.array(self.source_paths(), pa.string()),
        }
        return pa.RecordBatch.from_arrays([cols[f.name] for f in SHARD_SCHEMA], schema=SHARD_SCHEMA)
