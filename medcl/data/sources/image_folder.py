"""A folder of 2D images (PNG/JPEG/TIFF) described by a CSV -> shards.

One CSV row per image; the columns are named by options: image path and
patient id (required), mask path, class label(s), view, slice index, volume
id and split (optional). Paths are relative to the CSV's folder (absolute
paths are kept) and must lie inside it, symlinks resolved, unless
``allow_outside_paths`` is set. Patients may have several images (MICLe bags). Images are
read with ``skimage.io.imread``, converted to ``channels`` (1: luminance grey,
3: RGB, grey replicated), normalised per image and resized to ``size x size``
(bilinear; masks nearest).

Labels: ``label_column`` holds one class per row (an int index, or a class
name mapped through ``class_names`` / the sorted distinct names); with
``label_separator`` it holds several names ("a|b") -> multi-hot;
``label_columns`` names several 0/1 columns -> multi-hot. Empty cells mean
"no label" (and an empty mask cell "no mask").
"""
from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medcl.data.image_block import ImageBlock
from medcl.data.manifest import Manifest
from medcl.data.schema import IGNORE_INDEX, SPLITS
from medcl.data.sources.common import (
    NORMALISATIONS,
    IngestError,
    check_bool,
    check_choice,
    check_int,
    read_csv_table,
    resize_images,
    resize_masks,
    run_ingest,
    source_file,
)
from medcl.data.sources.preprocess import image_channels, read_image
from medcl.data.splits import check_split_ratios, split_patients

__all__ = ["ingest_image_folder"]

logger = logging.getLogger(__name__)

_FOLDER_NORMALISATIONS = {"dtype": "integer intensities divided by the dtype maximum (255 for 8-bit), "
                                   "float kept", **{k: v for k, v in NORMALISATIONS.items() if k != "zscore"}}
_INT = re.compile(r"^\s*-?\d+\s*$")


def _read_mask(path: Path, value_map: Mapping[int, int] | None) -> np.ndarray:
    m = read_image(path)
    if m.ndim == 3:
        if not (m == m[..., :1]).all():
            raise IngestError(f"{path}: mask has {m.shape[-1]} differing channels; masks must be single-channel")
        m = m[..., 0]
    if m.ndim != 2 or not (np.issubdtype(m.dtype, np.integer) or np.issubdtype(m.dtype, np.bool_)
                           or np.array_equal(m, np.round(m))):
        raise IngestError(f"{path}: mask must be a 2D array of integer class indices, got {m.dtype} {list(m.shape)}")
    m = m.astype(np.int64)
    if value_map:
        lut = {int(k): int(v) for k, v in value_map.items()}
        out = m.copy()
        for raw, cls in lut.items():
            out[m == raw] = cls
        m = out
    return m


def _parse_labels(df: Any, csv: Path, label_column: str | None, label_columns: Sequence[str] | None,
                  separator: str | None, class_names: Sequence[str] | None) -> tuple[str | None, Any, list[str]]:
    """(kind, per-row labels, class names); kind None / "single" / "multi"."""
    if label_column is not None and label_columns is not None:
        raise IngestError("give label_column or label_columns, not both")
    if label_columns is not None:
        cols = list(label_columns)
        values = df[cols].to_numpy()
        if not np.isin(values, ["0", "1", ""]).all():
            raise IngestError(f"{csv}: label_columns {cols} must hold 0/1 (or empty), "
                              f"got {sorted(set(values.ravel()))[:10]}")
        names = cols if class_names is None else [str(c) for c in class_names]
        if len(names) != len(cols):
            raise IngestError(f"class_names={list(names)} has {len(names)} names for {len(cols)} label_columns")
        multi = np.where(values == "1", 1, 0).astype(np.uint8)
        present = (values != "").any(axis=1)
        return "multi", [row if ok else None for row, ok in zip(multi, present)], names
    if label_column is None:
        return None, [None] * len(df), [] if class_names is None else [str(c) for c in class_names]
    cells = [v.strip() for v in df[label_column]]
    if separator is not None:
        sets = [[t.strip() for t in v.split(separator) if t.strip()] if v else None for v in cells]
        names = sorted({t for s in sets if s for t in s}) if class_names is None else [str(c) for c in class_names]
        index = {n: i for i, n in enumerate(names)}
        rows = []
        for i, s in enumerate(sets):
            unknown = [t for t in (s or []) if t not in index]
            if unknown:
                raise IngestError(f"{csv} row {i + 2}: label(s) {unknown} not in class_names {names}")
            rows.append(None if s is None else np.isin(np.arange(len(names)), [index[t] for t in s]).astype(np.uint8))
        return "multi", rows, names
    filled = [v for v in cells if v]
    if filled and all(_INT.match(v) for v in filled):
        ints = [int(v) if v else -1 for v in cells]
        if any(v < -1 for v in ints):
            raise IngestError(f"{csv}: {label_column} holds negative class indices")
        names = [str(i) for i in range(max(ints) + 1)] if class_names is None else [str(c) for c in class_names]
        if max(ints) >= len(names):
            raise IngestError(f"{csv}: class index {max(ints)} in {label_column} but only {len(names)} class_names")
        return "single", ints, names
    names = sorted(set(filled)) if class_names is None else [str(c) for c in class_names]
    index = {n: i for i, n in enumerate(names)}
    for i, v in enumerate(cells):
        if v and v not in index:
            raise IngestError(f"{csv} row {i + 2}: label {v!r} not in class_names {names}")
    return "single", [index[v] if v else -1 for v in cells], names


