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
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, get_origin

import yaml

from medcl.data.manifest import Manifest
from medcl.data.sources.common import IngestError
from medcl.data.sources.image_folder import ingest_image_folder
from medcl.data.sources.medmnist import ingest_medmnist
from medcl.data.sources.msd import ingest_msd
from medcl.data.sources.synthetic import ingest_synthetic

__all__ = ["SOURCES", "SOURCE_KINDS", "ingest", "ingest_options", "ingest_option_help"]

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


def ingest_option_help(source_kind: str) -> dict[str, str]:
    """One line of help per option of a source kind: its ``Args:`` entry in the source function's docstring, as plain text.

    Raises:
        IngestError: unknown ``source_kind``.
    """
    doc = inspect.getdoc(_function(source_kind)) or ""
    args = re.search(r"^Args:\n(.*?)(?:\n\S|\Z)", doc, flags=re.S | re.M)
    entries: dict[str, str] = {}
    names: list[str] = []
    for line in (args.group(1) if args else "").splitlines():
        match = re.match(r"^    (\w+(?:, \w+)*)(?: \([^)]*\))?: (.*)$", line)  # "a, b: text" documents both
        if match:
            names = match.group(1).split(", ")
            entries.update({name: match.group(2).strip() for name in names})
        elif names and line.strip():
            entries.update({name: entries[name] + " " + line.strip() for name in names})
    return {option: _plain(entries.get(option, "")) for option in ingest_options(source_kind)}


def _plain(text: str) -> str:
    """Docstring markup as terminal text: ``:data:`~a.b.NAME``` -> NAME, ````x```` -> x."""
    text = re.sub(r":\w+:`~?([\w.]+)`", lambda m: m.group(1).rsplit(".", 1)[-1], text)
    return text.replace("``", "")


def _is_sequence_option(annotation: Any) -> bool:
    return get_origin(annotation) in (list, tuple, Sequence) or annotation in (list, tuple)


def _comma_lists(source_kind: str, opts: dict[str, Any]) -> dict[str, Any]:
    """``"0.5,0.25,0.25"`` -> ``[0.5, 0.25, 0.25]`` for the options whose parameter is a sequence.

    Each item is read as YAML, as a whole value is on the command line; other options are untouched.
    """
    params = inspect.signature(_function(source_kind), eval_str=True).parameters
    out = dict(opts)
    for key, value in opts.items():
        if (isinstance(value, str) and "," in value and key in params
                and _is_sequence_option(params[key].annotation)):
            out[key] = [yaml.safe_load(item) for item in value.split(",")]
    return out


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
        options: Keyword options of the source's function (see :func:`ingest_options`); a sequence
            option may be given as comma-separated text (``"0.5,0.25,0.25"``).
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
    opts = _comma_lists(source_kind, opts)
    if source_kind == "synthetic":
        if source is not None:
            raise IngestError(f"the synthetic source takes no source path, got {str(source)!r}")
        return fn(out_dir, **opts, force=force)
    if source is None:
        raise IngestError(f"source_kind={source_kind!r} needs a source path")
    return fn(source, out_dir, **opts, force=force)
