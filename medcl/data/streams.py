"""Driver side of the Ray Data streams over a dataset directory (shards + bags), decoded to the batch contract.

Every stream is ``ray.data.read_parquet`` of the directory's ``shard-*.parquet`` (or
``bags.parquet``) with the split/patient/site filters and the column selection pushed into the
Parquet read, then one vectorised decode (``map_batches(batch_format="pyarrow")`` of
:func:`medcl.data.decode.decode_shard_batch`) to:

    image float32 (B, C, H, W); mask int64 (B, H, W), -1 = ignore (masked streams only);
    class_label int64 (B,), -1 = none; class_labels float32 (B, K) (multi-label datasets only);
    slice_position float32 (B,); slice_index int64 (B,); patient_id, volume_id, site: str.

The slice streams that stages train on (``train_images``, ``labelled_slices``, ``labelled_images``,
``partially_labelled_slices``) are globally shuffled once, by a seeded ``random_shuffle`` before
they are materialised: their rows come in a fixed random permutation (the stream's ``seed``, else
:data:`SHUFFLE_SEED`; the same on every build, so that a ``StreamSpec`` names one order), not
patient by patient, so that any run of consecutive rows (a worker's local shuffle window, a
capped epoch) is a uniform sample of the whole set. ``eval_slices`` keeps the shards' order
(volumes stay stacked); ``patient_bags`` too (one row per patient: a worker's 256-row shuffle
window holds every bag of a split with up to 256 patients a worker).

Small datasets are ``materialize()``-d once after decoding (Ray Data costs ~2.5 s per execution;
later epochs then only replay blocks from the object store). An optional ``augment`` runs *after*
that point in ``map_batches`` on CPU tasks, so every epoch sees fresh random views (seeded from
OS entropy per batch: Ray Data augmentation is not reproducible; augment on the worker with a
``torch.Generator`` when it must be; on a 2-core machine it was also faster, see
``benchmarks/data_stream.py``). Bags are streamed as rows; MICLe/partition sampling runs
in the worker's ``collate_fn`` (:mod:`medcl.data.collate`, which also iterates the streams as
torch batches: ``torch_batches``).

Stages declare their streams as :class:`StreamSpec`; :func:`build_streams` builds each distinct
one once.
"""
from __future__ import annotations

import glob
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import ray
from ray.data.expressions import col

from medcl.data.collate import tensor_from_numpy
from medcl.data.decode import decode_shard_batch
from medcl.data.manifest import read_manifest
from medcl.data.schema import BAGS_NAME, IGNORE_INDEX, MANIFEST_NAME, SHARD_GLOB, SPLITS
from medcl.data.splits import labelled_patients, patient_classes, patients_by_split, unlabelled_patients

# torch (and the torch-based augment module) are imported inside the functions that need them:
# Ray Data ships this module's functions to fresh worker processes, and importing torch there
# costs seconds per worker for functions that only need numpy and pyarrow.

__all__ = [
    "shard_paths",
    "train_images",
    "labelled_slices",
    "labelled_images",
    "partially_labelled_slices",
    "has_shifted_site",
    "patient_bags",
    "eval_slices",
    "StreamSpec",
    "build_streams",
    "SHUFFLE_SEED",
]

logger = logging.getLogger(__name__)

#: Seed of the global row shuffle of the training streams that have no seed of their own
#: (``train_images``): streams are shared between jobs by their ``StreamSpec``,
#: so the permutation must follow from the spec's arguments.
SHUFFLE_SEED = 0

_BASE_COLUMNS = ["patient_id", "volume_id", "slice_index", "slice_position", "site", "image", "image_shape",
                 "class_label"]


# --------------------------------------------------------------------------- files
def shard_paths(dataset_dir: str | os.PathLike) -> list[str]:
    """The shard paths of a dataset directory (the manifest's list, else sorted ``shard-*.parquet``).

    Raises:
        ValueError: the directory does not exist or holds no shard.
    """
    root = os.fspath(dataset_dir)
    if not os.path.isdir(root):
        raise ValueError(f"dataset_dir {root!r} is not a directory")
    if os.path.isfile(os.path.join(root, MANIFEST_NAME)):  # only the shards the manifest lists
        paths = [str(p) for p in read_manifest(root).shard_paths]
    else:
        paths = sorted(glob.glob(os.path.join(root, SHARD_GLOB)))
    if not paths:
        raise ValueError(f"dataset_dir {root!r} holds no {SHARD_GLOB} files; run an ingest first")
    return paths


def _bags_path(dataset_dir: str | os.PathLike) -> str:
    path = os.path.join(os.fspath(dataset_dir), BAGS_NAME)
    if not os.path.isfile(path):
        raise ValueError(f"dataset_dir {os.fspath(dataset_dir)!r} has no {BAGS_NAME}; run an ingest first")
    return path


