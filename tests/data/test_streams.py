"""Tests of medcl.data.streams (and its batches through medcl.data.collate) on a tiny dataset, checked against a
direct pyarrow read."""
from __future__ import annotations

import uuid

import numpy as np
import pyarrow.parquet as pq
import pytest

from medcl.data import streams
from medcl.data.augment import JointTransform, make_views
from medcl.data.collate import MiclePairCollate, PartitionCollate, torch_batches
from medcl.data.image_block import ImageBlock
from medcl.data.shards import write_dataset
from medcl.data.splits import labelled_patients

pytestmark = [pytest.mark.ray, pytest.mark.timeout(180)]

HW = 8
SPLITS = ["train", "train", "train", "train", "val", "test", "test"]
SITES = ["A", "A", "A", "A", "A", "A", "B"]
NO_MASK = {"p3"}  # a training patient without masks (never labelled)


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    """7 patients, one volume each of 3-6 slices of 1x8x8, several shards of <= 10 rows."""
    rng = np.random.default_rng(0)
    blocks = []
    for p, (split, site) in enumerate(zip(SPLITS, SITES)):
        n = 3 + p % 4
        masks = None if f"p{p}" in NO_MASK else rng.integers(-1, 3, (n, HW, HW))
        blocks.append(ImageBlock(
            images=rng.random((n, 1, HW, HW), dtype=np.float32), patient_id=f"p{p}", volume_id=f"p{p}-v0",
            split=split, source_path=f"p{p}.nii", site=site, slice_index=list(range(n)),
            slice_position=[k / n for k in range(n)], masks=masks, class_label=p % 2))
    out = tmp_path_factory.mktemp("rd") / "ds"
    write_dataset(out, blocks, source={"kind": "test", "path": "", "options": {}}, task="segmentation",
                  fingerprint="test-ray-datasets", label_map={0: "bg", 1: "a", 2: "b"}, rows_per_shard=10)
    return out


@pytest.fixture(scope="module")
def reference(dataset_dir):
    """Every shard row decoded by hand from a plain pyarrow read: {(patient, slice_index): row}."""
    paths = sorted(dataset_dir.glob("shard-*.parquet"))
    assert len(paths) >= 3
    rows = {}
    for row in pq.read_table(paths).to_pylist():
        c, h, w = row["image_shape"]
        rows[(row["patient_id"], row["slice_index"])] = {
            **row,
            "image": np.asarray(row["image"], np.float32).reshape(c, h, w),
            "mask": None if row["mask"] is None else np.asarray(row["mask"], np.int64).reshape(h, w),
        }
    return rows


@pytest.fixture(scope="module")
def train_ds(ray_session, dataset_dir):
    """The materialised training-image stream, shared by the tests that only read it."""
    return streams.train_images(dataset_dir)


@pytest.fixture(scope="module")
def bags_ds(ray_session, dataset_dir):
    return streams.patient_bags(dataset_dir)


def _rows(ds) -> dict[tuple[str, int], dict]:
    out = {}
    for batch in ds.iter_batches(batch_size=7, batch_format="numpy"):
        for i in range(len(batch["patient_id"])):
            out[(str(batch["patient_id"][i]), int(batch["slice_index"][i]))] = {k: v[i] for k, v in batch.items()}
    return out


def test_train_images_rows_and_decoding(train_ds, reference):
    got = _rows(train_ds)
    expected = {k for k, r in reference.items() if r["split"] == "train"}
    assert set(got) == expected and len(got) == 4 + 5 + 6 + 3
    for key, row in got.items():
        ref = reference[key]
        assert row["image"].dtype == np.float32 and row["image"].shape == (1, HW, HW)
        np.testing.assert_array_equal(row["image"], ref["image"])
        assert row["class_label"] == ref["class_label"] and row["slice_position"] == np.float32(ref["slice_position"])
        assert row["volume_id"] == ref["volume_id"] and row["site"] == ref["site"]
        assert "mask" not in row


