"""MedMNIST ingest: the real PneumoniaMNIST file and small ChestMNIST/RGB-layout files."""
from __future__ import annotations

import numpy as np
import pyarrow.compute as pc
import pytest
from PIL import Image

from medcl.data.decode import decode_images, read_bags_table, read_shards_table
from medcl.data.ingest import ingest


@pytest.fixture(scope="module")
def pneumonia(shared_data, tmp_path_factory):
    npz = shared_data / "pneumoniamnist" / "pneumoniamnist.npz"
    if not npz.is_file():
        pytest.skip(f"{npz} not found")
    out = tmp_path_factory.mktemp("pn") / "pneumonia"
    return npz, out, ingest("medmnist", npz, out, {"class_names": ["normal", "pneumonia"]})


def test_counts_per_split_equal_npz(pneumonia):
    npz, out, m = pneumonia
    z = np.load(npz)
    for split in ("train", "val", "test"):
        n = len(z[f"{split}_images"])
        assert m.splits[split] == {"patients": n, "images": n}
    assert m.num_images == m.num_patients == sum(len(z[f"{s}_labels"]) for s in ("train", "val", "test"))
    assert m.task == "multiclass" and m.class_names == ("normal", "pneumonia")
    assert m.image_shape == (1, 28, 28) and m.split_method == "source"


def test_images_and_labels_match_npz(pneumonia):
    npz, out, _ = pneumonia
    z = np.load(npz)
    t = read_shards_table(out, filter=pc.field("split") == "val")
    t = t.take(pc.sort_indices(t, [("patient_id", "ascending")]))
    assert t["patient_id"][12].as_py() == "val-00012"
    np.testing.assert_array_equal(decode_images(t), z["val_images"][:, None].astype(np.float32) / 255)
    assert t["class_label"].to_pylist() == z["val_labels"][:, 0].tolist()
    assert t["class_labels"].null_count == t.num_rows and t["mask"].null_count == t.num_rows
    bags = read_bags_table(out, columns=["patient_id", "num_images"], filter=pc.field("split") == "test")
    assert bags.num_rows == len(z["test_images"]) and set(bags["num_images"].to_pylist()) == {1}


def test_multilabel_rgb_and_resize(tmp_path):
    rng = np.random.default_rng(0)
    npz = tmp_path / "chest.npz"
    labels = {s: rng.integers(0, 2, size=(n, 3)).astype(np.uint8) for s, n in (("train", 6), ("val", 2), ("test", 3))}
    images = {s: rng.integers(0, 256, size=(len(v), 8, 8, 3)).astype(np.uint8) for s, v in labels.items()}
    np.savez(npz, **{f"{s}_images": images[s] for s in labels}, **{f"{s}_labels": labels[s] for s in labels})
    m = ingest("medmnist", npz, tmp_path / "out", {"size": 4, "class_names": ["a", "b", "c"]})
    assert m.task == "multilabel" and m.image_shape == (3, 4, 4) and m.num_images == 11
    t = read_shards_table(tmp_path / "out", filter=pc.field("split") == "train")
    t = t.take(pc.sort_indices(t, [("patient_id", "ascending")]))
    assert t["class_labels"].to_pylist() == labels["train"].tolist()
    assert t["class_label"].null_count == 6
    # Independent reference: PIL's antialiased bilinear ("triangle" filter) on float images.
    ref = np.array([[np.asarray(Image.fromarray(im[..., c].astype(np.float32) / 255, mode="F").resize(
        (4, 4), Image.BILINEAR)) for c in range(3)] for im in images["train"]])
    np.testing.assert_allclose(decode_images(t), ref, atol=1e-5)
