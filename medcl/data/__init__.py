"""medcl data: ingest sources into Parquet shards, read them back, split patients.

Ingest (one dataset directory per source: ``shard-*.parquet``, ``bags.parquet``,
``manifest.json``): ``medcl.data.ingest.ingest`` dispatches to :func:`ingest_msd`,
:func:`ingest_medmnist`, :func:`ingest_image_folder`, :func:`ingest_synthetic`
(the modules of :mod:`medcl.data.sources`).
(The ``ingest`` function is deliberately not re-exported here: it would hide
the ``medcl.data.ingest`` module, breaking ``mock.patch("medcl.data.ingest.X")``.)
Writing: sources yield :class:`ImageBlock` rows, :func:`write_dataset` writes them.
Reading: :func:`read_manifest`, :func:`verify_checksums`, :func:`read_shards_table`,
:func:`read_bags_table`, :func:`decode_images`, :func:`decode_masks`.
Splits: :func:`split_patients`, :func:`patients_by_split`, :func:`labelled_patients`, :func:`patient_classes`,
:func:`unlabelled_patients`.

``medcl.data.streams`` (Ray Data streams, driver side) and ``medcl.data.collate``
(batches in the Ray Train worker) are not imported here, so that importing
``medcl.data`` does not import Ray.
"""
from __future__ import annotations

from medcl.data.decode import decode_images, decode_masks, read_bags_table, read_shards_table
from medcl.data.image_block import ImageBlock
from medcl.data.ingest import SOURCE_KINDS, ingest_options
from medcl.data.manifest import FORMAT_VERSION, Manifest, ManifestError, read_manifest, verify_checksums
from medcl.data.shards import write_dataset
from medcl.data.sources import (
    IngestError,
    generate_synthetic,
    ingest_image_folder,
    ingest_medmnist,
    ingest_msd,
    ingest_synthetic,
)
from medcl.data.splits import labelled_patients, patient_classes, patients_by_split, split_patients, unlabelled_patients

__all__ = [
    "FORMAT_VERSION",
    "SOURCE_KINDS",
    "ImageBlock",
    "IngestError",
    "Manifest",
    "ManifestError",
    "decode_images",
    "decode_masks",
    "generate_synthetic",
    "ingest_image_folder",
    "ingest_medmnist",
    "ingest_msd",
    "ingest_options",
    "ingest_synthetic",
    "labelled_patients",
    "patient_classes",
    "patients_by_split",
    "read_bags_table",
    "read_manifest",
    "read_shards_table",
    "split_patients",
    "unlabelled_patients",
    "verify_checksums",
    "write_dataset",
]
