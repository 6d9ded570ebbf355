"""Medical Segmentation Decathlon folders -> 2D slice shards.

Layout read: ``dataset.json`` (``labels``, ``modality``, ``training`` pairs),
``imagesTr/*.nii.gz`` and ``labelsTr/*.nii.gz`` (NIfTI, via nibabel). Each
image and label is first flipped/transposed (no resampling) to the closest
canonical orientation, RAS+ (:mod:`~medcl.data.sources.orientation`), so that
array axes 0, 1, 2 point Right, Anterior, Superior whatever the file's affine;
an image and its label must have the same affine (within ``1e-3``). Each volume
is then cut into 2D slices along ``axis`` (default ``"axial"``: the S axis,
canonical axis 2; ``"coronal"`` = A = 1, ``"sagittal"`` = R = 0; an int
indexes the canonical array); a slice keeps the other two canonical axes in
order (an axial slice is (R, A)). Slices are resized to ``size x size``
(images bilinear with antialiasing, labels nearest-exact, so no new label
values appear); intensities are normalised per volume and per channel *before*
resizing (default: clip to the 0.5th-99.5th percentile, scale to [0, 1]). A 4D
image (X, Y, Z, M) becomes M channels. ``patient_id`` = ``volume_id`` = case
name (``hippocampus_001``). The manifest's extras record the slice axis (index
and name), the canonical orientation and, per volume, the file's axis codes,
shape, voxel spacing and affine (:meth:`OrientationInfo.to_dict`), which is
what writing a prediction back in the input's own orientation needs. The
files ``dataset.json`` lists must lie inside the task folder, symlinks
resolved, unless ``allow_outside_paths`` is set.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from medcl.data.image_block import ImageBlock
from medcl.data.manifest import Manifest
from medcl.data.schema import SPLITS
from medcl.data.sources.common import (
    NORMALISATIONS,
    IngestError,
    check_bool,
    check_choice,
    check_int,
    resize_masks,
    run_ingest,
    source_file,
)
from medcl.data.sources.orientation import CANONICAL, OrientationInfo, slice_axis
from medcl.data.sources.preprocess import check_volume, load_nifti, volume_slices
from medcl.data.splits import check_split_ratios, split_patients

__all__ = ["ingest_msd"]

logger = logging.getLogger(__name__)

_NII = (".nii.gz", ".nii")

#: Largest absolute difference allowed between an image's affine and its label's.
AFFINE_TOLERANCE = 1e-3


def _case_name(path: Path) -> str:
    for ext in _NII:
        if path.name.endswith(ext):
            return path.name[: -len(ext)]
    return path.stem


def _nifti_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(Path(os.path.normpath(p)) for p in folder.iterdir()
                  if p.name.endswith(_NII) and not p.name.startswith("."))


def _read_dataset_json(root: Path, allow_outside: bool) -> dict:
    path = root / "dataset.json"
    if not path.is_file():
        raise IngestError(f"{path}: not found; an MSD task folder needs dataset.json, imagesTr/ and labelsTr/")
    try:
        meta = json.loads(path.read_text())
        labels = {int(k): str(v) for k, v in meta["labels"].items()}
        training = [tuple(source_file(root, e[key], f"{path} training[{i}].{key}", allow_outside)
                          for key in ("image", "label")) for i, e in enumerate(meta["training"])]
    except IngestError:
        raise
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise IngestError(f"{path}: invalid dataset.json ({type(e).__name__}: {e}); expected 'labels' "
                          "{index: name} and 'training' [{'image', 'label'}]") from e
    return {"name": meta.get("name", root.name), "labels": labels, "training": training,
            "modality": {str(k): str(v) for k, v in (meta.get("modality") or {"0": "image"}).items()}}


def _pair_cases(root: Path, training: list[tuple[Path, Path]]) -> list[tuple[str, Path, Path]]:
    """Check that every image has a label and vice versa; return (case, image, label) sorted by case."""
    if not training:
        raise IngestError(f"{root / 'dataset.json'}: empty source, 'training' lists no cases")
    cases: dict[str, tuple[Path, Path]] = {}
    for img, lab in training:
        img, lab = Path(os.path.normpath(img)), Path(os.path.normpath(lab))
        case = _case_name(img)
        if case in cases:
            raise IngestError(f"{img}: case {case!r} listed twice in dataset.json")
        if not img.is_file():
            raise IngestError(f"{img}: image listed in dataset.json not found")
        if not lab.is_file():
            raise IngestError(f"{img}: image has no label ({lab} not found)")
        cases[case] = (img, lab)
    listed_images = {p for p, _ in cases.values()}
    listed_labels = {p for _, p in cases.values()}
    for lab in _nifti_files(root / "labelsTr"):
        if lab not in listed_labels:
            raise IngestError(f"{lab}: label file with no image (not paired in dataset.json 'training')")
    for img in _nifti_files(root / "imagesTr"):
        if img not in listed_images:
            raise IngestError(f"{img}: image with no label (not listed in dataset.json 'training')")
    return [(c, *cases[c]) for c in sorted(cases)]


def _check_pair(img_path: Path, img_info: OrientationInfo, lab_path: Path, lab_info: OrientationInfo) -> None:
    """Refuse a label whose affine differs from its image's (they would not overlay)."""
    diff = float(np.abs(np.subtract(img_info.affine, lab_info.affine)).max())
    if diff > AFFINE_TOLERANCE:
        raise IngestError(
            f"{lab_path}: label affine differs from the affine of image {img_path} by up to {diff:.3g} "
            f"(tolerance {AFFINE_TOLERANCE}): label {''.join(lab_info.codes)} spacing {list(lab_info.spacing)}, "
            f"image {''.join(img_info.codes)} spacing {list(img_info.spacing)}; the label must be stored on "
            "the image's voxel grid")


