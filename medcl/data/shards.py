"""Dataset directories: Parquet shards and the per-patient bag table.

A dataset directory holds ``shard-00000.parquet`` ... (rows of
:data:`~medcl.data.schema.SHARD_SCHEMA`, one per 2D image, zstd), ``bags.parquet``
(rows of :data:`~medcl.data.schema.BAG_SCHEMA`, one per patient, built here from
the shards once) and ``manifest.json`` (:class:`~medcl.data.manifest.Manifest`).

:func:`write_dataset` builds the whole directory in a hidden sibling
``.{name}.tmp-XXXX`` and swaps it into place (old -> backup, new -> place,
backup deleted), so an interrupted write leaves either the old dataset or the
new one. A re-run whose source fingerprint matches an intact dataset is a no-op.

The rows arrive as :class:`~medcl.data.image_block.ImageBlock`; reading and
decoding them back live in :mod:`medcl.data.decode`.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from medcl.data.manifest import (
    FORMAT_VERSION,
    TASKS,
    FileInfo,
    Manifest,
    find_up_to_date,
    read_manifest,
    sha256_file,
)
from medcl.data.image_block import ImageBlock
from medcl.storage import atomic_dir
from medcl.data.schema import BAG_SCHEMA, BAGS_NAME, MANIFEST_NAME, SHARD_SCHEMA, SPLITS

__all__ = ["write_dataset"]

logger = logging.getLogger(__name__)

_DICT_COLUMNS = ["patient_id", "volume_id", "view", "split", "site", "source_path"]
_BAG_SOURCE_COLUMNS = ["patient_id", "volume_id", "slice_index", "slice_position", "split", "site", "image",
                       "image_shape", "class_label", "class_labels"]


def _segments_list(values: pa.Array, bounds: np.ndarray) -> pa.ListArray:
    return pa.ListArray.from_arrays(pa.array(bounds, pa.int32()), values)


def _build_bags(table: pa.Table) -> tuple[pa.Table, dict[str, Any]]:
    """One BAG_SCHEMA row per patient (images ordered by volume_id, slice_index) and the manifest counts."""
    # Bags in order of first appearance, images by (volume_id, slice_index); the ingests write rows
    # in that order already, so the costly take() of the image column is usually skipped.
    pid0 = np.asarray(table["patient_id"].to_numpy(), dtype=object)
    _, first, inverse = np.unique(pid0, return_index=True, return_inverse=True)
    _, vid_rank = np.unique(np.asarray(table["volume_id"].to_numpy(), dtype=object), return_inverse=True)
    order = np.lexsort((table["slice_index"].to_numpy(), vid_rank, first[inverse]))
    identity = bool((order == np.arange(len(order))).all())
    t = {name: (table.column(name) if identity else table.column(name).take(pa.array(order))).combine_chunks()
         for name in table.column_names}
    n = table.num_rows
    pid = np.asarray(t["patient_id"].to_numpy(zero_copy_only=False), dtype=object)
    vid = np.asarray(t["volume_id"].to_numpy(zero_copy_only=False), dtype=object)
    starts = np.r_[0, np.flatnonzero(pid[1:] != pid[:-1]) + 1]
    bounds = np.r_[starts, n]
    seg = np.repeat(np.arange(len(starts)), np.diff(bounds))
    per_patient = {}
    for name in ("split", "site"):
        col = np.asarray(t[name].to_numpy(zero_copy_only=False), dtype=object)
        bad = np.flatnonzero(col != col[starts][seg])
        if bad.size:
            raise ValueError(f"patient {pid[bad[0]]!r} has images with different {name} values "
                             f"{sorted(set(col[seg == seg[bad[0]]]))}; a patient must sit in one {name}")
        per_patient[name] = col[starts]
    # Patient-level labels: most frequent class_label (ties -> smallest); class_labels: any positive.
    lab = t["class_label"].fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    bag_label = [int(np.bincount(v).argmax()) if (v := lab[a:b][lab[a:b] >= 0]).size else None
                 for a, b in zip(bounds[:-1], bounds[1:])]
    multi = t["class_labels"]
    bag_multi: list[list[int] | None] = [None] * len(starts)
    if multi.null_count < n:
        valid = ~np.asarray(multi.is_null().to_numpy(zero_copy_only=False), dtype=bool)
        k = len(multi[int(np.flatnonzero(valid)[0])])
        dense = np.full((n, k), -1, np.int16)
        dense[valid] = multi.flatten().to_numpy(zero_copy_only=False).reshape(-1, k)
        bag_multi = [None if (m := dense[a:b].max(axis=0))[0] < 0 else m.astype(int).tolist()
                     for a, b in zip(bounds[:-1], bounds[1:])]
    img = t["image"]
    offs = np.asarray(img.offsets)
    bags = pa.Table.from_arrays([
        pa.array(pid[starts], pa.string()),
        pa.array(per_patient["split"], pa.string()),
        pa.array(per_patient["site"], pa.string()),
        pa.array(np.diff(bounds), pa.int32()),
        _segments_list(t["volume_id"], bounds),
        _segments_list(t["slice_position"], bounds),
        _segments_list(img.flatten(), offs[bounds] - offs[0]),
        t["image_shape"].take(pa.array(starts)),
        pa.array(bag_label, pa.int32()),
        pa.array(bag_multi, pa.list_(pa.uint8())),
    ], schema=BAG_SCHEMA)
    shapes = np.unique(t["image_shape"].flatten().to_numpy().reshape(n, 3), axis=0)
    if len(shapes) != 1:
        raise ValueError(f"rows have different image shapes {shapes.tolist()}")
    new_volume = np.r_[True, (pid[1:] != pid[:-1]) | (vid[1:] != vid[:-1])]
    counts: dict[str, Any] = {
        "num_patients": len(starts), "num_volumes": int(new_volume.sum()), "num_images": n,
        "image_shape": tuple(int(v) for v in shapes[0]),
    }
    sizes = np.diff(bounds)
    for key, values, names in (("splits", per_patient["split"], SPLITS),
                               ("sites", per_patient["site"], sorted(set(per_patient["site"])))):
        counts[key] = {s: {"patients": int((values == s).sum()), "images": int(sizes[values == s].sum())}
                       for s in names}
    return bags, counts


def _write_parquet(table: pa.Table, path: Path, row_group_size: int) -> None:
    # Byte-stream-split floats: ~15% smaller with zstd, no slower to read.
    floats = [f"{c}.list.element" for c in ("image", "images") if c in table.column_names]
    pq.write_table(
        table, path, compression="zstd", row_group_size=row_group_size,
        use_dictionary=[c for c in _DICT_COLUMNS if c in table.column_names], use_byte_stream_split=floats,
        write_statistics=[c for c in table.column_names if c not in ("image", "images", "mask")],
    )


def _staging_dir(out_dir: Path) -> Any:
    """An empty sibling temp dir (:func:`medcl.storage.atomic_dir`) that replaces ``out_dir`` on success;
    refused for a non-empty directory that is not a dataset."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"out_dir={str(out_dir)!r} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / MANIFEST_NAME).is_file():
        raise ValueError(f"out_dir={str(out_dir)!r} is a non-empty directory without {MANIFEST_NAME}; "
                         "refusing to replace it (choose an empty or new directory)")
    return atomic_dir(out_dir)


