"""``global_pretrain`` with ``positives: micle``: two different slices of one patient (methods §1c).

The pairs are checked against the bag rows of ``bags.parquet`` (read with pyarrow, images
decoded here), on a hand-made bag batch without Ray, and through the real ``patient_bags``
stream and the stage's own collate; a short in-process run (``run_loop``, one worker)
checks the step budget of a bag epoch (cycled passes, then the cap) and the hand-over.
"""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from medcl.config import ConfigError, GlobalPretrainConfig, UNetSpec
from medcl.config.stages import stage_config_from_dict
from medcl.train.stages.global_pretrain import GLOBAL_PRETRAIN

UNET = UNetSpec(features=(8, 16, 32, 64), norm="batch", embed_dim=32)
OPTIONS = {"num_patients": 12, "images_per_patient": 4, "size": 32, "num_classes": 2, "shifted_patients": 0,
           "seed": 3}


def _micle(**kw) -> GlobalPretrainConfig:
    return GlobalPretrainConfig(positives="micle", temperature=0.5, model=UNET, **kw)


def _context(streams: dict | None = None, keep: Path | None = None):
    from in_process import InProcessContext

    return InProcessContext(streams or {}, keep)


def _hand_bags(n_images=(3, 1, 4)):
    """Bag rows as Ray Data hands them to ``collate_fn``: image i of bag b is 10 b + i plus noise."""
    rng = np.random.default_rng(0)
    images = [np.stack([10 * b + i + rng.random((1, 8, 8), np.float32) for i in range(n)])
              for b, n in enumerate(n_images)]
    batch = {
        "patient_id": np.asarray([f"p{b}" for b in range(len(n_images))], dtype=object),
        "images": np.asarray([im.reshape(-1) for im in images], dtype=object),
        "image_shape": np.asarray([[1, 8, 8]] * len(n_images)),
        "num_images": np.asarray(n_images),
    }
    return batch, images


def _bag_images(data: Path) -> dict[str, np.ndarray]:
    """patient id -> (n, C, H, W) images of its bag, read from bags.parquet with pyarrow."""
    import pyarrow.parquet as pq

    t = pq.read_table(data / "bags.parquet", columns=["patient_id", "split", "images", "image_shape"]).to_pylist()
    return {r["patient_id"]: np.asarray(r["images"], np.float32).reshape(-1, *r["image_shape"])
            for r in t if r["split"] == "train"}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from medcl.data.ingest import ingest

    out = tmp_path_factory.mktemp("micle") / "synthetic"
    ingest("synthetic", None, out, OPTIONS)
    return out


@pytest.fixture(scope="module")
def bag_streams(data, ray_session) -> dict:
    """The stage's materialised streams (``patient_bags`` of the training split), shared by the Ray tests."""
    from medcl.data.streams import build_streams

    return build_streams(GLOBAL_PRETRAIN.datasets(_micle(batch_size_per_worker=3), str(data)))


# ----------------------------------------------------------------------------- config and checks (no Ray)
def test_positives_accepts_micle_and_names_the_three_choices():
    assert stage_config_from_dict({"kind": "global_pretrain", "positives": "micle"}).positives == "micle"
    with pytest.raises(ConfigError, match="positives: must be one of 'simclr', 'micle', 'partition', got 'bags'"):
        stage_config_from_dict({"kind": "global_pretrain", "positives": "bags"})


def test_collate_pairs_two_different_slices_of_a_bag_and_one_slice_twice():
    batch, images = _hand_bags()
    ctx = _context()
    out = GLOBAL_PRETRAIN.collate(ctx, _micle(), 0)(batch)
    a, b = out["index_a"].tolist(), out["index_b"].tolist()
    assert a[0] != b[0] and a[2] != b[2]  # bags of 3 and 4 slices: two different slices
    assert a[1] == b[1] == 0  # a one-slice bag: that slice twice (its two views then differ by augmentation)
    for row, im in enumerate(images):
        torch.testing.assert_close(out["image_a"][row], torch.from_numpy(im[a[row]]))
        torch.testing.assert_close(out["image_b"][row], torch.from_numpy(im[b[row]]))
    assert out["patient_id"].tolist() == ["p0", "p1", "p2"]
    # Seeded per pass: the same pass draws the same pairs again (a resumed run), other passes others.
    again = GLOBAL_PRETRAIN.collate(ctx, _micle(), 0)(batch)
    assert again["index_a"].tolist() == a and again["index_b"].tolist() == b
    draws = {tuple(GLOBAL_PRETRAIN.collate(ctx, _micle(), p)(batch)["index_a"].tolist()) for p in range(8)}
    assert len(draws) > 1


