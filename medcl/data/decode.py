"""Reading a dataset's rows and decoding them into arrays.

:func:`read_shards_table` / :func:`read_bags_table` read the files a manifest
lists (stray files in the directory are ignored) with optional column
selection and row filter. :func:`decode_images` / :func:`decode_masks` turn
rows (a pyarrow Table/RecordBatch, a Ray Data numpy batch or a DataFrame) into
float32 ``[N, C, H, W]`` images and int64 ``[N, H, W]`` masks;
:func:`decode_shard_batch` decodes whole shard rows to the batch contract of
:mod:`medcl.data.streams` (Ray Data runs it in its tasks: this module imports
numpy and pyarrow only, no torch).
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from medcl.data.manifest import read_manifest
from medcl.data.schema import BAG_SCHEMA, IGNORE_INDEX, SHARD_SCHEMA

__all__ = ["read_shards_table", "read_bags_table", "decode_images", "decode_masks", "decode_shard_batch"]

_STRING_KEYS = ("patient_id", "volume_id", "site")


def _dataset(root: Path, files: Sequence[str], schema: pa.Schema) -> pads.Dataset:
    return pads.dataset([str(root / f) for f in files], format="parquet", schema=schema)


def _to_expression(filter: Any) -> Any:
    if filter is None or isinstance(filter, pc.Expression):
        return filter
    return pq.filters_to_expression(filter)


def read_shards_table(path: str | os.PathLike, columns: Sequence[str] | None = None, filter: Any = None) -> pa.Table:
    """Read a dataset's shard rows (only the shards its manifest lists).

    Args:
        path: Dataset directory.
        columns: Columns to read (default: all of :data:`SHARD_SCHEMA`).
        filter: A ``pyarrow.compute`` expression (``pc.field("split") == "train"``)
            or a DNF filter list (``[("split", "=", "train")]``).

    Returns:
        A table with :data:`SHARD_SCHEMA` columns, rows in shard order.
    """
    m = read_manifest(path)
    return _dataset(m.root, [s.file for s in m.shards], SHARD_SCHEMA).to_table(
        columns=list(columns) if columns is not None else None, filter=_to_expression(filter))


def read_bags_table(path: str | os.PathLike, columns: Sequence[str] | None = None, filter: Any = None) -> pa.Table:
    """Read ``bags.parquet`` (one row per patient, :data:`BAG_SCHEMA`); arguments as :func:`read_shards_table`."""
    m = read_manifest(path)
    return _dataset(m.root, [m.bags.file], BAG_SCHEMA).to_table(
        columns=list(columns) if columns is not None else None, filter=_to_expression(filter))


def _column(batch: Any, name: str) -> Any:
    if isinstance(batch, (pa.Table, pa.RecordBatch)):
        col = batch.column(name)
        return col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if hasattr(batch, "columns") and hasattr(batch, "to_numpy"):  # pandas DataFrame
        return batch[name].to_numpy()
    if isinstance(batch, Mapping):
        if name not in batch:
            raise ValueError(f"batch has no column {name!r}; columns are {sorted(batch)}")
        return batch[name]
    raise TypeError("expected a pyarrow Table/RecordBatch, a dict of arrays or a DataFrame, "
                    f"got {type(batch).__name__}")


def _rows(col: Any, dtype: Any) -> list[np.ndarray | None]:
    """Per-row arrays (None for null rows) of a list column from a numpy/pandas batch."""
    if isinstance(col, np.ndarray) and col.dtype != object:
        return [np.asarray(r, dtype=dtype) for r in col.reshape(len(col), -1)]
    return [None if r is None else np.asarray(r, dtype=dtype) for r in col]


def _shapes(batch: Any) -> np.ndarray:
    col = _column(batch, "image_shape")
    if isinstance(col, pa.Array):
        n = len(col)
        shapes = np.asarray(col.flatten().to_numpy(zero_copy_only=False), dtype=np.int64).reshape(n, -1)
    else:
        shapes = np.stack(_rows(col, np.int64)) if len(col) else np.zeros((0, 3), np.int64)
    if shapes.ndim != 2 or shapes.shape[1] != 3:
        raise ValueError(f"image_shape column must hold [C, H, W] per row, got array of shape {shapes.shape}")
    if len(shapes) and not (shapes == shapes[0]).all():
        raise ValueError(f"rows have different image_shape values {np.unique(shapes, axis=0).tolist()}; "
                         "decode rows of one dataset at a time")
    return shapes


def decode_images(batch: Any) -> np.ndarray:
    """Stack the ``image`` column of rows into an array.

    Args:
        batch: A ``pa.Table`` / ``pa.RecordBatch``, a dict of numpy arrays (a
            Ray Data numpy batch) or a pandas DataFrame with columns ``image``
            and ``image_shape``.

    Returns:
        float32 array of shape ``(N, C, H, W)``.
    """
    shapes = _shapes(batch)
    n = len(shapes)
    if n == 0:
        return np.zeros((0, 0, 0, 0), np.float32)
    c, h, w = (int(v) for v in shapes[0])
    col = _column(batch, "image")
    if isinstance(col, pa.Array):
        if col.null_count:
            raise ValueError(f"{col.null_count} row(s) have a null image")
        flat = col.flatten().to_numpy(zero_copy_only=False)
    elif isinstance(col, np.ndarray) and col.dtype != object:
        flat = col  # a Ray batch of equal-length lists arrives as one (N, C*H*W) array
    else:
        flat = np.concatenate(_rows(col, np.float32))
    if flat.size != n * c * h * w:
        raise ValueError(f"image column holds {flat.size} values, expected {n}x{c}x{h}x{w}")
    return np.ascontiguousarray(flat, dtype=np.float32).reshape(n, c, h, w)


def decode_masks(batch: Any) -> np.ndarray:
    """Stack the ``mask`` column of rows; rows without a mask become all ``-1`` (ignore).

    Args:
        batch: As :func:`decode_images`, with columns ``mask`` and ``image_shape``.

    Returns:
        int64 array of shape ``(N, H, W)``.
    """
    shapes = _shapes(batch)
    n = len(shapes)
    h, w = (int(v) for v in shapes[0][1:]) if n else (0, 0)
    out = np.full((n, h, w), IGNORE_INDEX, dtype=np.int64)
    col = _column(batch, "mask")
    if isinstance(col, pa.Array):
        valid = ~np.asarray(col.is_null().to_numpy(zero_copy_only=False), dtype=bool)
        flat = col.flatten().to_numpy(zero_copy_only=False)
        if flat.size != valid.sum() * h * w:
            raise ValueError(f"mask column holds {flat.size} values, expected {int(valid.sum())}x{h}x{w}")
        out[valid] = flat.reshape(-1, h, w)
    else:
        for i, r in enumerate(_rows(col, np.int64)):
            if r is not None:
                out[i] = r.reshape(h, w)
    return out


def decode_shard_batch(table: pa.Table, *, with_mask: bool = False,
                       with_class_labels: bool = False) -> dict[str, np.ndarray]:
    """Decode a batch of shard rows (a ``pa.Table`` in ``SHARD_SCHEMA``) to the batch contract.

    All rows of a batch must share one ``image_shape`` (:func:`decode_images`). Rows without a
    mask get an all ``IGNORE_INDEX`` mask; rows without ``class_label`` get -1; rows without
    ``class_labels`` get zeros.

    Args:
        table: n shard rows (at least ``image``, ``image_shape``, ``patient_id``, ``volume_id``,
            ``slice_index``, ``slice_position``, ``site``, ``class_label``; ``mask`` /
            ``class_labels`` when requested).
        with_mask: also decode ``mask`` -> int64 ``(n, H, W)``.
        with_class_labels: also decode ``class_labels`` -> float32 ``(n, K)``.

    Returns:
        Dict of numpy arrays, the batch contract of :mod:`medcl.data.streams`.

    Raises:
        ValueError: mixed image shapes, or flattened sizes that do not match ``image_shape``.
    """
    out: dict[str, np.ndarray] = {
        "image": decode_images(table),
        "slice_position": table.column("slice_position").to_numpy().astype(np.float32),
        "slice_index": table.column("slice_index").to_numpy().astype(np.int64),
        "class_label": table.column("class_label").fill_null(-1).to_numpy().astype(np.int64),
    }
    for key in _STRING_KEYS:
        out[key] = np.asarray(table.column(key).to_pylist(), dtype=object)
    if with_mask:
        out["mask"] = decode_masks(table)
    if with_class_labels:
        column = table.column("class_labels").combine_chunks()
        valid = np.asarray(column.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
        values = column.flatten().to_numpy(zero_copy_only=False)
        k = values.size // max(int(valid.sum()), 1)
        if values.size != int(valid.sum()) * k:
            raise ValueError(f"class_labels rows differ in length ({values.size} values, {int(valid.sum())} rows)")
        labels = np.zeros((table.num_rows, k), dtype=np.float32)
        labels[valid] = values.reshape(-1, k)
        out["class_labels"] = labels
    return out