def _recover_interrupted_swap(out_dir: Path) -> None:
    """Put back a dataset left in ``.{name}.old-*`` by a swap interrupted between its two renames."""
    if out_dir.exists():
        return
    olds = sorted(out_dir.parent.glob(f".{out_dir.name}.old-*/data/{MANIFEST_NAME}"))
    if len(olds) == 1:
        logger.warning("restoring %s from the backup of an interrupted ingest", out_dir)
        os.replace(olds[0].parent, out_dir)
        shutil.rmtree(olds[0].parent.parent, ignore_errors=True)


def write_dataset(
    out_dir: str | os.PathLike,
    blocks: Iterable[ImageBlock],
    *,
    source: Mapping[str, Any],
    task: str,
    fingerprint: str,
    label_map: Mapping[int, str] | None = None,
    class_names: Sequence[str] = (),
    normalisation: str = "",
    split_method: str = "random",
    split_seed: int | None = None,
    split_ratios: Sequence[float] | None = None,
    extras: Mapping[str, Any] | None = None,
    rows_per_shard: int = 2048,
    force: bool = False,
) -> Manifest:
    """Write shards, ``bags.parquet`` and ``manifest.json`` atomically.

    ``blocks`` is consumed lazily inside the staging directory, so an exception
    raised while producing them (a corrupt source file) removes the staging dir
    and leaves any previous dataset at ``out_dir`` untouched. ``label_map``,
    ``class_names`` and ``extras`` are read after ``blocks`` is consumed, so a
    generator may fill them in as it discovers values.

    Args:
        out_dir: Dataset directory to create or replace.
        blocks: Rows to write, e.g. one :class:`ImageBlock` per volume; every
            image must have the same ``[C, H, W]``.
        source: ``{"kind", "path", "options"}`` recorded in the manifest.
        task: One of :data:`TASKS`.
        fingerprint: :func:`source_fingerprint` of the ingest; if ``out_dir``
            holds an intact dataset with this fingerprint nothing is written.
        label_map: Mask classes ``{index: name}``.
        class_names: Names of the classification classes.
        normalisation: Intensity normalisation, in words.
        split_method, split_seed, split_ratios: How ``split`` was assigned.
        extras: Source-specific facts for the manifest.
        rows_per_shard: Rows per shard file (the last one may be shorter).
        force: Rewrite even when up to date.

    Returns:
        The manifest of the dataset now at ``out_dir``.

    Raises:
        ValueError: no rows, mixed image shapes, a patient in two splits, bad arguments.
    """
    out = Path(out_dir).absolute()
    if task not in TASKS:
        raise ValueError(f"task={task!r} must be one of {TASKS}")
    if not isinstance(rows_per_shard, int) or rows_per_shard < 1:
        raise ValueError(f"rows_per_shard={rows_per_shard!r} must be a positive int")
    _recover_interrupted_swap(out)
    if not force and (m := find_up_to_date(out, fingerprint)) is not None:
        logger.info("%s is up to date (fingerprint %s); nothing to do", out, fingerprint[:12])
        return m
    with _staging_dir(out) as tmp:
        shards, tables = _write_shards(tmp, blocks, rows_per_shard)
        bags, counts = _build_bags(pa.concat_tables(tables).select(_BAG_SOURCE_COLUMNS))
        del tables
        _write_parquet(bags, tmp / BAGS_NAME, row_group_size=64)
        manifest = Manifest(
            format_version=FORMAT_VERSION,
            source=dict(source),
            task=task,
            label_map={int(k): str(v) for k, v in (label_map or {}).items()},
            class_names=tuple(str(c) for c in class_names),
            normalisation=normalisation,
            split_method=split_method,
            split_seed=split_seed,
            split_ratios=None if split_ratios is None else tuple(float(r) for r in split_ratios),
            shards=tuple(shards),
            bags=FileInfo(BAGS_NAME, bags.num_rows, sha256_file(tmp / BAGS_NAME)),
            fingerprint=fingerprint,
            extras=dict(extras or {}),
            **counts,
        )
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest.to_dict(), indent=1, default=str) + "\n")
    logger.info("wrote %s: %d images of %d patients in %d shards", out, manifest.num_images,
                manifest.num_patients, len(shards))
    return read_manifest(out)