def test_loss_views_each_slice_once_and_a_one_slice_patient_gets_two_different_views(monkeypatch):
    import medcl.train.stages.global_pretrain as module
    from medcl.data.augment import ViewPair

    batch, _ = _hand_bags((3, 1, 4, 2))
    ctx, seen = _context(), []
    pairs = GLOBAL_PRETRAIN.collate(ctx, _micle(), 0)(batch)

    def net(x):
        seen.append(x.detach().clone())
        return x.flatten(1) + 0.01 * torch.arange(x[0].numel(), dtype=x.dtype)

    monkeypatch.setattr(module, "make_views", lambda kind: ViewPair(lambda x, g: x))  # identity views
    loss, logs = GLOBAL_PRETRAIN.loss(ctx, _micle(), None, net, torch.Generator().manual_seed(0))(pairs)
    torch.testing.assert_close(seen[0], torch.cat([pairs["image_a"], pairs["image_b"]]))  # B pairs, one view each
    assert logs == {"batch_images": 8} and math.isfinite(float(loss))

    monkeypatch.undo()  # the stage's real (medical) views
    GLOBAL_PRETRAIN.loss(ctx, _micle(), None, net, torch.Generator().manual_seed(0))(pairs)
    one = 1  # the one-slice patient's row: the same slice, two independent views
    assert torch.equal(pairs["image_a"][one], pairs["image_b"][one])
    assert not torch.equal(seen[1][one], seen[1][4 + one])