def test_labelled_slices_only_labelled_training_patients(ray_session, reference, dataset_dir):
    labelled = set(labelled_patients(dataset_dir, 0.75, seed=1))
    assert len(labelled) == 3
    got = _rows(streams.labelled_slices(dataset_dir, 0.75, seed=1))
    expected = {k for k, r in reference.items()
                if r["split"] == "train" and r["patient_id"] in labelled and r["mask"] is not None}
    assert set(got) == expected and expected
    assert {p for p, _ in got} <= {f"p{i}" for i in range(4)} - NO_MASK  # no val/test patient, none unmasked
    for key, row in got.items():
        assert row["mask"].dtype == np.int64
        np.testing.assert_array_equal(row["mask"], reference[key]["mask"])
        np.testing.assert_array_equal(row["image"], reference[key]["image"])


def test_labelled_slices_with_joint_augment(ray_session, reference, dataset_dir):
    # materialize=False: read, decode and augment in one streaming execution.
    ds = streams.labelled_slices(dataset_dir, 1.0, seed=0, augment=JointTransform(degrees=30.0), materialize=False)
    n = 0
    for batch in torch_batches(ds, batch_size=5, device="cpu"):
        assert batch["image"].shape[1:] == (1, HW, HW) and batch["mask"].shape[1:] == (HW, HW)
        assert set(batch["mask"].unique().tolist()) <= {-1, 0, 1, 2}
        assert batch["patient_id"].dtype == object
        n += len(batch["patient_id"])
    assert n == sum(1 for r in reference.values() if r["split"] == "train" and r["mask"] is not None)


def test_labelled_images_for_classification(ray_session, reference, dataset_dir):
    """Classification fine-tuning: every labelled training image with a class label, masks or not."""
    got = _rows(streams.labelled_images(dataset_dir, 1.0, seed=0))
    assert set(got) == {k for k, r in reference.items() if r["split"] == "train"}
    assert any(p in NO_MASK for p, _ in got)
    for key, row in got.items():
        assert row["class_label"] == reference[key]["class_label"] and "mask" not in row


def test_partially_labelled_slices_hide_the_unlabelled_patients_masks(ray_session, reference, dataset_dir):
    """Local pretraining with loss "both": every training slice, masks kept only for the labelled patients."""
    labelled = set(labelled_patients(dataset_dir, 0.5, seed=2))
    assert len(labelled) == 2
    got = _rows(streams.partially_labelled_slices(dataset_dir, 0.5, seed=2))
    assert set(got) == {k for k, r in reference.items() if r["split"] == "train"}
    hidden_with_mask = 0
    for key, row in got.items():
        ref = reference[key]
        np.testing.assert_array_equal(row["image"], ref["image"])
        if key[0] in labelled and ref["mask"] is not None:
            np.testing.assert_array_equal(row["mask"], ref["mask"])
        else:
            assert row["mask"].shape == (HW, HW) and (row["mask"] == -1).all()
            hidden_with_mask += ref["mask"] is not None
    assert hidden_with_mask > 0  # some unlabelled patient's real mask was hidden


def test_has_shifted_site(dataset_dir):
    assert streams.has_shifted_site(dataset_dir)
    assert not streams.has_shifted_site(dataset_dir, split="val")
    assert not streams.has_shifted_site(dataset_dir, site="C")


def test_eval_slices_site_filter_and_volume_order(ray_session, reference, dataset_dir):
    got = _rows(streams.eval_slices(dataset_dir, "test", site="B"))
    assert set(got) == {k for k, r in reference.items() if r["split"] == "test" and r["site"] == "B"}
    assert {p for p, _ in got} == {"p6"}
    volume = np.stack([got[("p6", k)]["mask"] for k in range(len(got))])  # 3D stack for 3D Dice
    np.testing.assert_array_equal(volume, np.stack([reference[("p6", k)]["mask"] for k in range(len(got))]))


def test_patient_bags_micle_and_partitions(bags_ds, reference):
    bags = bags_ds
    assert bags.count() == 4
    seen = []
    for batch in torch_batches(bags, batch_size=3, collate_fn=MiclePairCollate(seed=0)):
        for i, pid in enumerate(batch["patient_id"]):
            seen.append(pid)
            a, b = int(batch["index_a"][i]), int(batch["index_b"][i])
            assert a != b  # every training bag has >= 3 images
            np.testing.assert_array_equal(batch["image_a"][i].numpy(), reference[(pid, a)]["image"])
            np.testing.assert_array_equal(batch["image_b"][i].numpy(), reference[(pid, b)]["image"])
    assert sorted(seen) == ["p0", "p1", "p2", "p3"]
    for batch in torch_batches(bags, batch_size=4, collate_fn=PartitionCollate(num_partitions=2, seed=0)):
        assert batch["group_id"].tolist() == [0, 1] * 4
        assert ((batch["slice_position"] * 2).floor().long() == batch["group_id"]).all()


