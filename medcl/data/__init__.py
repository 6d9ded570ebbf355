"""medcl data: ingest sources into Parquet shards, read them back, split patients.

Ingest (one dataset directory per source: ``shard-*.parquet``, ``bags.parquet``,
``manifest.json``): ``medcl.data.ingest.ingest`` dispatches to :func:`ingest_msd`,
:func:`ingest_medmnist`, :func:`ingest_image_folder`, :func:`ingest_synthetic`.
(The ``ingest`` function is deliberately not re-exported here: it would hide
the ``medcl.data.ingest`` module, breaking ``mock.patch("medcl.data.ingest.X")``.)
Reading: :func:`read_manifest`, :func:`verify_checksums`, :func:`read_shards_table`,
:func:`read_bags_table`, :func:`decode_images`, :func:`decode_masks`.
Splits: :func:`split_patients`, :func:`patients_by_split`, :func:`labelled_patients`,
:func:`unlabelled_patients`.

``medcl.data.ray_datasets`` (Ray Data streams) is not imported here, so that
importing ``medcl.data`` does not import Ray.
"""
from __future__ import annotations

from medcl.data.decode import decode_images, decode_masks, read_bags_table, read_shards_table
from medcl.data.image_folder import ingest_image_folder
from medcl.data.ingest import SOURCE_KINDS, IngestError, ingest_options
from medcl.data.manifest import FORMAT_VERSION, Manifest, ManifestError, read_manifest, verify_checksums
from medcl.data.medmnist import ingest_medmnist
from medcl.data.msd import ingest_msd
from medcl.data.shards import ImageBlock, write_dataset
from medcl.data.splits import labelled_patients, patients_by_split, split_patients, unlabelled_patients
from medcl.data.synthetic import generate_synthetic, ingest_synthetic

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
    "patients_by_split",
    "read_bags_table",
    "read_manifest",
    "read_shards_table",
    "split_patients",
    "unlabelled_patients",
    "verify_checksums",
    "write_dataset",
]
