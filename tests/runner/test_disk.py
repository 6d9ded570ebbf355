"""Disk estimates (``medcl.runner.disk``) against parameter counts written out by hand and real checkpoint files."""
from __future__ import annotations

import json
import shutil
import textwrap

import pytest
import torch

from medcl.config.stages import stage_config_from_dict
from medcl.runner.disk import (
    DiskEstimate,
    DiskSpaceError,
    checkpoint_bytes,
    estimate_pipeline_disk,
    format_bytes,
    refuse_if_short,
)

TINY = {"features": [2, 4], "norm": "instance", "embed_dim": 8}
# A U-Net with widths (2, 4) on 1 channel, counted by hand (3x3 convs without bias, affine InstanceNorm):
#   encoder  conv0: 2*1*9 + 2*2 + 2*2*9 + 2*2 = 62;  down1: 4*2*9 + 2*4 + 4*4*9 + 2*4 = 232     -> 294
#   decoder  up1: transposed conv 4*2*2*2 + 2 = 34;  conv block 2*4*9 + 2*2 + 2*2*9 + 2*2 = 116 -> 150
#   heads    seg (1x1, K classes): 2*K + K;  global (bottleneck pooled to 4x4, flattened):
#            Linear(4*16, 4) + Linear(4, 8) = 260 + 40 = 300;  local: 1x1 conv 2->2 + 1x1 conv 2->8 = 6 + 24 = 30
# A checkpoint holds the float32 state and AdamW's two moments: 4 * 3 * parameters; a fine-tuning
# stage that validates also keeps its best-validation weights (selection.pt): 4 * 4 * parameters.
HAND_COUNTED = [
    ("seg_finetune", 2, 294 + 150 + 6, 4),
    ("seg_finetune", 3, 294 + 150 + 9, 4),
    ("global_pretrain", 2, 294 + 300, 3),
    ("local_pretrain", 2, 294 + 150 + 30, 3),
]


@pytest.mark.parametrize("kind, classes, params, copies", HAND_COUNTED)
def test_checkpoint_bytes_of_a_tiny_unet_match_a_hand_count(kind, classes, params, copies):
    cfg = stage_config_from_dict({"kind": kind, "model": TINY})
    assert checkpoint_bytes(cfg, in_channels=1, num_classes=classes) == 4 * copies * params


def test_a_frozen_encoder_has_no_optimiser_state():
    from medcl.models import ResNetClassifier
    from medcl.train.stage import build_encoder

    cfg = stage_config_from_dict({"kind": "cls_finetune", "protocol": "linear", "model": {"arch": "resnet18"}})
    reference = ResNetClassifier(build_encoder(cfg.model, 1), 3)  # counted on a real network, independently
    state = sum(t.numel() * t.element_size() for t in reference.state_dict().values())
    head = sum(p.numel() for name, p in reference.named_parameters() if not name.startswith("encoder."))
    assert checkpoint_bytes(cfg, in_channels=1, num_classes=3) == state + 4 * 2 * head + state  # + best weights


def test_the_estimate_matches_a_real_checkpoint_on_disk(tmp_path):
    from medcl.models import UNet
    from medcl.train.checkpoints import save_checkpoint
    from medcl.train.nets import UNetPart

    # val_every 0: no best-validation copy (selection.pt), so the files are the model and optimiser state
    cfg = stage_config_from_dict({"kind": "seg_finetune", "val_every": 0, "model": {"features": [16, 32, 64, 128]}})
    net = UNetPart(UNet(in_channels=1, num_classes=3, features=(16, 32, 64, 128)), "logits")
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    net(torch.randn(2, 1, 16, 16)).sum().backward()
    optimizer.step()  # AdamW's moments exist after the first step
    save_checkpoint(tmp_path, model=net, optimizer=optimizer, epoch=0, step=1, config={}, metrics={})
    on_disk = sum(p.stat().st_size for p in tmp_path.iterdir())
    estimate = checkpoint_bytes(cfg, in_channels=1, num_classes=3)
    assert estimate > 1_000_000 and abs(on_disk - estimate) < 0.02 * estimate  # zip and pickle framing only


# (per-checkpoint bytes, kept, in flight, existing, free) -> (total, needed, fits), by hand
ESTIMATES = [
    ({"a": 100, "b": 100, "c": 300}, 1, 2, 0, 10_000, 500 + 2 * 300, 1100, True),
    ({"a": 100, "b": 100, "c": 300}, 2, 1, 400, 1000, 1000 + 300, 900, True),
    ({"a": 100, "b": 100, "c": 300}, 2, 1, 400, 899, 1300, 900, False),
    ({"a": 100}, 1, 1, 5000, 0, 200, 0, True),  # a finished run needs nothing more
    ({"a": 10**12}, 1, 1, 0, None, 2 * 10**12, 2 * 10**12, True),  # remote storage: not checked
]


