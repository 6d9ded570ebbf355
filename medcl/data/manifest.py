"""``manifest.json``: what a dataset directory holds, where it came from, and its checksums.

The manifest is written last by :func:`medcl.data.shards.write_dataset`; it
lists every shard with its row count and sha256, the per-split and per-site
counts, the label map / class names, the image shape, the normalisation and
the fingerprint of the source that built it (so a re-run can be a no-op).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from medcl.data.schema import MANIFEST_NAME

__all__ = [
    "FORMAT_VERSION",
    "TASKS",
    "FileInfo",
    "Manifest",
    "ManifestError",
    "read_manifest",
    "verify_checksums",
    "find_up_to_date",
    "source_fingerprint",
    "sha256_file",
]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
TASKS = ("segmentation", "multiclass", "multilabel", "unlabelled")


class ManifestError(ValueError):
    """A manifest is corrupt, of an unknown format, or its checksums do not verify."""


@dataclass(frozen=True)
class FileInfo:
    """One data file of a dataset: name relative to the dataset dir, row count, sha256."""

    file: str
    num_rows: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """The contents of ``manifest.json``.

    Attributes:
        format_version: Layout version (:data:`FORMAT_VERSION`).
        source: ``{"kind", "path", "options"}`` of the ingest that built it.
        task: One of :data:`TASKS`. Masks live in the ``mask`` column, class
            labels in ``class_label`` / ``class_labels``; a "segmentation"
            dataset may also carry class labels (then ``class_names`` is set).
        num_patients, num_volumes, num_images: Totals over all splits.
        splits: ``{split: {"patients": n, "images": m}}`` for every split.
        sites: ``{site: {"patients": n, "images": m}}``.
        label_map: Mask classes ``{index: name}``, background included; empty without masks.
        class_names: Class names for ``class_label`` (index order) / ``class_labels`` (column order).
        image_shape: ``(C, H, W)`` of every image.
        normalisation: How intensities were scaled, in words.
        split_method: "random" (by patient, seeded), "source" (kept from the source)
            or "column" (from a CSV column).
        split_seed, split_ratios: Seed and train/val/test ratios of a "random" split.
        shards: One :class:`FileInfo` per shard file, in order.
        bags: :class:`FileInfo` of ``bags.parquet``.
        fingerprint: Hash of the ingest options and every source file's path, size and mtime.
        extras: Source-specific facts (slicing axis, modalities, generator settings, ...).
        root: Directory the manifest was read from (not serialised).
    """

    format_version: int
    source: dict[str, Any]
    task: str
    num_patients: int
    num_volumes: int
    num_images: int
    splits: dict[str, dict[str, int]]
    sites: dict[str, dict[str, int]]
    label_map: dict[int, str]
    class_names: tuple[str, ...]
    image_shape: tuple[int, int, int]
    normalisation: str
    split_method: str
    split_seed: int | None
    split_ratios: tuple[float, ...] | None
    shards: tuple[FileInfo, ...]
    bags: FileInfo
    fingerprint: str
    extras: dict[str, Any] = field(default_factory=dict)
    root: Path | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ManifestError(f"task={self.task!r} is not one of {TASKS}")
        if len(self.image_shape) != 3:
            raise ManifestError(f"image_shape={self.image_shape!r} must be [C, H, W]")

    @property
    def num_classes(self) -> int:
        """Number of mask classes (background included); 0 without masks."""
        return len(self.label_map)

    @property
    def shard_paths(self) -> list[Path]:
        """Absolute shard paths (needs ``root``, set by :func:`read_manifest`)."""
        if self.root is None:
            raise ValueError("this Manifest has no root; load it with read_manifest(dir)")
        return [self.root / s.file for s in self.shards]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (``label_map`` keys become strings, tuples lists, no ``root``)."""
        d = asdict(self)
        d.pop("root")
        d["label_map"] = {str(k): v for k, v in self.label_map.items()}
        d["class_names"] = list(self.class_names)
        d["image_shape"] = list(self.image_shape)
        d["split_ratios"] = None if self.split_ratios is None else list(self.split_ratios)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], root: str | os.PathLike | None = None) -> Manifest:
        """Inverse of :meth:`to_dict`.

        Raises:
            ManifestError: a required field is missing or malformed, or the
                format version is newer than this medcl understands.
        """
        names = [f for f in cls.__dataclass_fields__ if f != "root"]
        missing = [n for n in names if n not in d and n != "extras"]
        if missing:
            raise ManifestError(f"manifest lacks field(s) {missing}")
        if not isinstance(d["format_version"], int) or d["format_version"] > FORMAT_VERSION:
            raise ManifestError(
                f"format_version={d['format_version']!r} is not an int <= {FORMAT_VERSION} (this medcl's); "
                "a newer medcl wrote it: upgrade medcl"
            )
        try:
            kw = {n: d[n] for n in names if n in d}
            kw["label_map"] = {int(k): str(v) for k, v in d["label_map"].items()}
            kw["class_names"] = tuple(d["class_names"])
            kw["image_shape"] = tuple(int(v) for v in d["image_shape"])
            kw["split_ratios"] = None if d["split_ratios"] is None else tuple(d["split_ratios"])
            kw["shards"] = tuple(FileInfo(**s) for s in d["shards"])
            kw["bags"] = FileInfo(**d["bags"])
        except (TypeError, ValueError, AttributeError) as e:
            raise ManifestError(f"malformed manifest field: {e}") from e
        return cls(**kw, root=None if root is None else Path(root))


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def source_fingerprint(
    kind: str, options: Mapping[str, Any], root: str | os.PathLike | None, files: Iterable[str | os.PathLike]
) -> str:
    """Hash of the ingest kind, its resolved options and each source file's (relative path, size, mtime_ns).

    Args:
        kind: Source kind ("msd", "medmnist", ...).
        options: Resolved options (defaults filled in); must be JSON-serialisable via ``str`` fallback.
        root: Directory the file paths are made relative to (``None``: no files).
        files: Source files read by the ingest.
    """
    h = hashlib.sha256()
    h.update(json.dumps({"format_version": FORMAT_VERSION, "kind": kind, "options": options},
                        sort_keys=True, default=str).encode())
    root = Path(root) if root is not None else None
    for f in sorted(Path(p) for p in files):
        st = f.stat()
        rel = f.relative_to(root) if root is not None and f.is_relative_to(root) else f
        h.update(f"\n{rel.as_posix()}\t{st.st_size}\t{st.st_mtime_ns}".encode())
    return h.hexdigest()


