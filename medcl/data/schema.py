"""The shard schema: the one data format every medcl stage reads.

One Parquet row per 2D image. Images are stored flattened as ``float32`` with
their shape ``[C, H, W]`` beside them; masks flattened as ``int16`` ``[H, W]``
(``-1`` = unlabelled pixel). Every dataset directory holds ``shard-*.parquet``,
``bags.parquet`` (one row per patient, built once at ingest) and
``manifest.json``.
"""
from __future__ import annotations

import pyarrow as pa

__all__ = [
    "SHARD_SCHEMA",
    "BAG_SCHEMA",
    "SPLITS",
    "IGNORE_INDEX",
    "MANIFEST_NAME",
    "BAGS_NAME",
    "SHARD_GLOB",
]

SPLITS = ("train", "val", "test")
IGNORE_INDEX = -1
MANIFEST_NAME = "manifest.json"
BAGS_NAME = "bags.parquet"
SHARD_GLOB = "shard-*.parquet"

SHARD_SCHEMA = pa.schema(
    [
        pa.field("patient_id", pa.string(), nullable=False),
        pa.field("volume_id", pa.string(), nullable=False),
        # Position of the slice in its volume (or index of the view of a patient).
        pa.field("slice_index", pa.int32(), nullable=False),
        # slice_index / number of slices of the volume, in [0, 1); 0 for 2D images.
        pa.field("slice_position", pa.float32(), nullable=False),
        pa.field("view", pa.string()),  # e.g. "PA", "left"; null when unknown
        pa.field("split", pa.string(), nullable=False),  # one of SPLITS
        pa.field("site", pa.string(), nullable=False),  # acquisition site, "A" by default
        pa.field("image", pa.list_(pa.float32()), nullable=False),  # C*H*W, row-major
        pa.field("image_shape", pa.list_(pa.int32()), nullable=False),  # [C, H, W]
        pa.field("mask", pa.list_(pa.int16())),  # H*W class indices; null when no mask
        pa.field("class_label", pa.int32()),  # single-label class; null when none
        pa.field("class_labels", pa.list_(pa.uint8())),  # multi-hot [K]; null when none
        pa.field("source_path", pa.string(), nullable=False),
    ]
)

# One row per patient: every image of the patient, for MICLe pairs and
# volume-partition sampling (Ray Data's groupby is far too slow for this).
BAG_SCHEMA = pa.schema(
    [
        pa.field("patient_id", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("site", pa.string(), nullable=False),
        pa.field("num_images", pa.int32(), nullable=False),
        pa.field("volume_ids", pa.list_(pa.string()), nullable=False),
        pa.field("slice_positions", pa.list_(pa.float32()), nullable=False),
        pa.field("images", pa.list_(pa.float32()), nullable=False),  # n*C*H*W
        pa.field("image_shape", pa.list_(pa.int32()), nullable=False),  # [C, H, W]
        pa.field("class_label", pa.int32()),
        pa.field("class_labels", pa.list_(pa.uint8())),
    ]
)