@pytest.mark.parametrize("sizes, kept, in_flight, existing, free, total, needed, fits", ESTIMATES)
def test_estimate_arithmetic(sizes, kept, in_flight, existing, free, total, needed, fits):
    estimate = DiskEstimate("/runs/x", sizes, kept, in_flight, existing, free)
    assert (estimate.total, estimate.needed, estimate.fits) == (total, needed, fits)


def test_a_run_that_does_not_fit_is_refused_unless_forced(monkeypatch, caplog):
    short = DiskEstimate("/runs/big", {"a": 3 * 10**9, "b": 3 * 10**9}, 1, 2, 10**9, 2 * 10**9)
    monkeypatch.delenv("MEDCL_SKIP_DISK_CHECK", raising=False)
    with pytest.raises(DiskSpaceError, match=r"pipeline 'big' would not fit on disk: checkpoints: ~12\.0 GB for "
                       r"2 jobs .*11\.0 GB to go; 2\.0 GB free at /runs/big\. .*MEDCL_SKIP_DISK_CHECK=1"):
        refuse_if_short(short, "pipeline 'big'")
    monkeypatch.setenv("MEDCL_SKIP_DISK_CHECK", "1")
    refuse_if_short(short, "pipeline 'big'")
    assert "running anyway" in caplog.text
    refuse_if_short(DiskEstimate("/runs/ok", {"a": 10}, 1, 1, 0, 100), "pipeline 'ok'")


@pytest.mark.parametrize("n, text", [(999, "999 B"), (1500, "1.5 kB"), (374_000_000, "374.0 MB"),
                                     (18.4e9, "18.4 GB"), (2.5e12, "2.5 TB")])
def test_format_bytes(n, text):
    assert format_bytes(n) == text


PIPELINE = """\
name: disk
dataset: {{path: {root}/data, source: synthetic, options: {{num_patients: 8, images_per_patient: 2, size: 16, seed: 0}}}}
metric: test/dice_2d
label_fractions: [0.5, 1.0]
seeds: [0]
stages:
  global: {{kind: global_pretrain, max_epochs: 1, model: &unet {{features: [2, 4], norm: instance, embed_dim: 8}}}}
  finetune: {{kind: seg_finetune, max_epochs: 1, model: *unet}}
methods: {{random: [finetune], global: [global, finetune]}}
scaling: {{num_workers: {workers}, cpus_per_worker: 1}}
max_concurrent_trials: 2
tracking: {{experiment: runs, workdir: {root}}}
storage_path: {root}/runs
"""


@pytest.mark.parametrize("workers, kept", [(1, 1), (2, 2)])  # inline: Tune keeps 1; TorchTrainer: Train keeps 2
def test_a_pipeline_estimate_counts_every_job(tmp_path, workers, kept):
    from medcl.config.pipeline import load_pipeline
    from medcl.runner.datasets import prepare_dataset
    from medcl.runner.plan import plan_jobs

    path = tmp_path / "p.yaml"
    path.write_text(textwrap.dedent(PIPELINE.format(root=tmp_path, workers=workers)))
    cfg = load_pipeline(path)
    prepare_dataset(cfg)
    classes = max(2, len(json.loads((tmp_path / "data" / "manifest.json").read_text())["label_map"]))
    seg, glob = 4 * 4 * (294 + 150 + 3 * classes), 4 * 3 * (294 + 300)  # the hand counts above (+ best weights)
    # Jobs by hand: random -> finetune per fraction; global -> one pretraining, then finetune per fraction.
    expected = {"finetune@seed=0,fraction=0.5": seg, "finetune@seed=0,fraction=1": seg, "global@seed=0": glob,
                "global>finetune@seed=0,fraction=0.5": seg, "global>finetune@seed=0,fraction=1": seg}

    estimate = estimate_pipeline_disk(cfg, plan_jobs(cfg))
    assert estimate.per_checkpoint == expected
    assert (estimate.kept, estimate.in_flight, estimate.existing) == (kept, 2, 0)
    assert estimate.total == kept * (4 * seg + glob) + 2 * seg
    assert estimate.storage == f"{tmp_path}/runs/disk"
    assert abs(estimate.free - shutil.disk_usage(tmp_path).free) < 10**9

    (tmp_path / "runs" / "disk" / "wave0").mkdir(parents=True)  # a resumed run: what is there counts as written
    (tmp_path / "runs" / "disk" / "wave0" / "blob").write_bytes(b"x" * 1000)
    assert estimate_pipeline_disk(cfg, plan_jobs(cfg)).existing == 1000