def read_manifest(path: str | os.PathLike) -> Manifest:
    """Load ``manifest.json`` of a dataset directory (or the file itself).

    Raises:
        FileNotFoundError: no manifest there (names the file).
        ManifestError: the manifest is not valid JSON or lacks fields (names the file).
    """
    p = Path(path)
    mpath = p if p.name == MANIFEST_NAME and p.is_file() else p / MANIFEST_NAME
    if not mpath.is_file():
        raise FileNotFoundError(f"{mpath}: no medcl manifest; build the dataset with `medcl ingest` first")
    try:
        d = json.loads(mpath.read_text())
        if not isinstance(d, dict):
            raise ManifestError(f"top level is {type(d).__name__}, expected an object")
        return Manifest.from_dict(d, root=mpath.parent)
    except (json.JSONDecodeError, UnicodeDecodeError, ManifestError) as e:
        raise ManifestError(f"{mpath}: corrupt manifest: {e}") from e


def verify_checksums(path: str | os.PathLike) -> Manifest:
    """Check every shard and ``bags.parquet`` against the manifest's sha256.

    Training runs call this once when they open a dataset (most corrupted bytes
    of a Parquet shard still decode, into wrong pixels). It reads every byte once,
    at about 1 GB/s: 4 ms for the quickstart's dataset, 0.2 s for hippocampus at
    64x64 (benchmarks/README.md, "Checksum verification").

    Returns:
        The manifest.

    Raises:
        ManifestError: a file is missing or its bytes differ (names the file).
    """
    start = time.perf_counter()
    m = read_manifest(path)
    size = 0
    for info in (*m.shards, m.bags):
        f = m.root / info.file
        if not f.is_file():
            raise ManifestError(f"{f}: listed in the manifest but missing; re-create the dataset "
                                "(`medcl ingest ... --force`)")
        if sha256_file(f) != info.sha256:
            raise ManifestError(f"{f}: sha256 differs from the manifest (file changed or corrupt); re-create the "
                                "dataset (`medcl ingest ... --force`)")
        size += f.stat().st_size
    logger.info("%s: %d files (%.1f MB) match their sha256 in %s (%.2f s)", m.root, len(m.shards) + 1, size / 1e6,
                MANIFEST_NAME, time.perf_counter() - start)
    return m


def find_up_to_date(out_dir: str | os.PathLike, fingerprint: str) -> Manifest | None:
    """The dataset at ``out_dir`` if it was built from the same fingerprint and its checksums verify."""
    try:
        m = read_manifest(out_dir)
        if m.fingerprint != fingerprint:
            return None
        return verify_checksums(out_dir)
    except (FileNotFoundError, ManifestError) as e:
        logger.debug("no reusable dataset at %s: %s", out_dir, e)
        return None