def test_train_images_with_views(ray_session, dataset_dir):
    ds = streams.train_images(dataset_dir, augment=make_views("intensity"), materialize=False)
    batch = next(iter(torch_batches(ds, batch_size=4, device="cpu")))
    assert "image" not in batch and batch["image_a"].shape == batch["image_b"].shape == (4, 1, HW, HW)
    assert not np.allclose(batch["image_a"].numpy(), batch["image_b"].numpy())


def test_validation_errors(tmp_path, dataset_dir):
    with pytest.raises(ValueError, match="holds no shard-"):
        streams.shard_paths(tmp_path)
    with pytest.raises(ValueError, match="is not a directory"):
        streams.shard_paths(tmp_path / "missing")
    with pytest.raises(ValueError, match=r"split must be one of \('train', 'val', 'test'\), got 'tran'"):
        streams.train_images(dataset_dir, split="tran")
    with pytest.raises(ValueError, match=r"target must be one of .*got 'masks'"):
        streams.labelled_slices(dataset_dir, 0.5, 0, target="masks")
    with pytest.raises(ValueError, match="fraction"):
        streams.labelled_slices(dataset_dir, 0.0, 0)


def test_torch_trainer_two_workers_see_every_row_once(train_ds, bags_ds, tmp_path, reference):
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    def count_rows_per_worker(config):  # nested: cloudpickle ships it by value to the workers
        import ray.train
        import torch.distributed as dist

        from medcl.data.collate import MiclePairCollate, torch_batches

        rows = sum(len(b["patient_id"]) for b in torch_batches(ray.train.get_dataset_shard("train"), batch_size=4))
        bags = sum(len(b["patient_id"]) for b in torch_batches(ray.train.get_dataset_shard("bags"), batch_size=2,
                                                              collate_fn=MiclePairCollate(seed=0, device="auto")))
        counts = [None] * dist.get_world_size()
        dist.all_gather_object(counts, (rows, bags))
        return counts

    trainer = TorchTrainer(
        count_rows_per_worker,
        datasets={"train": train_ds, "bags": bags_ds},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        run_config=RunConfig(storage_path=str(tmp_path), name=f"rd-{uuid.uuid4().hex[:8]}",
                             failure_config=FailureConfig(controller_failure_limit=1)),
    )
    counts = trainer.fit().return_value
    assert len(counts) == 2
    assert all(rows > 0 and bags > 0 for rows, bags in counts)
    assert sum(rows for rows, _ in counts) == sum(1 for r in reference.values() if r["split"] == "train")
    assert sum(bags for _, bags in counts) == 4


def test_streams_keep_one_row_order_on_every_build(ray_session, dataset_dir):
    # Several shards are read in parallel; without a kept order the blocks arrive as reads finish,
    # and the seeded local shuffle of training would give other batches on every run. Training
    # streams hold a seeded permutation of the rows (not the shards' patient-by-patient order),
    # evaluation streams the shards' order.
    paths = sorted(dataset_dir.glob("shard-*.parquet"))
    table = pq.read_table(paths).to_pylist()
    shard_order = {split: [(r["patient_id"], r["slice_index"]) for r in table if r["split"] == split]
                   for split in ("train", "test")}

    def order(ds):
        rows = ds.select_columns(["patient_id", "slice_index"]).take_all()
        return [(r["patient_id"], r["slice_index"]) for r in rows]

    train = [order(streams.train_images(dataset_dir)) for _ in range(4)]
    assert all(rows == train[0] for rows in train)
    assert sorted(train[0]) == sorted(shard_order["train"]) and train[0] != shard_order["train"]
    assert order(streams.eval_slices(dataset_dir, "test")) == shard_order["test"]
