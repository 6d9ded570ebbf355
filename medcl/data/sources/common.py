"""What every ingest source shares: the error type, option checks, resizing, normalisation, the write step.

Every bad input raises one :class:`IngestError` (a ``ValueError``) naming the
file, option or value. :func:`run_ingest` fingerprints the source and writes
the dataset through :func:`medcl.data.shards.write_dataset`, which builds it in
a staging directory removed on error, so an old dataset at ``out_dir`` stays
intact. The sources (``msd``, ``medmnist``, ``image_folder``, ``synthetic``)
import this module; :mod:`medcl.data.ingest` dispatches to them.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medcl.data.image_block import ImageBlock
from medcl.data.manifest import Manifest, source_fingerprint
from medcl.data.shards import write_dataset

__all__ = [
    "IngestError",
    "read_csv_table",
    "NORMALISATIONS",
    "run_ingest",
    "resize_images",
    "resize_masks",
    "normalise",
    "check_int",
    "check_choice",
    "check_bool",
    "source_file",
]

logger = logging.getLogger(__name__)

#: Intensity normalisations: name -> description written to the manifest.
NORMALISATIONS = {
    "percentile": "clip to the 0.5th-99.5th percentile, then scale linearly to [0, 1]",
    "minmax": "scale linearly from [min, max] to [0, 1]",
    "zscore": "subtract the mean and divide by the standard deviation",
    "none": "intensities kept as stored",
}


class IngestError(ValueError):
    """Bad ingest input (file, option or value); the message names it."""


def check_int(name: str, value: Any, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` as an int within bounds, else :class:`IngestError` naming the option."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise IngestError(f"{name}={value!r} must be an int")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise IngestError(f"{name}={value!r} must lie in [{minimum}, {maximum if maximum is not None else 'inf'}]")
    return int(value)


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    """``value`` if it is one of ``choices``, else :class:`IngestError` naming the option."""
    choices = list(choices)
    if value not in choices:
        raise IngestError(f"{name}={value!r} must be one of {choices}")
    return value


def check_bool(name: str, value: Any) -> bool:
    """``value`` if it is a bool, else :class:`IngestError` naming the option."""
    if not isinstance(value, bool):
        raise IngestError(f"{name}={value!r} must be true or false")
    return value


def source_file(root: Path, name: str, where: str, allow_outside: bool) -> Path:
    """The file a source lists (a CSV cell, a ``dataset.json`` entry), refused when it lies outside ``root``.

    A relative ``name`` is taken relative to ``root``, an absolute one as it is.
    Unless ``allow_outside``, the path with every symlink and ``..`` resolved must
    lie inside ``root`` (resolved too): a source cannot make the ingest read other
    files of the machine, and a link inside the folder that points outside counts
    as outside.

    Args:
        root: The source's folder (the CSV's folder, the task folder).
        name: The path as the source wrote it.
        where: What names it, for the message (``"images.csv row 3, column 'image'"``).
        allow_outside: The ingest option ``allow_outside_paths``.

    Returns:
        The path, normalised (``..`` collapsed) but with its symlinks kept.

    Raises:
        IngestError: the path lies outside ``root`` (names ``where``, the path and what it resolves to).
    """
    path = Path(os.path.normpath(root / name))
    if allow_outside:
        return path
    real, real_root = path.resolve(), root.resolve()
    if not real.is_relative_to(real_root):
        shown = "" if str(real) == name else f", which resolves to {real}"
        raise IngestError(f"{where}: {name!r}{shown} lies outside the source folder {real_root}; move the file into "
                          "it, or allow outside paths explicitly (option allow_outside_paths: true, "
                          "`--allow-outside-paths true`)")
    return path


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize (antialiased when shrinking) to ``size x size``.

    Args:
        images: Shape: (N, C, h, w).
        size: Output height and width.

    Returns:
        float32 array. Shape: (N, C, size, size).
    """
    x = np.ascontiguousarray(images, dtype=np.float32)
    if x.shape[-2:] == (size, size) or x.shape[0] == 0:
        return x
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        # Antialiasing only changes anything when shrinking; its kernel is slower, so skip it otherwise.
        shrink = x.shape[-2] > size or x.shape[-1] > size
        y = F.interpolate(torch.from_numpy(x), size=(size, size), mode="bilinear", align_corners=False,
                          antialias=shrink)
    return y.numpy()


