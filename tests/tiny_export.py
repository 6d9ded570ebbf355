"""A small segmentation model for real hippocampus slices, exported with medcl's own export code (tests, benchmark)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

TINY_UNET = {"features": [4, 8], "norm": "instance", "embed_dim": 8}


def train_and_export(dataset: Path, out: Path, features: list[int] | None = None, foreground: float = 0.1) -> Path:
    """A seeded random U-Net whose head bias is set so that ~``foreground`` of ``dataset``'s pixels come out as
    each foreground class (a model that segments something, at the cost of one forward pass), ``medcl export``-ed."""
    from medcl.data.decode import decode_images, read_shards_table
    from medcl.data.manifest import read_manifest
    from medcl.export import export_model
    from medcl.model_card import build_network
    from medcl.train.checkpoints import save_checkpoint

    torch.manual_seed(0)
    manifest = read_manifest(dataset)
    spec = dict(TINY_UNET, features=features or TINY_UNET["features"])
    net = build_network("segmentation", spec, int(manifest.image_shape[0]), max(2, len(manifest.label_map)))
    x = torch.from_numpy(np.array(decode_images(read_shards_table(dataset, columns=["image", "image_shape"]))))
    with torch.no_grad():
        logits = net(x[torch.randperm(len(x))[:256]]).transpose(0, 1).reshape(net.seg_head.out_channels, -1)
        for c in range(1, len(logits)):
            net.seg_head.bias[c] -= torch.quantile(logits[c] - logits[0], 1 - foreground)
    config = {"kind": "seg_finetune", "model": spec}
    checkpoint = save_checkpoint(out.parent / f"{out.name}-checkpoint", model=net, epoch=0, step=0,
                                 config=config, metrics={})
    return export_model(checkpoint, out, weights="last", dataset_dir=dataset)


def reference_slices(dataset: Path, volume: str) -> np.ndarray:
    """The slices ``medcl ingest`` wrote for ``volume``, in slice order. Shape: (S, C, H, W)."""
    import pyarrow.compute as pc

    from medcl.data.decode import decode_images, read_shards_table

    table = read_shards_table(dataset, filter=pc.field("volume_id") == volume)
    order = np.argsort(table.column("slice_index").to_numpy())
    return decode_images(table)[order]