def ingest_image_folder(
    csv_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    image_column: str = "image",
    patient_column: str = "patient_id",
    mask_column: str | None = None,
    label_column: str | None = None,
    label_columns: Sequence[str] | None = None,
    label_separator: str | None = None,
    class_names: Sequence[str] | None = None,
    label_map: Mapping[int, str] | None = None,
    mask_value_map: Mapping[int, int] | None = None,
    view_column: str | None = None,
    slice_column: str | None = None,
    volume_column: str | None = None,
    split_column: str | None = None,
    size: int = 64,
    channels: int = 1,
    normalisation: str = "dtype",
    split_ratios: Sequence[float] = (0.6, 0.2, 0.2),
    split_seed: int = 0,
    rows_per_shard: int = 2048,
    allow_outside_paths: bool = False,
    force: bool = False,
) -> Manifest:
    """Ingest 2D images listed in a CSV.

    Args:
        csv_path: The CSV; relative image/mask paths are resolved against its folder.
        out_dir: Dataset directory to create or replace.
        image_column, patient_column: Columns with the image path and the patient id.
        mask_column: Column with a mask path (integer class indices); empty cell = no mask.
        label_column: Column with one class (int index or name) per row, or several
            names joined by ``label_separator`` (multi-label).
        label_columns: Several 0/1 columns, one per class (multi-label); exclusive with label_column.
        label_separator: Separator of the names in ``label_column`` ("|", ";") for multi-label.
        class_names: Class names in index order (default: int labels "0".."K-1",
            names sorted, or the label_columns).
        label_map: Mask classes ``{index: name}``; mask values outside it are an error.
            Default: ``{0: "background", 1: "class_1", ...}`` up to the largest value seen.
        mask_value_map: Raw mask value -> class index (e.g. ``{255: 1}``; ``-1`` marks
            unlabelled pixels), applied first.
        view_column: Column with the view name ("PA", "left").
        slice_column: Column with the slice index of the image in its volume.
        volume_column: Column with the volume id (default: the patient id when
            slice_column is given, else the image path: each image its own volume).
        split_column: Column with train/val/test per row (constant per patient);
            default: a random patient split from ``split_ratios`` and ``split_seed``.
        size: Images are resized to ``size x size``.
        channels: 1 (grey; RGB converted by luminance) or 3 (RGB; grey replicated).
        normalisation: "dtype" (integers / dtype max), "percentile", "minmax" or "none", per image.
        split_ratios, split_seed: Random patient split (ignored with split_column).
        rows_per_shard: Rows per shard file.
        allow_outside_paths: Read image and mask paths that lie outside the CSV's folder
            (absolute, ``../``, or through a symlink); by default such a row is an error.
        force: Rebuild even if ``out_dir`` is up to date.

    Returns:
        The manifest; task "segmentation" with a mask column (class labels may
        also be present), else "multilabel", "multiclass" or "unlabelled".

    Raises:
        IngestError: missing columns/files, a path outside the CSV's folder, unreadable
            images, mask/image size mismatch, unknown labels, mask values outside
            label_map, bad options.
    """
    csv = Path(csv_path).absolute()
    allow_outside = check_bool("allow_outside_paths", allow_outside_paths)
    size = check_int("size", size, 1, 4096)
    channels = check_choice("channels", channels, (1, 3))
    check_choice("normalisation", normalisation, _FOLDER_NORMALISATIONS)
    try:
        ratios = check_split_ratios(split_ratios)
    except ValueError as e:
        raise IngestError(str(e)) from e
    optional = [c for c in (mask_column, label_column, view_column, slice_column, volume_column, split_column) if c]
    df = read_csv_table(csv, [image_column, patient_column, *optional, *(label_columns or [])])
    kind, labels, names = _parse_labels(df, csv, label_column, label_columns, label_separator, class_names)
    rows = []
    for i, rec in enumerate(df.to_dict("records")):
        where = f"{csv} row {i + 2}"
        if not rec[image_column].strip() or not rec[patient_column].strip():
            raise IngestError(f"{where}: empty {image_column!r} or {patient_column!r}")
        img = source_file(csv.parent, rec[image_column].strip(), f"{where}, column {image_column!r}", allow_outside)
        mask = (source_file(csv.parent, rec[mask_column].strip(), f"{where}, column {mask_column!r}", allow_outside)
                if mask_column and rec[mask_column].strip() else None)
        for f in (img, mask):
            if f is not None and not f.is_file():
                raise IngestError(f"{where}: file {f} not found")
        if slice_column and not _INT.match(rec[slice_column]):
            raise IngestError(f"{where}: {slice_column}={rec[slice_column]!r} is not an integer slice index")
        pid = rec[patient_column].strip()
        rows.append({"image": img, "mask": mask, "patient": pid, "label": labels[i],
                     "view": (rec[view_column].strip() or None) if view_column else None,
                     "slice": int(rec[slice_column]) if slice_column else 0,
                     "volume": rec[volume_column].strip() if volume_column else pid if slice_column
                     else os.path.relpath(img, csv.parent),
                     "split": rec[split_column].strip() if split_column else None})
    if split_column:
        assignment: dict[str, str] = {}
        for i, r in enumerate(rows):
            if r["split"] not in SPLITS:
                raise IngestError(f"{csv} row {i + 2}: {split_column}={r['split']!r} is not one of {SPLITS}")
            if assignment.setdefault(r["patient"], r["split"]) != r["split"]:
                raise IngestError(f"{csv} row {i + 2}: patient {r['patient']!r} is in splits "
                                  f"{assignment[r['patient']]!r} and {r['split']!r}; a patient must sit in one split")
    else:
        try:
            assignment = split_patients([r["patient"] for r in rows], ratios, split_seed)
        except ValueError as e:
            raise IngestError(str(e)) from e
    # Slice positions: rank of the slice within its volume / number of slices of the volume.
    per_volume: dict[tuple[str, str], list[int]] = {}
    for r in rows:
        per_volume.setdefault((r["patient"], r["volume"]), []).append(r["slice"])
    rows.sort(key=lambda r: (SPLITS.index(assignment[r["patient"]]), r["patient"], r["volume"], r["slice"]))
    try:
        found_map = {int(k): str(v) for k, v in (label_map or {}).items()}
    except (TypeError, ValueError) as e:
        raise IngestError(f"label_map={label_map!r} must map integer class indices to names") from e
    task = "segmentation" if mask_column else {"multi": "multilabel", "single": "multiclass"}.get(kind, "unlabelled")
    options = {"image_column": image_column, "patient_column": patient_column, "mask_column": mask_column,
               "label_column": label_column, "label_columns": label_columns, "label_separator": label_separator,
               "class_names": names, "label_map": label_map, "mask_value_map": mask_value_map,
               "view_column": view_column, "slice_column": slice_column, "volume_column": volume_column,
               "split_column": split_column, "size": size, "channels": channels, "normalisation": normalisation,
               "split_ratios": list(ratios), "split_seed": split_seed, "rows_per_shard": rows_per_shard}

    def row_block(r: dict[str, Any]) -> ImageBlock:
        x = image_channels(read_image(r["image"]), channels, normalisation, r["image"])
        masks = None
        if r["mask"] is not None:
            m = _read_mask(r["mask"], mask_value_map)
            if m.shape != x.shape[1:]:
                raise IngestError(f"{r['mask']}: mask shape {list(m.shape)} differs from image shape "
                                  f"{list(x.shape[1:])} of {r['image']}")
            values = [v for v in np.unique(m).tolist() if v != IGNORE_INDEX]
            if label_map and (bad := [v for v in values if v not in found_map]):
                raise IngestError(f"{r['mask']}: mask values {bad[:10]} not in label_map {sorted(found_map)}")
            if bad := [v for v in values if v < 0]:
                raise IngestError(f"{r['mask']}: negative mask values {bad[:10]}; masks hold class indices >= 0 "
                                  "(or -1 for unlabelled pixels)")
            masks = resize_masks(m[None], size)
            if not label_map:
                for v in range(max(values, default=0) + 1):
                    found_map.setdefault(v, "background" if v == 0 else f"class_{v}")
        slices = sorted(per_volume[(r["patient"], r["volume"])])
        lab = r["label"]
        return ImageBlock(
            images=resize_images(x[None], size), masks=masks, patient_id=r["patient"], volume_id=r["volume"],
            split=assignment[r["patient"]], source_path=os.path.relpath(r["image"], csv.parent),
            slice_index=r["slice"], slice_position=slices.index(r["slice"]) / len(slices) if slice_column else 0.0,
            view=r["view"], class_label=lab if kind == "single" else None,
            class_labels=None if kind != "multi" or lab is None else np.asarray(lab)[None],
        )

    def blocks() -> Iterator[ImageBlock]:
        for r in rows:
            yield row_block(r)

    files = [csv] + [f for r in rows for f in (r["image"], r["mask"]) if f is not None]
    return run_ingest(
        "folder", csv, out_dir, options, files, csv.parent, blocks(), force=force, task=task,
        label_map=found_map, class_names=names,
        normalisation=f"per image: {_FOLDER_NORMALISATIONS[normalisation]}; channels={channels}; "
                      f"resized to {size}x{size} bilinear (masks nearest)",
        split_method="column" if split_column else "random", split_seed=None if split_column else split_seed,
        split_ratios=None if split_column else ratios, rows_per_shard=rows_per_shard,
    )