def _write_one(table: pa.Table, path: Path, rows_per_shard: int) -> FileInfo:
    _write_parquet(table, path, row_group_size=min(rows_per_shard, 512))
    return FileInfo(path.name, table.num_rows, sha256_file(path))


def _write_shards(tmp: Path, blocks: Iterable[ImageBlock],
                  rows_per_shard: int) -> tuple[list[FileInfo], list[pa.Table]]:
    """Write the shard files; return their FileInfos and the written tables (kept for the bag table).

    Files are encoded and hashed on a background thread (pyarrow releases the
    GIL), overlapping with the decoding that produces the next blocks.
    """
    futures: list[Future[FileInfo]] = []
    tables: list[pa.Table] = []
    pending: list[pa.RecordBatch] = []
    n_pending = 0
    shape = None
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="medcl-shard-writer") as pool:

        def flush(n: int) -> None:
            nonlocal pending, n_pending
            table = pa.Table.from_batches(pending, schema=SHARD_SCHEMA).combine_chunks()
            head, rest = table.slice(0, n), table.slice(n)
            futures.append(pool.submit(_write_one, head, tmp / f"shard-{len(futures):05d}.parquet", rows_per_shard))
            tables.append(head.select(_BAG_SOURCE_COLUMNS))
            pending = rest.to_batches()
            n_pending = rest.num_rows
            if len(futures) > 1:
                futures[-2].result()  # surface write errors early; at most one shard in flight

        for block in blocks:
            if not isinstance(block, ImageBlock):
                raise TypeError(f"blocks must yield ImageBlock, got {type(block).__name__}")
            if shape is None:
                shape = block.images.shape[1:]
            elif block.images.shape[1:] != shape:
                raise ValueError(f"image shape {list(block.images.shape[1:])} of {block.source_paths()[0]!r} "
                                 f"differs from the first image's {list(shape)}; all images of a dataset must "
                                 "share [C, H, W]")
            batch = block.to_record_batch()
            pending.append(batch)
            n_pending += batch.num_rows
            while n_pending >= rows_per_shard:
                flush(rows_per_shard)
        if n_pending:
            flush(n_pending)
        shards = [f.result() for f in futures]
    if not shards:
        raise ValueError("no images to write (empty source)")
    return shards, tables
