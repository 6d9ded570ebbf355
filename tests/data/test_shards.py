"""Shard writing/reading: round trip, bags, checksums, no-op re-run, atomic replacement."""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from medcl.data import shards as shards_module
from medcl.data.decode import decode_images, decode_masks, read_bags_table, read_shards_table
from medcl.data.image_block import ImageBlock
from medcl.data.manifest import Manifest, ManifestError, read_manifest, verify_checksums
from medcl.data.schema import SHARD_SCHEMA
from medcl.data.shards import write_dataset

RNG = np.random.default_rng(123)
# Three patients: p0 a 3-slice volume with masks, p1 two views without masks, p2 one multi-label image.
P0_IMG = RNG.random((3, 2, 5, 4), dtype=np.float32)
P0_MASK = RNG.integers(-1, 3, size=(3, 5, 4))
P1_IMG = RNG.random((2, 2, 5, 4), dtype=np.float32)
P2_IMG = RNG.random((1, 2, 5, 4), dtype=np.float32)


def _blocks():
    # p0's slices arrive out of order to check that bags sort them by slice_index.
    yield ImageBlock(images=P0_IMG[[2, 0, 1]], masks=P0_MASK[[2, 0, 1]], patient_id="p0", volume_id="p0",
                     split="train", source_path="p0.nii", slice_index=[2, 0, 1], slice_position=[2 / 3, 0, 1 / 3],
                     class_label=[1, 1, 0])
    yield ImageBlock(images=P1_IMG, patient_id="p1", volume_id=["p1/a", "p1/b"], split="val", source_path=["a", "b"],
                     view=["PA", None], site="B", slice_index=[0, 1], class_label=[-1, 2])
    yield ImageBlock(images=P2_IMG, patient_id="p2", volume_id="p2", split="test", source_path="c",
                     class_labels=np.array([[1, 0, 1]]))


def _write(out, fingerprint="f1", blocks=None, **kw):
    return write_dataset(out, _blocks() if blocks is None else blocks,
                         source={"kind": "test", "path": None, "options": {}}, task="segmentation",
                         fingerprint=fingerprint, label_map={0: "bg", 1: "a", 2: "b"}, class_names=["x", "y", "z"],
                         normalisation="none", rows_per_shard=2, **kw)


@pytest.fixture()
def dataset(tmp_path):
    out = tmp_path / "ds"
    _write(out)
    return out


def _sorted_rows(out):
    t = read_shards_table(out)
    return t.take(pc.sort_indices(t, [("patient_id", "ascending"), ("volume_id", "ascending"),
                                      ("slice_index", "ascending")]))


def test_round_trip_images_masks_labels(dataset):
    t = _sorted_rows(dataset)
    np.testing.assert_array_equal(decode_images(t), np.concatenate([P0_IMG, P1_IMG, P2_IMG]))
    masks = decode_masks(t)
    assert masks.dtype == np.int64 and masks.shape == (6, 5, 4)
    np.testing.assert_array_equal(masks[:3], P0_MASK)
    assert (masks[3:] == -1).all()  # rows without a mask decode to "ignore"
    assert t["mask"].null_count == 3
    # p0 rows arrived as slices 2, 0, 1 with labels 1, 1, 0; sorted by slice: 1, 0, 1.
    assert t["class_label"].to_pylist() == [1, 0, 1, None, 2, None]
    assert t["class_labels"].to_pylist()[-1] == [1, 0, 1]
    assert t["image_shape"].to_pylist() == [[2, 5, 4]] * 6
    assert t["view"].to_pylist() == [None, None, None, "PA", None, None]
    assert t["site"].to_pylist() == ["A"] * 3 + ["B"] * 2 + ["A"]
    assert t["split"].to_pylist() == ["train"] * 3 + ["val"] * 2 + ["test"]
    np.testing.assert_allclose(t["slice_position"].to_numpy()[:3], [0, 1 / 3, 2 / 3], rtol=1e-6)