def _has_values(paths: list[str], column: str) -> bool:
    """Whether any row has a non-null list in ``column`` (from Parquet statistics when written)."""
    for path in paths:
        meta = pq.ParquetFile(path).metadata
        for g in range(meta.num_row_groups):
            group = meta.row_group(g)
            for c in range(group.num_columns):
                chunk = group.column(c)
                if chunk.path_in_schema.split(".")[0] != column:
                    continue
                if chunk.statistics is None:  # no statistics: read the column of this file
                    if pq.read_table(path, columns=[column]).column(column).null_count < meta.num_rows:
                        return True
                    break
                if chunk.statistics.num_values > 0:
                    return True
    return False


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


# --------------------------------------------------------------------------- augmentation in Ray Data
class _AugmentBatch:
    """``map_batches`` function applying a view, ``ViewPair`` or ``JointTransform`` to numpy batches.

    ``ViewPair`` replaces ``image`` by ``image_a``/``image_b``; ``JointTransform`` replaces
    ``image`` and ``mask``; any other view replaces ``image``.
    """

    def __init__(self, transform: Callable[..., Any]) -> None:
        if not callable(transform):
            raise TypeError(f"augment must be a view, ViewPair or JointTransform, got {type(transform).__name__}")
        self.transform = transform

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from medcl.data.augment import JointTransform, ViewPair

        gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)
        image = tensor_from_numpy(batch["image"])
        out = dict(batch)
        with torch.no_grad():
            if isinstance(self.transform, JointTransform):
                if "mask" not in batch:
                    raise ValueError("augment=JointTransform needs a masked stream (batch has no 'mask')")
                img, mask = self.transform(image, tensor_from_numpy(batch["mask"]), gen)
                out["image"], out["mask"] = img.numpy(), mask.numpy()
            elif isinstance(self.transform, ViewPair):
                a, b = self.transform(image, gen)
                del out["image"]
                out["image_a"], out["image_b"] = a.numpy(), b.numpy()
            else:
                out["image"] = self.transform(image, gen).numpy()
        return out


def _finish(ds: ray.data.Dataset, what: str, *, materialize: bool, augment: Callable[..., Any] | None,
            augment_batch_size: int) -> ray.data.Dataset:
    if materialize:
        # Keep the blocks' order (the shards' order, or the training streams' seeded permutation):
        # otherwise blocks arrive in the order parallel tasks finish, and the seeded local
        # shuffle of training gives other batches on every run.
        ds.context.execution_options.preserve_order = True
        ds = ds.materialize()
        if ds.count() == 0:  # free once materialised
            raise ValueError(f"{what} selects no rows; check split/site/fraction against the manifest")
    if augment is not None:
        ds = ds.map_batches(_AugmentBatch(augment), batch_format="numpy", batch_size=augment_batch_size,
                            zero_copy_batch=True)
    return ds


def _shard_stream(paths: list[str], predicate, *, with_mask: bool, with_class_labels: bool,
                  shuffle_seed: int | None = None) -> ray.data.Dataset:
    """Filtered, column-selected shard rows, decoded; ``shuffle_seed``: globally shuffled (before decoding: the
    encoded rows are smaller) with that seed, the same permutation on every execution."""
    columns = list(_BASE_COLUMNS) + (["mask"] if with_mask else []) + (["class_labels"] if with_class_labels else [])
    ds = ray.data.read_parquet(paths).filter(expr=predicate).select_columns(columns)
    if shuffle_seed is not None:
        ds = ds.random_shuffle(seed=int(shuffle_seed))
    return ds.map_batches(decode_shard_batch, batch_format="pyarrow", batch_size=None,
                          fn_kwargs={"with_mask": with_mask, "with_class_labels": with_class_labels})


# --------------------------------------------------------------------------- streams
def train_images(dataset_dir: str | os.PathLike, *, split: str = "train", augment: Callable[..., Any] | None = None,
                 materialize: bool = True, augment_batch_size: int = 64) -> ray.data.Dataset:
    """All images of a split (global pretraining; labels optional), no masks, in a seeded random order.

    Args:
        dataset_dir: directory with ``shard-*.parquet``.
        split: one of ``SPLITS``.
        augment: optional view (replaces ``image``) or ``ViewPair`` (replaces ``image`` by
            ``image_a``, ``image_b``), applied in Ray Data after materialisation.
        materialize: materialise the decoded rows once (recommended for datasets that fit
            the object store).
        augment_batch_size: rows per augmentation task batch.
    """
    _check_split(split)
    paths = shard_paths(dataset_dir)
    ds = _shard_stream(paths, col("split") == split, with_mask=False,
                       with_class_labels=_has_values(paths, "class_labels"), shuffle_seed=SHUFFLE_SEED)
    what = f"train_images({os.fspath(dataset_dir)!r}, split={split!r})"
    return _finish(ds, what, materialize=materialize, augment=augment, augment_batch_size=augment_batch_size)


