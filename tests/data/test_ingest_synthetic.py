"""Synthetic cohort: determinism, structure, the lesion signal and the shifted site."""
from __future__ import annotations

import numpy as np
import pyarrow.compute as pc
import pytest
from scipy.ndimage import gaussian_filter

from medcl.data.decode import decode_images, decode_masks, read_bags_table, read_shards_table
from medcl.data.ingest import ingest
from medcl.data.sources.common import IngestError
from medcl.data.sources.synthetic import generate_synthetic

SMALL = {"num_patients": 12, "images_per_patient": 8, "size": 32}


def test_same_seed_same_bytes_different_seed_differs():
    a, b = generate_synthetic(**SMALL, seed=3), generate_synthetic(**SMALL, seed=3)
    for key in a:
        assert a[key].tobytes() == b[key].tobytes(), key
    c = generate_synthetic(**SMALL, seed=4)
    assert a["images"].tobytes() != c["images"].tobytes() and a["masks"].tobytes() != c["masks"].tobytes()


def test_ingest_is_byte_identical_across_runs(tmp_path):
    m1 = ingest("synthetic", None, tmp_path / "one", {**SMALL, "seed": 1})
    m2 = ingest("synthetic", None, tmp_path / "two", {**SMALL, "seed": 1})
    assert [s.sha256 for s in m1.shards] == [s.sha256 for s in m2.shards] and m1.bags.sha256 == m2.bags.sha256


def test_layout_labels_and_positions():
    d = generate_synthetic(**SMALL, num_classes=4, seed=0)
    n = 12 * 8
    assert d["images"].shape == (n, 1, 32, 32) and d["images"].dtype == np.float32
    assert d["masks"].shape == (n, 32, 32) and set(np.unique(d["masks"])) == {0, 1, 2, 3}
    assert 0 <= d["images"].min() and d["images"].max() <= 1
    np.testing.assert_allclose(d["slice_position"], np.tile(np.arange(8) / 8, 12))
    labels = d["class_label"].reshape(12, 8)
    assert (labels == labels[:, :1]).all() and labels[:, 0].sum() == 6  # patient-level, half positive
    lesion = d["lesion"].reshape(12, 8)
    assert not lesion[labels[:, 0] == 0].any() and lesion[labels[:, 0] == 1].mean() > 0.5
    # structure A (class 2) sits early in the volume, B (class 3) late: partitions differ
    counts = np.stack([(d["masks"] == k).reshape(12, 8, -1).sum(-1) for k in (2, 3)])  # (2, P, S)
    assert counts[0, :, :2].sum() > 3 * counts[0, :, -2:].sum()
    assert counts[1, :, -2:].sum() > 3 * counts[1, :, :2].sum()
    assert set(np.unique(generate_synthetic(**SMALL, num_classes=2)["masks"])) == {0, 1}


def test_lesion_is_visible_inside_the_organ():
    d = generate_synthetic(num_patients=40, images_per_patient=8, size=64, seed=2)
    organ = d["masks"] > 0
    # A matched filter (Gaussian blur ~ lesion size), then the brightest organ pixel per image.
    peak = np.array([gaussian_filter(img[0], 2.0)[m].max() for img, m in zip(d["images"], organ)])
    assert peak[d["lesion"]].mean() > peak[~d["lesion"]].mean() + 0.05


def test_shifted_site_is_test_only_and_differs(tmp_path):
    out = tmp_path / "shift"
    m = ingest("synthetic", None, out, {"num_patients": 20, "images_per_patient": 4, "size": 32,
                                        "shifted_patients": 6, "seed": 0})
    assert m.sites == {"A": {"patients": 20, "images": 80}, "B": {"patients": 6, "images": 24}}
    assert m.splits["test"] == {"patients": 4 + 6, "images": 40}
    assert m.task == "segmentation" and m.class_names == ("normal", "lesion") and m.num_classes == 3
    bags = read_bags_table(out, columns=["patient_id", "split", "site", "class_label"]).to_pylist()
    assert all(b["split"] == "test" for b in bags if b["site"] == "B")
    assert all(b["patient_id"].startswith(b["site"]) for b in bags)
    t = read_shards_table(out, filter=pc.field("split") == "test")
    site = np.asarray(t["site"].to_pylist())
    x = decode_images(t)
    a, b = x[site == "A"], x[site == "B"]
    assert abs(a.mean() - b.mean()) > 0.1  # gamma + offset brighten site B
    masks = decode_masks(t)
    organ_contrast = [im[0][mk > 0].mean() - im[0][mk == 0].mean() for im, mk in zip(x, masks)]
    assert np.mean(np.array(organ_contrast)[site == "B"]) < np.mean(np.array(organ_contrast)[site == "A"])


def test_bad_synthetic_options(tmp_path):
    for opts, name in (({"num_classes": 5}, "num_classes"), ({"lesion_rate": 1.5}, "lesion_rate"),
                       ({"num_patients": 0}, "num_patients"), ({"split_ratios": [1, 1, 1]}, "split_ratios")):
        with pytest.raises(IngestError, match=name):
            ingest("synthetic", None, tmp_path / "x", opts)
    with pytest.raises(IngestError, match="no source path"):
        ingest("synthetic", tmp_path, tmp_path / "x", {})
    assert list(tmp_path.iterdir()) == []
