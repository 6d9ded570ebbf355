"""MedMNIST ``.npz`` files -> shards.

Layout read: ``{train,val,test}_images`` (``[N, H, W]`` grey or ``[N, H, W, 3]``
RGB, uint8) and ``{split}_labels`` (``[N, 1]`` single-label, or ``[N, K]``
multi-label 0/1 as in ChestMNIST). The source's splits are kept; every image
is its own patient (``patient_id`` = ``"train-00012"``), since MedMNIST does
not publish patient ids. Integer intensities are divided by the dtype maximum
(255 for uint8), float intensities kept.
"""
from __future__ import annotations

import logging
import os
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from medcl.data.image_block import ImageBlock
from medcl.data.manifest import Manifest
from medcl.data.schema import SPLITS
from medcl.data.sources.common import IngestError, check_choice, check_int, resize_images, run_ingest

__all__ = ["ingest_medmnist"]

logger = logging.getLogger(__name__)

_CHUNK = 2048


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise IngestError(f"{path}: MedMNIST .npz file not found")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise IngestError(f"{path}: cannot read .npz ({type(e).__name__}: {e})") from e
    return arrays


def _split_arrays(path: Path, arrays: dict[str, np.ndarray]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    out = {}
    for split in SPLITS:
        img_key, lab_key = f"{split}_images", f"{split}_labels"
        if img_key not in arrays and lab_key not in arrays:
            continue
        if img_key not in arrays or lab_key not in arrays:
            raise IngestError(f"{path}: has {img_key if img_key in arrays else lab_key} without "
                              f"{lab_key if img_key in arrays else img_key}")
        images, labels = arrays[img_key], arrays[lab_key]
        if images.ndim == 4 and images.shape[-1] == 1:
            images = images[..., 0]
        if not (images.ndim == 3 or (images.ndim == 4 and images.shape[-1] == 3)):
            raise IngestError(f"{path}: {img_key} has shape {list(images.shape)}; expected [N, H, W] or "
                              "[N, H, W, 3] (3D MedMNIST volumes are not supported)")
        labels = labels.reshape(len(labels), -1) if labels.ndim != 2 else labels
        if len(labels) != len(images):
            raise IngestError(f"{path}: {img_key} has {len(images)} images but {lab_key} {len(labels)} labels")
        if not np.issubdtype(images.dtype, np.integer) and not np.isfinite(images).all():
            raise IngestError(f"{path}: {img_key} contains NaN/inf intensities")
        if len(images):
            out[split] = (images, labels)
    if not out:
        raise IngestError(f"{path}: empty source, no non-empty {{train,val,test}}_images arrays "
                          f"(keys: {sorted(arrays)})")
    return out


def ingest_medmnist(
    npz_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    size: int | None = None,
    class_names: Sequence[str] | None = None,
    task: str | None = None,
    rows_per_shard: int = 2048,
    force: bool = False,
) -> Manifest:
    """Ingest a MedMNIST ``.npz`` (e.g. ``pneumoniamnist.npz``), keeping its train/val/test splits.

    Args:
        npz_path: The ``.npz`` file.
        out_dir: Dataset directory to create or replace.
        size: Resize to ``size x size`` (bilinear); ``None`` keeps the stored size (28 for MedMNIST).
        class_names: Names of the classes (index order); default ``"0"``, ``"1"``, ...
        task: "multiclass" or "multilabel"; default: "multilabel" when labels have
            more than one column (ChestMNIST), else "multiclass".
        rows_per_shard: Rows per shard file.
        force: Rebuild even if ``out_dir`` is up to date.

    Returns:
        The manifest; single labels are in ``class_label``, multi-label targets in ``class_labels``.

    Raises:
        IngestError: unreadable or empty file, mismatched arrays, bad labels or options.
    """
    path = Path(npz_path).absolute()
    if size is not None:
        size = check_int("size", size, 1, 4096)
    if task is not None:
        check_choice("task", task, ("multiclass", "multilabel"))
    arrays = _split_arrays(path, _load_npz(path))
    width = max(labels.shape[1] for _, labels in arrays.values())
    task = task or ("multilabel" if width > 1 else "multiclass")
    all_labels = np.concatenate([labels.reshape(-1) for _, labels in arrays.values()])
    if (all_labels < 0).any() or not np.array_equal(all_labels, np.round(all_labels)):
        raise IngestError(f"{path}: labels must be non-negative integers")
    if task == "multilabel":
        if not np.isin(all_labels, (0, 1)).all():
            raise IngestError(f"{path}: multi-label targets must be 0/1, got values {np.unique(all_labels)[:10]}")
        num_classes = width
    else:
        if width != 1:
            raise IngestError(f"{path}: task='multiclass' needs one label column, labels have {width}")
        num_classes = int(all_labels.max()) + 1
    names = [str(i) for i in range(num_classes)] if class_names is None else [str(c) for c in class_names]
    if len(names) < num_classes or (task == "multilabel" and len(names) != num_classes):
        raise IngestError(f"class_names={list(names)!r} has {len(names)} names for {num_classes} classes")
    options = {"size": size, "class_names": names, "task": task, "rows_per_shard": rows_per_shard}
    digits = max(5, len(str(max(len(i) for i, _ in arrays.values()) - 1)))

    def blocks() -> Iterator[ImageBlock]:
        for split, (images, labels) in arrays.items():
            for start in range(0, len(images), _CHUNK):
                img = images[start:start + _CHUNK]
                x = img.astype(np.float32)
                if np.issubdtype(img.dtype, np.integer):
                    x /= np.iinfo(img.dtype).max
                x = x[:, None] if x.ndim == 3 else np.moveaxis(x, -1, 1)
                if size is not None:
                    x = resize_images(x, size)
                lab = labels[start:start + _CHUNK].astype(np.int64)
                ids = [f"{split}-{i:0{digits}d}" for i in range(start, start + len(img))]
                yield ImageBlock(
                    images=x, patient_id=ids, volume_id=ids, split=split,
                    source_path=[f"{path.name}:{split}_images[{i}]" for i in range(start, start + len(img))],
                    class_label=lab[:, 0] if task == "multiclass" else None,
                    class_labels=lab if task == "multilabel" else None,
                )

    return run_ingest(
        "medmnist", path, out_dir, options, [path], path.parent, blocks(), force=force, task=task,
        class_names=names,
        normalisation="integer intensities divided by the dtype maximum (255 for uint8) to [0, 1]; float kept"
        + ("" if size is None else f"; resized to {size}x{size} bilinear"),
        split_method="source", extras={"file": path.name},
        rows_per_shard=rows_per_shard,
    )