_TARGETS = ("mask", "class_label", "class_labels")


def labelled_slices(dataset_dir: str | os.PathLike, fraction: float, seed: int, split: str = "train", *,
                    target: str = "mask", augment: Callable[..., Any] | None = None, materialize: bool = True,
                    augment_batch_size: int = 64) -> ray.data.Dataset:
    """Slices of the labelled patients of a split (fine-tuning, supervised local pretraining).

    The labelled patients are ``splits.labelled_patients`` of the split's patients (nested across
    fractions, deterministic in ``seed``), drawn per class for ``target="class_label"`` (stratified
    by ``splits.patient_classes``: every class has a labelled patient at every fraction); only their
    rows that carry ``target`` are kept, and only rows of ``split`` (so test patients never enter a
    training stream). The rows come in a random order seeded by ``seed``.

    Args:
        dataset_dir: directory with ``shard-*.parquet``.
        fraction: labelled fraction of the split's patients, in (0, 1].
        seed: seed of the labelled subset and of the rows' order.
        split: one of ``SPLITS``.
        target: which label a row must have: ``"mask"`` (segmentation; decoded), ``"class_label"``
            or ``"class_labels"``.
        augment: optional ``JointTransform`` (new ``image`` and ``mask``; masked streams only),
            view or ``ViewPair``, applied in Ray Data after materialisation.
        materialize: materialise the decoded rows once.
        augment_batch_size: rows per augmentation task batch.
    """
    _check_split(split)
    if target not in _TARGETS:
        raise ValueError(f"target must be one of {_TARGETS}, got {target!r}")
    paths = shard_paths(dataset_dir)
    classes = patient_classes(dataset_dir, split) if target == "class_label" else None  # multi-label: plain draw
    patients = sorted(labelled_patients(patients_by_split(dataset_dir)[split], fraction, seed, classes=classes))
    if not patients:
        raise ValueError(f"no labelled patients for split={split!r}, fraction={fraction!r} "
                         f"in {os.fspath(dataset_dir)!r}")
    predicate = (col("split") == split) & col("patient_id").is_in(patients) & col(target).is_not_null()
    ds = _shard_stream(paths, predicate, with_mask=target == "mask", with_class_labels=target == "class_labels",
                       shuffle_seed=seed)
    what = f"labelled_slices({os.fspath(dataset_dir)!r}, fraction={fraction!r}, split={split!r}, target={target!r})"
    return _finish(ds, what, materialize=materialize, augment=augment, augment_batch_size=augment_batch_size)


def labelled_images(dataset_dir: str | os.PathLike, fraction: float, seed: int, split: str = "train", *,
                    augment: Callable[..., Any] | None = None, materialize: bool = True,
                    augment_batch_size: int = 64) -> ray.data.Dataset:
    """Classification counterpart of ``labelled_slices``: the labelled patients' images with a class.

    Rows must carry ``class_labels`` on a multi-label dataset (any row has one), else
    ``class_label``; arguments as ``labelled_slices``.
    """
    target = "class_labels" if _has_values(shard_paths(dataset_dir), "class_labels") else "class_label"
    return labelled_slices(dataset_dir, fraction, seed, split, target=target, augment=augment,
                           materialize=materialize, augment_batch_size=augment_batch_size)


class _HideMasks:
    """Sets every mask pixel of the rows of the patients in ``hide`` to ``IGNORE_INDEX``."""

    def __init__(self, hide: list[str]) -> None:
        self.hide = np.asarray(sorted(hide))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        hidden = np.isin(batch["patient_id"], self.hide)
        if hidden.any():
            batch["mask"] = np.array(batch["mask"], copy=True)
            batch["mask"][hidden] = IGNORE_INDEX
        return batch


def partially_labelled_slices(dataset_dir: str | os.PathLike, fraction: float, seed: int, split: str = "train", *,
                              materialize: bool = True) -> ray.data.Dataset:
    """All slices of a split with masks only for the labelled patients (the rest all ``IGNORE_INDEX``).

    For local pretraining that mixes the supervised loss (labelled pixels) with
    the self-supervised one (slices of unlabelled patients). The labelled
    patients are the same as ``labelled_slices`` with the same fraction and seed; the masks of
    the others (``splits.unlabelled_patients``) are hidden. The rows come in a random order seeded by ``seed``.
    """
    _check_split(split)
    paths = shard_paths(dataset_dir)
    hide = unlabelled_patients(patients_by_split(dataset_dir)[split], fraction, seed)
    ds = _shard_stream(paths, col("split") == split, with_mask=True, with_class_labels=False, shuffle_seed=seed)
    ds = ds.map_batches(_HideMasks(hide), batch_format="numpy", batch_size=None)
    what = f"partially_labelled_slices({os.fspath(dataset_dir)!r}, fraction={fraction!r}, split={split!r})"
    return _finish(ds, what, materialize=materialize, augment=None, augment_batch_size=64)