def test_decode_numpy_batches_like_ray(dataset):
    t = _sorted_rows(dataset)
    batch = {"image": np.array([np.asarray(r, np.float32) for r in t["image"].to_pylist()], dtype=object),
             "image_shape": np.array([[2, 5, 4]] * 6),
             "mask": np.array([None if r is None else np.asarray(r) for r in t["mask"].to_pylist()], dtype=object)}
    np.testing.assert_array_equal(decode_images(batch), decode_images(t))
    np.testing.assert_array_equal(decode_masks(batch), decode_masks(t))
    np.testing.assert_array_equal(decode_images(t.to_pandas()), decode_images(t))
    dense = {"image": np.stack(list(batch["image"])), "image_shape": batch["image_shape"]}  # (N, C*H*W) form
    np.testing.assert_array_equal(decode_images(dense), decode_images(t))
    with pytest.raises(ValueError, match="no column 'mask'"):
        decode_masks(dense)


def test_filter_and_columns(dataset):
    t = read_shards_table(dataset, columns=["patient_id", "split"], filter=[("split", "=", "val")])
    assert t.column_names == ["patient_id", "split"] and t["patient_id"].to_pylist() == ["p1", "p1"]
    t = read_shards_table(dataset, columns=["patient_id"], filter=pc.field("site") == "B")
    assert t.num_rows == 2


def test_bags_group_each_patient(dataset):
    bags = read_bags_table(dataset).to_pylist()
    by_id = {b["patient_id"]: b for b in bags}
    assert sorted(by_id) == ["p0", "p1", "p2"]
    p0 = by_id["p0"]
    assert p0["num_images"] == 3 and p0["split"] == "train" and p0["site"] == "A"
    np.testing.assert_array_equal(np.asarray(p0["images"], np.float32).reshape(3, 2, 5, 4), P0_IMG)
    np.testing.assert_allclose(p0["slice_positions"], [0, 1 / 3, 2 / 3], rtol=1e-6)
    assert p0["class_label"] == 1  # most frequent of 1, 1, 0
    p1 = by_id["p1"]
    assert p1["volume_ids"] == ["p1/a", "p1/b"] and p1["site"] == "B" and p1["class_label"] == 2
    np.testing.assert_array_equal(np.asarray(p1["images"], np.float32).reshape(2, 2, 5, 4), P1_IMG)
    assert by_id["p2"]["class_labels"] == [1, 0, 1] and by_id["p2"]["class_label"] is None


def test_manifest_fields(dataset):
    m = read_manifest(dataset)
    assert (m.num_patients, m.num_volumes, m.num_images) == (3, 4, 6)
    assert m.splits == {"train": {"patients": 1, "images": 3}, "val": {"patients": 1, "images": 2},
                        "test": {"patients": 1, "images": 1}}
    assert m.sites == {"A": {"patients": 2, "images": 4}, "B": {"patients": 1, "images": 2}}
    assert m.image_shape == (2, 5, 4) and m.label_map == {0: "bg", 1: "a", 2: "b"} and m.num_classes == 3
    assert [s.file for s in m.shards] == ["shard-00000.parquet", "shard-00001.parquet", "shard-00002.parquet"]
    assert [s.num_rows for s in m.shards] == [2, 2, 2]
    assert Manifest.from_dict(json.loads(json.dumps(m.to_dict()))) == m
    assert sorted(os.listdir(dataset)) == ["bags.parquet", "manifest.json", "shard-00000.parquet",
                                           "shard-00001.parquet", "shard-00002.parquet"]


def test_checksums_match_file_bytes(dataset):
    m = read_manifest(dataset)
    for info in (*m.shards, m.bags):
        assert info.sha256 == hashlib.sha256((dataset / info.file).read_bytes()).hexdigest()
    verify_checksums(dataset)
    shard = dataset / m.shards[1].file
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match="shard-00001.parquet"):
        verify_checksums(dataset)


def test_rerun_with_same_fingerprint_is_noop(dataset, caplog):
    before = {p.name: p.stat().st_mtime_ns for p in dataset.iterdir()}

    def fail():
        raise AssertionError("blocks must not be consumed when up to date")
        yield

    with caplog.at_level("INFO"):
        m = _write(dataset, blocks=fail())
    assert "up to date" in caplog.text
    assert {p.name: p.stat().st_mtime_ns for p in dataset.iterdir()} == before
    assert m.fingerprint == "f1"
    _write(dataset, fingerprint="f2")  # a different source fingerprint rewrites
    assert read_manifest(dataset).fingerprint == "f2"


