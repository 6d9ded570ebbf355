"""Fine-tuning starts its segmentation head at the labelled set's class prior (issue 14, defect 4).

A default-initialised 1x1 head gives each seed its own random guess of the class
mix (seed 1 of the hippocampus U-Net: mean background probability 0.19 where
background is ~95 % of the pixels). The bias starts at ``log p_k`` of the slices
the stage is about to train on (counted here from the raw mask columns of the
shard files); the weights keep their default init (with near-zero weights every
pixel would predict ``p``, but the decoder gets almost no gradient: measured
Dice 0.28 vs 0.79 on hippocampus 5 %).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest
import torch

from medcl.config import SegFinetuneConfig, UNetSpec
from medcl.models import UNet

SPEC = UNetSpec(features=(8, 16, 32))


def test_init_seg_head_sets_the_log_prior_bias_and_keeps_the_weights():
    torch.manual_seed(1)
    net = UNet.cpu(in_channels=1, num_classes=3).eval()
    weights = net.seg_head.weight.detach().clone()
    counts = torch.tensor([9500.0, 300.0, 200.0])
    images = torch.rand(4, 1, 64, 64)
    with torch.no_grad():
        before = net(images).softmax(dim=1).mean(dim=(0, 2, 3))
    net.init_seg_head(counts)
    assert torch.equal(net.seg_head.weight, weights)
    torch.testing.assert_close(net.seg_head.bias.detach(), torch.log(counts / counts.sum()))
    with torch.no_grad():
        after = net(images).softmax(dim=1).mean(dim=(0, 2, 3))
    # seed 1's default head puts far less than 95 % on background; the prior bias moves it there
    assert abs(float(after[0]) - 0.95) < 0.1 < abs(float(before[0]) - 0.95)


def test_near_zero_weights_predict_the_prior_at_every_pixel():
    torch.manual_seed(1)
    net = UNet.cpu(in_channels=1, num_classes=3).eval()
    counts = torch.tensor([9500.0, 300.0, 200.0])
    net.init_seg_head(counts, weight_std=1e-3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        probs = net(torch.rand(4, 1, 64, 64)).softmax(dim=1)
    prior = (counts / counts.sum()).view(1, 3, 1, 1)
    assert (probs - prior).abs().max() < 1e-2  # every pixel of every image
    assert 5e-4 < float(net.seg_head.weight.detach().std()) < 2e-3


def _labelled_frequencies(data: Path, fraction: float, seed: int, num_classes: int) -> np.ndarray:
    """Class frequencies of the labelled training subjects' masks, read straight from the shards."""
    from medcl.data.splits import labelled_patients, patients_by_split

    patients = labelled_patients(patients_by_split(data)["train"], fraction, seed)
    table = pads.dataset(sorted(str(p) for p in data.glob("shard-*.parquet")), format="parquet").to_table(
        columns=["mask"], filter=(pads.field("split") == "train") & pads.field("patient_id").isin(patients))
    masks = np.concatenate([np.asarray(m, np.int64) for m in table.column("mask").to_pylist() if m is not None])
    counts = np.bincount(masks[masks >= 0], minlength=num_classes).astype(np.float64)
    return counts / counts.sum()


@pytest.mark.ray
def test_fine_tune_starts_at_the_class_frequencies_of_its_labelled_slices(ray_session, tmp_path):
    """One step at lr 1e-9 leaves the stage's start point in its checkpoint: it predicts the labelled prior."""
    from in_process import InProcessContext

    from medcl.data.ingest import ingest
    from medcl.data.streams import build_streams
    from medcl.train.driver import STAGES, run_loop, stage_inputs

    data = tmp_path / "seg"
    ingest("synthetic", None, data, {"num_patients": 8, "images_per_patient": 4, "size": 32, "num_classes": 3,
                                     "seed": 3})
    cfg = SegFinetuneConfig(max_epochs=1, max_steps_per_epoch=1, batch_size_per_worker=4, lr=1e-9,
                            label_fraction=0.5, augment=False, seed=1, model=SPEC)
    # Only the training stream is built (the stage's own spec); it stands in for the test slices too.
    train = build_streams({"train": STAGES[cfg.kind].datasets(cfg, str(data))["train"]})["train"]
    streams = {"train": train, "test": train}
    (tmp_path / "keep").mkdir()
    ctx = InProcessContext(streams, tmp_path / "keep")
    run_loop(ctx, cfg, stage_inputs(cfg, str(data), streams, 1))

    freq = _labelled_frequencies(data, cfg.label_fraction, cfg.seed, 3)
    assert freq[0] > 0.6 and freq[1:].min() > 0.005  # a skewed prior, every class present
    state = torch.load(ctx.checkpoints[-1] / "model.pt", map_location="cpu", weights_only=True)
    # one step at lr 1e-9 leaves the bias where the stage set it: log of the labelled slices' class frequencies
    np.testing.assert_allclose(state["seg_head.bias"].numpy(), np.log(freq), atol=1e-4)