def has_shifted_site(dataset_dir: str | os.PathLike, split: str = "test", site: str = "B") -> bool:
    """Whether ``split`` holds images of the shifted acquisition ``site`` (reads the site column only)."""
    _check_split(split)
    table = pads.dataset(shard_paths(dataset_dir), format="parquet").to_table(
        columns=["site"], filter=(pc.field("split") == split) & (pc.field("site") == str(site)))
    return table.num_rows > 0


def eval_slices(dataset_dir: str | os.PathLike, split: str = "test", site: str | None = None, *,
                with_mask: bool | None = None, materialize: bool = True) -> ray.data.Dataset:
    """Evaluation slices of a split (optionally one acquisition ``site``: the shifted test set).

    Rows keep ``patient_id``, ``volume_id`` and ``slice_index`` so that slices can be stacked back
    into volumes for 3D Dice.

    Args:
        dataset_dir: directory with ``shard-*.parquet``.
        split: one of ``SPLITS``.
        site: keep only this site (None: all sites).
        with_mask: decode masks (None: when the dataset has any mask).
        materialize: materialise the decoded rows once.
    """
    _check_split(split)
    paths = shard_paths(dataset_dir)
    predicate = col("split") == split
    if site is not None:
        predicate = predicate & (col("site") == str(site))
    mask = _has_values(paths, "mask") if with_mask is None else bool(with_mask)
    ds = _shard_stream(paths, predicate, with_mask=mask, with_class_labels=_has_values(paths, "class_labels"))
    what = f"eval_slices({os.fspath(dataset_dir)!r}, split={split!r}, site={site!r})"
    return _finish(ds, what, materialize=materialize, augment=None, augment_batch_size=1)


def patient_bags(dataset_dir: str | os.PathLike, split: str = "train", *, materialize: bool = True) -> ray.data.Dataset:
    """Bag rows (``BAG_SCHEMA``, one per patient) of a split, for MICLe and partition sampling.

    Rows stay encoded; sampling and decoding happen in the worker's ``collate_fn``
    (``MiclePairCollate`` / ``PartitionCollate``).
    """
    _check_split(split)
    columns = ["patient_id", "site", "num_images", "volume_ids", "slice_positions", "images", "image_shape"]
    ds = ray.data.read_parquet(_bags_path(dataset_dir)).filter(expr=col("split") == split).select_columns(columns)
    return ds.materialize() if materialize else ds


# --------------------------------------------------------------------------- stream specs
@dataclass(frozen=True)
class StreamSpec:
    """A stream named by the function that builds it and its arguments (hashable).

    Stages declare what they read as specs; a driver that runs many jobs builds
    each distinct stream once (``build_streams`` with a shared cache) and hands
    the materialised datasets to every job that reads it.
    """

    fn: str
    dataset_dir: str
    kwargs: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def of(cls, fn: str, dataset_dir: str | os.PathLike, **kwargs: Any) -> "StreamSpec":
        if fn not in _STREAM_FUNCTIONS:
            raise ValueError(f"unknown stream {fn!r}; choose from {sorted(_STREAM_FUNCTIONS)}")
        return cls(fn, os.fspath(dataset_dir), tuple(sorted(kwargs.items())))

    def build(self) -> ray.data.Dataset:
        return globals()[self.fn](self.dataset_dir, **dict(self.kwargs))


_STREAM_FUNCTIONS = ("train_images", "labelled_slices", "labelled_images", "partially_labelled_slices",
                     "eval_slices", "patient_bags")


def build_streams(specs: Mapping[str, StreamSpec], cache: dict[StreamSpec, Any] | None = None,
                  max_parallel: int = 2) -> dict[str, Any]:
    """Materialised datasets for ``specs`` (name -> spec), each distinct spec built once.

    Builds run in threads so that their Ray Data executions overlap (each has a
    fixed cost of seconds on a small machine); at most ``max_parallel`` at once,
    because concurrent executions share the cluster's CPUs and with too many
    Ray Data reports that no operator can get a CPU. ``cache`` is filled in place.
    """
    from concurrent.futures import ThreadPoolExecutor

    cache = {} if cache is None else cache
    missing = sorted({spec for spec in specs.values() if spec not in cache}, key=repr)
    if missing:
        with ThreadPoolExecutor(max_workers=max(1, min(max_parallel, len(missing)))) as pool:
            for spec, ds in zip(missing, pool.map(lambda s: s.build(), missing)):
                cache[spec] = ds
    return {name: cache[spec] for name, spec in specs.items()}