def test_rerun_after_tampering_rewrites(dataset):
    (dataset / "bags.parquet").write_bytes(b"garbage")
    _write(dataset)
    verify_checksums(dataset)


def _leftovers(parent):
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_interrupted_write_keeps_old_dataset(dataset, monkeypatch):
    old = {p.name: p.read_bytes() for p in dataset.iterdir()}
    calls = {"n": 0}
    real = shards_module.pq.write_table

    def crash_on_second(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(shards_module.pq, "write_table", crash_on_second)
    with pytest.raises(OSError, match="simulated"):
        _write(dataset, fingerprint="f2")
    assert calls["n"] >= 2  # the crash came after the first shard was written
    assert {p.name: p.read_bytes() for p in dataset.iterdir()} == old
    assert read_manifest(dataset).fingerprint == "f1"
    assert _leftovers(dataset.parent) == []


def test_error_while_producing_blocks_leaves_nothing(tmp_path):
    def broken():
        yield from list(_blocks())[:1]
        raise ValueError("corrupt source (simulated)")

    with pytest.raises(ValueError, match="simulated"):
        _write(tmp_path / "new", blocks=broken())
    assert list(tmp_path.iterdir()) == []


def test_swap_interrupted_between_renames_is_recovered(dataset):
    backup = dataset.parent / ".ds.old-abc"
    backup.mkdir()
    os.replace(dataset, backup / "data")  # the state after "old -> backup", before "new -> place"
    m = _write(dataset)  # same fingerprint: the restored dataset is up to date
    assert m.fingerprint == "f1" and verify_checksums(dataset)
    assert _leftovers(dataset.parent) == []


def test_refuses_to_replace_a_foreign_directory(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(ValueError, match="refusing to replace"):
        _write(tmp_path / "mine")
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"


def test_empty_and_mixed_shapes_rejected(tmp_path):
    with pytest.raises(ValueError, match="empty source"):
        _write(tmp_path / "a", blocks=iter([]))
    mixed = [next(_blocks()), ImageBlock(images=np.zeros((1, 1, 5, 4), np.float32), patient_id="q",
                                         volume_id="q", split="train", source_path="q.png")]
    with pytest.raises(ValueError, match="q.png"):
        _write(tmp_path / "b", blocks=iter(mixed))
    with pytest.raises(ValueError, match="NaN"):
        ImageBlock(images=np.full((1, 1, 2, 2), np.nan, np.float32), patient_id="q", volume_id="q", split="train",
                   source_path="q")
    with pytest.raises(ValueError, match="split"):
        ImageBlock(images=np.zeros((1, 1, 2, 2), np.float32), patient_id="q", volume_id="q", split="training",
                   source_path="q")
    assert _leftovers(tmp_path) == []


def test_patient_in_two_splits_rejected(tmp_path):
    rows = [ImageBlock(images=np.zeros((1, 1, 2, 2), np.float32), patient_id="p", volume_id="p", split=s,
                       source_path=s) for s in ("train", "test")]
    with pytest.raises(ValueError, match="patient 'p'"):
        _write(tmp_path / "x", blocks=iter(rows))


def test_read_manifest_errors_name_the_file(tmp_path, dataset):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nothing" / "manifest.json")):
        read_manifest(tmp_path / "nothing")
    (dataset / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="manifest.json"):
        read_manifest(dataset)
    (dataset / "manifest.json").write_text(json.dumps({"format_version": 1}))
    with pytest.raises(ManifestError, match="lacks field"):
        read_manifest(dataset)


def test_image_block_record_batch_matches_schema():
    batch = next(_blocks()).to_record_batch()
    assert batch.schema == SHARD_SCHEMA
    assert batch.num_rows == 3 and isinstance(batch.column(batch.schema.get_field_index("image")), pa.ListArray)