def _volume_block(case: str, img_path: Path, lab_path: Path, root: Path, split: str, *, labels: dict[int, str],
                  channels: int, axis: int, size: int, normalisation: str,
                  min_fg: int) -> tuple[ImageBlock | None, int, OrientationInfo]:
    """Slices of one case (None if ``min_fg`` drops all of them), the volume's slice count and orientation.

    ``axis`` indexes the canonical (RAS) array.
    """
    img, info = load_nifti(img_path, "image")
    lab, lab_info = load_nifti(lab_path, "label")
    _check_pair(img_path, info, lab_path, lab_info)
    img = check_volume(img, img_path, channels)
    if lab.ndim != 3 or lab.shape != img.shape[:3]:
        raise IngestError(f"{lab_path}: label shape {list(lab.shape)} differs from image shape "
                          f"{list(img.shape[:3])} of {img_path} (both in the canonical RAS orientation)")
    values = np.unique(lab)
    bad = [v for v in values.tolist() if v not in labels]
    if bad:
        raise IngestError(f"{lab_path}: label values {bad[:10]} not in dataset.json labels {sorted(labels)}")
    n = img.shape[axis]
    masks = resize_masks(np.moveaxis(lab.astype(np.int64), axis, 0), size)
    keep = np.arange(n)
    if min_fg > 0:
        keep = np.flatnonzero((masks > 0).sum(axis=(1, 2)) >= min_fg)
        if keep.size == 0:
            return None, n, info
    source = img_path.relative_to(root).as_posix() if img_path.is_relative_to(root) else str(img_path)
    block = ImageBlock(images=volume_slices(img, axis=axis, size=size, normalisation=normalisation,
                                             keep=keep), masks=masks[keep], patient_id=case, volume_id=case,
                       split=split, source_path=source, slice_index=keep, slice_position=keep / n)
    return block, n, info


