"""Ingest entry point: one function per source kind, chosen from an explicit table.

``ingest(source_kind, source, out_dir, options)`` dispatches through :data:`SOURCES`:

============  =========================================================  ==========================
kind          function                                                   source
============  =========================================================  ==========================
"msd"         :func:`medcl.data.sources.msd.ingest_msd`                  Decathlon task folder
"medmnist"    :func:`medcl.data.sources.medmnist.ingest_medmnist`        MedMNIST ``.npz`` file
"folder"      :func:`medcl.data.sources.image_folder.ingest_image_folder`  CSV of image paths
"synthetic"   :func:`medcl.data.sources.synthetic.ingest_synthetic`      none (generated)
============  =========================================================  ==========================

Every bad input raises one :class:`~medcl.data.sources.common.IngestError` (a
``ValueError``) naming the file, option or value, and leaves no partial output:
the dataset is built in a staging directory that is removed on error, and an
old dataset at ``out_dir`` stays intact. The helpers the sources share live in
:mod:`medcl.data.sources.common`; the sources never import this module.
"""
from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Mapping
from typing import Any

from medcl.data.manifest import Manifest
from medcl.data.sources.common import IngestError
from medcl.data.sources.image_folder import ingest_image_folder
from medcl.data.sources.medmnist import ingest_medmnist
from medcl.data.sources.msd import ingest_msd
from medcl.data.sources.synthetic import ingest_synthetic

__all__ = ["SOURCES", "SOURCE_KINDS", "ingest", "ingest_options"]

#: Source kind -> ingest function (its keyword-only arguments are the kind's options).
SOURCES: dict[str, Callable[..., Manifest]] = {
    "msd": ingest_msd,
    "medmnist": ingest_medmnist,
    "folder": ingest_image_folder,
    "synthetic": ingest_synthetic,
}
SOURCE_KINDS = tuple(SOURCES)


def _function(kind: str) -> Callable[..., Manifest]:
    if kind not in SOURCES:
        raise IngestError(f"source_kind={kind!r} is not one of {SOURCE_KINDS}")
    return SOURCES[kind]


def ingest_options(source_kind: str) -> dict[str, Any]:
    """The options a source kind accepts, with their defaults (for CLI help and validation).

    Raises:
        IngestError: unknown ``source_kind``.
    """
    sig = inspect.signature(_function(source_kind))
    return {n: p.default for n, p in sig.parameters.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and n != "force"}


def ingest(
    source_kind: str,
    source: str | os.PathLike | None,
    out_dir: str | os.PathLike,
    options: Mapping[str, Any] | None = None,
    *,
    force: bool = False,
) -> Manifest:
    """Turn a source into a dataset directory (shards + ``bags.parquet`` + ``manifest.json``).

    Args:
        source_kind: One of :data:`SOURCE_KINDS`.
        source: Path of the source (task folder, ``.npz``, CSV); ``None`` for "synthetic".
        out_dir: Dataset directory to create or replace.
        options: Keyword options of the source's function (see :func:`ingest_options`).
        force: Rebuild even if ``out_dir`` is up to date with this source and options.

    Returns:
        The dataset's manifest (the existing one when it was already up to date).

    Raises:
        IngestError: unknown kind or option, missing source, or any bad input.
    """
    fn = _function(source_kind)
    opts = dict(options or {})
    known = ingest_options(source_kind)
    unknown = sorted(set(opts) - set(known))
    if unknown:
        raise IngestError(f"unknown {source_kind} ingest option(s) {unknown}; known options: {sorted(known)}")
    if source_kind == "synthetic":
        if source is not None:
            raise IngestError(f"the synthetic source takes no source path, got {str(source)!r}")
        return fn(out_dir, **opts, force=force)
    if source is None:
        raise IngestError(f"source_kind={source_kind!r} needs a source path")
    return fn(source, out_dir, **opts, force=force)
