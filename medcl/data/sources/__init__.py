"""Ingest sources: one module per kind of source, plus the helpers they share.

:mod:`~medcl.data.sources.msd` (Decathlon task folders), :mod:`~medcl.data.sources.medmnist`
(``.npz``), :mod:`~medcl.data.sources.image_folder` (CSV of 2D images) and
:mod:`~medcl.data.sources.synthetic` (a generated cohort) each turn a source into a dataset
directory; :mod:`~medcl.data.sources.common` holds :class:`IngestError`, the option checks,
resizing, normalisation and the fingerprint-and-write step. :mod:`medcl.data.ingest`
dispatches to them by source kind.
"""
from __future__ import annotations

from medcl.data.sources.common import IngestError
from medcl.data.sources.image_folder import ingest_image_folder
from medcl.data.sources.medmnist import ingest_medmnist
from medcl.data.sources.msd import ingest_msd
from medcl.data.sources.synthetic import generate_synthetic, ingest_synthetic

__all__ = [
    "IngestError",
    "generate_synthetic",
    "ingest_image_folder",
    "ingest_medmnist",
    "ingest_msd",
    "ingest_synthetic",
]