def ingest_msd(
    source_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    size: int = 64,
    axis: int | str = "axial",
    normalisation: str = "percentile",
    min_foreground_pixels: int = 0,
    split_ratios: Sequence[float] = (0.5, 0.25, 0.25),
    split_seed: int = 0,
    rows_per_shard: int = 2048,
    allow_outside_paths: bool = False,
    force: bool = False,
) -> Manifest:
    """Ingest a Decathlon task folder (``dataset.json``, ``imagesTr/``, ``labelsTr/``) as 2D slices.

    Args:
        source_dir: The task folder, e.g. ``Task04_Hippocampus``.
        out_dir: Dataset directory to create or replace.
        size: Slices are resized to ``size x size``.
        axis: Slice axis of the volumes after reorientation to the closest canonical
            orientation (RAS): "axial" (S, canonical axis 2), "coronal" (A, 1), "sagittal"
            (R, 0), or an index 0, 1, 2 / -1..-3 of the canonical array.
        normalisation: Per-volume, per-channel intensity normalisation: "percentile"
            (clip to the 0.5th-99.5th percentile, scale to [0, 1]), "minmax" or "zscore"
            (:data:`~medcl.data.sources.common.NORMALISATIONS`).
        min_foreground_pixels: Keep only slices with at least this many label > 0
            pixels after resizing (0 keeps every slice, as the paper does).
        split_ratios: (train, val, test) patient fractions (paper: 50/25/25).
        split_seed: Seed of the patient split.
        rows_per_shard: Rows per shard file.
        allow_outside_paths: Read files that ``dataset.json`` lists outside the task folder
            (absolute, ``../``, or through a symlink); by default such an entry is an error.
        force: Rebuild even if ``out_dir`` is up to date.

    Returns:
        The manifest: task "segmentation", ``label_map`` from dataset.json,
        extras ``dataset_name``, ``modalities``, ``axis`` (canonical index), ``axis_name``,
        ``orientation`` ("RAS", the canonical orientation sliced), ``slices_dropped`` and
        ``volumes`` (volume id -> :meth:`OrientationInfo.to_dict` of its image file: axis
        codes, shape, spacing, affine).

    Raises:
        IngestError: missing or unpaired files, a file outside the task folder, corrupt
            NIfTI, an affine with no orientation, image/label affine or shape mismatch, label
            values outside dataset.json, NaN/inf, bad option.
    """
    root = Path(source_dir).absolute()
    if not root.is_dir():
        raise IngestError(f"source_dir={str(source_dir)!r} is not a directory")
    size = check_int("size", size, 1, 4096)
    try:
        axis, axis_name = slice_axis(axis)
    except ValueError as e:
        raise IngestError(str(e)) from e
    check_choice("normalisation", normalisation, NORMALISATIONS)
    min_fg = check_int("min_foreground_pixels", min_foreground_pixels, 0)
    allow_outside = check_bool("allow_outside_paths", allow_outside_paths)
    try:
        ratios = check_split_ratios(split_ratios)
        meta = _read_dataset_json(root, allow_outside)
        cases = _pair_cases(root, meta["training"])
        assignment = split_patients([c for c, _, _ in cases], ratios, split_seed)
    except IngestError:
        raise
    except ValueError as e:
        raise IngestError(str(e)) from e
    labels, channels = meta["labels"], len(meta["modality"])
    # "orientation" is no option: it marks datasets sliced after reorientation, so older ones are rebuilt.
    options = {"size": size, "axis": axis, "normalisation": normalisation, "min_foreground_pixels": min_fg,
               "split_ratios": list(ratios), "split_seed": split_seed, "rows_per_shard": rows_per_shard,
               "orientation": "".join(CANONICAL)}
    files = [root / "dataset.json"] + [p for _, i, la in cases for p in (i, la)]
    extras = {"dataset_name": meta["name"], "modalities": meta["modality"], "axis": axis, "axis_name": axis_name,
              "orientation": "".join(CANONICAL), "slices_dropped": 0,
              "volumes": dict.fromkeys(c for c, _, _ in cases)}  # filled in as read, listed by case name
    order = sorted(cases, key=lambda c: (SPLITS.index(assignment[c[0]]), c[0]))

    def blocks() -> Iterator[ImageBlock]:
        for case, img, lab in order:
            block, n_slices, info = _volume_block(case, img, lab, root, assignment[case], labels=labels,
                                                  channels=channels, axis=axis, size=size,
                                                  normalisation=normalisation, min_fg=min_fg)
            extras["slices_dropped"] += n_slices - (0 if block is None else len(block))
            extras["volumes"][case] = info.to_dict()
            if block is not None:
                yield block

    return run_ingest(
        "msd", root, out_dir, options, files, root, blocks(), force=force, task="segmentation",
        label_map=labels, normalisation=f"per volume and channel, before resizing: {NORMALISATIONS[normalisation]}",
        split_method="random", split_seed=split_seed, split_ratios=ratios, extras=extras,
        rows_per_shard=rows_per_shard,
    )