def test_bag_positives_fail_early_without_bags_or_a_full_batch_of_patients(data, tmp_path):
    patients = len(_bag_images(data))
    with pytest.raises(ValueError, match=rf"positives='micle': batch_size_per_worker={patients + 1} counts patients"
                                         rf".* has {patients} patients; set batch_size_per_worker <= {patients}"):
        GLOBAL_PRETRAIN.datasets(_micle(batch_size_per_worker=patients + 1), str(data))
    from medcl.train.stages.global_pretrain import check_bag_batches

    with pytest.raises(ValueError, match=rf"{patients} patients, {patients // 2} per worker on 2 workers; set "
                                         rf"batch_size_per_worker <= {patients // 2} or use fewer workers"):
        check_bag_batches(_micle(batch_size_per_worker=patients // 2 + 1), str(data), world_size=2)
    check_bag_batches(_micle(batch_size_per_worker=patients // 2), str(data), world_size=2)
    bare = tmp_path / "no-bags"
    shutil.copytree(data, bare)
    (bare / "bags.parquet").unlink()
    with pytest.raises(ValueError, match=r"positives='micle' samples slices from patient bags, but "
                                         r".*no-bags/bags.parquet does not exist; re-run the ingest"):
        GLOBAL_PRETRAIN.datasets(_micle(batch_size_per_worker=2), str(bare))
    assert GLOBAL_PRETRAIN.datasets(GlobalPretrainConfig(batch_size_per_worker=2), str(bare))  # simclr needs no bags


# ----------------------------------------------------------------------------- through Ray Data
@pytest.mark.ray
def test_micle_stream_pairs_two_different_slices_of_one_training_patient(data, bag_streams):
    from medcl.train.batches import epoch_batches

    cfg = _micle(batch_size_per_worker=3)
    ctx = _context(bag_streams)
    bags = _bag_images(data)
    per_pass = len(bags) // 3
    batches = list(epoch_batches(ctx, cfg, 0, steps=per_pass, epochs=1,
                                 pass_collate=lambda p: GLOBAL_PRETRAIN.collate(ctx, cfg, p)))
    assert len(batches) == per_pass
    ids = [pid for batch in batches for pid in batch["patient_id"]]  # one pass: every patient at most once
    assert len(ids) == len(set(ids)) == 3 * per_pass and set(ids) <= set(bags)
    for batch in batches:
        for row, pid in enumerate(batch["patient_id"]):
            a, b = int(batch["index_a"][row]), int(batch["index_b"][row])
            assert a != b  # 4 slices a patient: always two different ones
            np.testing.assert_array_equal(batch["image_a"][row].numpy(), bags[pid][a])
            np.testing.assert_array_equal(batch["image_b"][row].numpy(), bags[pid][b])


@pytest.mark.ray
def test_short_micle_run_counts_patients_cycles_and_caps_its_epochs(data, bag_streams, tmp_path):
    from medcl.train.driver import run_loop, stage_inputs

    patients = len(_bag_images(data))
    cfg = _micle(batch_size_per_worker=3, max_epochs=2, lr=1e-3)
    streams = bag_streams
    assert stage_inputs(cfg, str(data), streams, 1).steps_per_epoch == patients // 3  # an epoch: one pass of patients
    # min 3 steps: whole passes of patients // 3 steps (cycled, new pairs each pass), then the cap of 3
    cfg = _micle(batch_size_per_worker=3, max_epochs=2, lr=1e-3, min_steps_per_epoch=3, max_steps_per_epoch=3)
    inputs = stage_inputs(cfg, str(data), streams, 1)
    assert inputs.steps_per_epoch == 3 and patients // 3 < 3
    ctx = _context(streams, keep=tmp_path)
    run_loop(ctx, cfg, inputs)
    assert [r["train/steps"] for r in ctx.reports] == [3.0, 3.0]
    losses = [r["train/loss"] for r in ctx.reports]
    assert all(0.0 < v < math.log(2 * 3 - 1) + 1.0 for v in losses), losses  # NT-Xent of 3 pairs: log 5 at chance
    assert all(r["train/images_per_s"] > 0 for r in ctx.reports)
    state = torch.load(ctx.checkpoints[-1] / "model.pt", weights_only=True)
    assert {k.split(".", 1)[0] for k in state} == {"encoder", "global_head"}


def test_hippocampus_ingest_gives_micle_a_bag_of_slices_per_volume(shared_data, tmp_path):
    """Real Task04_Hippocampus cases: one bag per volume holding all its slices; pairs are two of them."""
    import pyarrow.parquet as pq

    from medcl.data.ingest import ingest

    hippo = shared_data / "Task04_Hippocampus"
    if not (hippo / "dataset.json").is_file():
        pytest.skip(f"{hippo} not found")
    cases = ["hippocampus_001", "hippocampus_003", "hippocampus_004", "hippocampus_006"]
    from msd_subset import copy_msd_subset

    root = copy_msd_subset(hippo, tmp_path / "Task04_subset", cases)
    manifest = ingest("msd", root, tmp_path / "hippo", {"size": 32})
    rows = pq.read_table(tmp_path / "hippo" / "bags.parquet").to_pylist()
    assert sorted(r["patient_id"] for r in rows) == cases
    for r in rows:  # a patient is one volume, its bag every slice of it
        assert set(r["volume_ids"]) == {r["patient_id"]} and r["num_images"] == len(r["slice_positions"]) > 20
    train = [r for r in rows if r["split"] == "train"]
    cfg = _micle(batch_size_per_worker=len(train))
    assert manifest.splits["train"]["patients"] == len(train) >= 2
    assert GLOBAL_PRETRAIN.datasets(cfg, str(tmp_path / "hippo"))["train"].fn == "patient_bags"
    batch = {"patient_id": np.asarray([r["patient_id"] for r in train], dtype=object),
             "images": np.asarray([np.asarray(r["images"], np.float32) for r in train], dtype=object),
             "image_shape": np.asarray([r["image_shape"] for r in train]),
             "num_images": np.asarray([r["num_images"] for r in train])}
    out = GLOBAL_PRETRAIN.collate(_context(), cfg, 0)(batch)
    for row, r in enumerate(train):
        a, b = int(out["index_a"][row]), int(out["index_b"][row])
        images = np.asarray(r["images"], np.float32).reshape(-1, *r["image_shape"])
        assert a != b and r["slice_positions"][a] != r["slice_positions"][b]
        np.testing.assert_array_equal(out["image_a"][row].numpy(), images[a])
        np.testing.assert_array_equal(out["image_b"][row].numpy(), images[b])