def resize_masks(masks: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize ("nearest-exact": pixel centres) of class-index masks.

    Args:
        masks: Integer class indices. Shape: (N, h, w).
        size: Output height and width (an int: square), e.g. a prediction's way back to its input's size.

    Returns:
        int64 array with only values present in ``masks``. Shape: (N, size, size) or (N, *size).
    """
    m = np.asarray(masks)
    out_h, out_w = (size, size) if isinstance(size, (int, np.integer)) else (int(size[0]), int(size[1]))
    if m.shape[-2:] == (out_h, out_w) or m.shape[0] == 0:
        return m.astype(np.int64)
    h, w = m.shape[-2:]
    # out[i] = in[floor((i + 0.5) * h / size)]: torch's "nearest-exact", done as an index gather.
    rows = np.minimum(((np.arange(out_h) + 0.5) * (h / out_h)).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(out_w) + 0.5) * (w / out_w)).astype(np.int64), w - 1)
    return m[:, rows][:, :, cols].astype(np.int64)


def normalise(x: np.ndarray, method: str, axes: tuple[int, ...] | None = None) -> np.ndarray:
    """Normalise intensities with one of :data:`NORMALISATIONS`, statistics taken over ``axes``.

    Args:
        x: Finite intensities, any shape.
        method: Key of :data:`NORMALISATIONS`.
        axes: Axes the statistics are reduced over (default: all), e.g. the
            spatial axes of a volume for per-channel statistics.

    Returns:
        float32 array of the same shape. A constant input maps to 0.
    """
    x = np.asarray(x, dtype=np.float32)
    if method == "none":
        return x
    if method == "zscore":
        mean = x.mean(axis=axes, keepdims=True)
        std = x.std(axis=axes, keepdims=True)
        return ((x - mean) / np.where(std > 0, std, 1)).astype(np.float32)
    if method == "percentile":
        lo, hi = np.percentile(x, [0.5, 99.5], axis=axes, keepdims=True)
        x = np.clip(x, lo, hi)
    elif method == "minmax":
        lo, hi = x.min(axis=axes, keepdims=True), x.max(axis=axes, keepdims=True)
    else:
        raise IngestError(f"normalisation={method!r} must be one of {sorted(NORMALISATIONS)}")
    span = hi - lo
    return ((x - lo) / np.where(span > 0, span, 1)).astype(np.float32)


def run_ingest(
    kind: str,
    source_path: str | os.PathLike | None,
    out_dir: str | os.PathLike,
    options: Mapping[str, Any],
    files: Sequence[Path],
    root: Path | None,
    blocks: Iterable[ImageBlock],
    *,
    force: bool,
    **manifest_fields: Any,
) -> Manifest:
    """Fingerprint the source, then write the dataset unless ``out_dir`` is already up to date.

    Args:
        kind: Source kind.
        source_path: Source path recorded in the manifest.
        out_dir: Dataset directory.
        options: Resolved options (defaults filled in), recorded and fingerprinted.
        files: Every source file the ingest reads (paths, sizes and mtimes are fingerprinted).
        root: Directory the file paths are made relative to.
        blocks: Lazy iterable of rows; only consumed when a write is needed.
        force: Rewrite even if up to date.
        **manifest_fields: Passed to :func:`medcl.data.shards.write_dataset`
            (task, label_map, class_names, normalisation, split_*, extras, rows_per_shard).

    Raises:
        IngestError: any ValueError raised while writing, re-raised naming ``out_dir``.
    """
    fingerprint = source_fingerprint(kind, options, root, files)
    source = {"kind": kind, "path": None if source_path is None else str(Path(source_path).absolute()),
              "options": _jsonable(options)}
    try:
        return write_dataset(out_dir, blocks, source=source, fingerprint=fingerprint, force=force,
                             **manifest_fields)
    except IngestError:
        raise
    except ValueError as e:
        raise IngestError(f"{kind} ingest into {str(out_dir)!r}: {e}") from e


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, os.PathLike):
        return str(value)
    return value


def read_csv_table(path: Path, required: Sequence[str]) -> Any:
    """A CSV of image paths as a pandas DataFrame of strings (no NaN for empty cells).

    Raises:
        IngestError: the file is missing or unreadable, a ``required`` column is absent, or it has no rows.
    """
    import pandas as pd

    if not path.is_file():
        raise IngestError(f"{path}: CSV file not found")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError) as e:
        raise IngestError(f"{path}: cannot read CSV ({type(e).__name__}: {e})") from e
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise IngestError(f"{path}: column(s) {missing} not found; columns are {list(df.columns)}")
    if len(df) == 0:
        raise IngestError(f"{path}: empty source, the CSV has no rows")
    return df
