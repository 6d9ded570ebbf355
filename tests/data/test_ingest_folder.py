"""Image folder + CSV ingest: PNG/TIFF/JPEG, grey/RGB, masks, single- and multi-label, bags."""
from __future__ import annotations

import numpy as np
import pyarrow.compute as pc
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from skimage import io

from medcl.data.decode import decode_images, decode_masks, read_bags_table, read_shards_table
from medcl.data.ingest import ingest

RNG = np.random.default_rng(5)


@pytest.fixture()
def folder(tmp_path):
    """3 patients, 5 images (grey PNG, RGB PNG, 16-bit TIFF, JPEG), masks for 3 of them, a CSV."""
    (tmp_path / "img").mkdir()
    grey = RNG.integers(0, 256, (32, 24)).astype(np.uint8)
    rgb = RNG.integers(0, 256, (32, 24, 3)).astype(np.uint8)
    tif = RNG.integers(0, 65536, (32, 24)).astype(np.uint16)
    io.imsave(tmp_path / "img" / "a0.png", grey, check_contrast=False)
    io.imsave(tmp_path / "img" / "a1.png", rgb, check_contrast=False)
    io.imsave(tmp_path / "img" / "b0.tif", tif, check_contrast=False)
    Image.fromarray(rgb).save(tmp_path / "img" / "c0.jpg")
    io.imsave(tmp_path / "img" / "c1.png", grey[::-1].copy(), check_contrast=False)
    masks = {n: RNG.integers(0, 3, (32, 24)).astype(np.uint8) for n in ("a0", "a1", "b0")}
    for n, m in masks.items():
        io.imsave(tmp_path / "img" / f"{n}_mask.png", m, check_contrast=False)
    csv = tmp_path / "index.csv"
    csv.write_text(
        "path,patient,mask,finding,tags,view,slice,fold\n"
        "img/a0.png,pa,img/a0_mask.png,pneumonia,x|y,PA,1,train\n"
        "img/a1.png,pa,img/a1_mask.png,pneumonia,y,LAT,0,train\n"
        "img/b0.tif,pb,img/b0_mask.png,normal,,PA,0,test\n"
        "img/c0.jpg,pc,,,x,,0,val\n"
        "img/c1.png,pc,,normal,z|x,,1,val\n"
    )
    return {"csv": csv, "grey": grey, "rgb": rgb, "tif": tif, "masks": masks}


OPTS = {"image_column": "path", "patient_column": "patient", "size": 16}


def _rows(out):
    t = read_shards_table(out)
    return t.take(pc.sort_indices(t, [("source_path", "ascending")]))  # a0, a1, b0, c0, c1


def _ref_resize(x):  # independent reference: torch antialiased bilinear, 32x24 -> 16x16
    return F.interpolate(torch.from_numpy(x[None, None].astype(np.float32)), size=(16, 16), mode="bilinear",
                         antialias=True, align_corners=False)[0, 0].numpy()


def test_grey_masks_single_label(folder, tmp_path):
    out = tmp_path / "ds"
    m = ingest("folder", folder["csv"], out, {**OPTS, "mask_column": "mask", "label_column": "finding",
                                              "view_column": "view", "slice_column": "slice",
                                              "split_column": "fold"})
    assert m.task == "segmentation" and m.class_names == ("normal", "pneumonia")  # sorted names
    assert m.label_map == {0: "background", 1: "class_1", 2: "class_2"} and m.image_shape == (1, 16, 16)
    assert m.splits == {"train": {"patients": 1, "images": 2}, "val": {"patients": 1, "images": 2},
                        "test": {"patients": 1, "images": 1}}
    t = _rows(out)
    assert t["source_path"].to_pylist() == ["img/a0.png", "img/a1.png", "img/b0.tif", "img/c0.jpg", "img/c1.png"]
    assert t["class_label"].to_pylist() == [1, 1, 0, None, 0]
    assert t["view"].to_pylist() == ["PA", "LAT", "PA", None, None]
    assert t["slice_index"].to_pylist() == [1, 0, 0, 0, 1]
    np.testing.assert_allclose(t["slice_position"].to_pylist(), [0.5, 0, 0, 0, 0.5])
    images, masks = decode_images(t), decode_masks(t)
    np.testing.assert_allclose(images[0, 0], _ref_resize(folder["grey"] / 255), atol=1e-5)
    luma = folder["rgb"].astype(np.float64) / 255 @ np.array([0.2125, 0.7154, 0.0721])
    np.testing.assert_allclose(images[1, 0], _ref_resize(luma), atol=1e-5)
    np.testing.assert_allclose(images[2, 0], _ref_resize(folder["tif"] / 65535), atol=1e-5)
    for i, name in enumerate(("a0", "a1", "b0")):
        ref = F.interpolate(torch.from_numpy(folder["masks"][name][None, None].astype(np.float32)), size=(16, 16),
                            mode="nearest-exact")[0, 0].long().numpy()
        np.testing.assert_array_equal(masks[i], ref)
    assert (masks[3:] == -1).all()
    bags = {b["patient_id"]: b for b in read_bags_table(out).to_pylist()}
    assert {p: b["num_images"] for p, b in bags.items()} == {"pa": 2, "pb": 1, "pc": 2}
    assert bags["pa"]["volume_ids"] == ["pa", "pa"] and bags["pa"]["slice_positions"] == [0.0, 0.5]


def test_rgb_multilabel_and_random_split(folder, tmp_path):
    out = tmp_path / "rgb"
    m = ingest("folder", folder["csv"], out, {**OPTS, "channels": 3, "label_column": "tags",
                                              "label_separator": "|", "split_ratios": [0.34, 0.33, 0.33]})
    assert m.task == "multilabel" and m.class_names == ("x", "y", "z") and m.image_shape == (3, 16, 16)
    assert m.split_method == "random" and sum(s["patients"] for s in m.splits.values()) == 3
    t = _rows(out)
    assert t["class_labels"].to_pylist() == [[1, 1, 0], [0, 1, 0], None, [1, 0, 0], [1, 0, 1]]
    images = decode_images(t)
    for c in range(3):
        np.testing.assert_allclose(images[1, c], _ref_resize(folder["rgb"][..., c] / 255), atol=1e-5)
        np.testing.assert_allclose(images[0, c], _ref_resize(folder["grey"] / 255), atol=1e-5)  # grey replicated
    assert t["volume_id"].to_pylist() == ["img/a0.png", "img/a1.png", "img/b0.tif", "img/c0.jpg", "img/c1.png"]
    splits = dict(zip(t["patient_id"].to_pylist(), t["split"].to_pylist()))
    assert len(set(splits.values())) == 3  # 3 patients, one per split


def test_label_columns_and_unlabelled(folder, tmp_path):
    csv = folder["csv"].parent / "cols.csv"
    csv.write_text("path,patient,l1,l2\nimg/a0.png,pa,1,0\nimg/b0.tif,pb,,\nimg/c1.png,pc,0,1\n")
    m = ingest("folder", csv, tmp_path / "cols", {**OPTS, "label_columns": ["l1", "l2"]})
    assert m.task == "multilabel" and m.class_names == ("l1", "l2")
    assert _rows(tmp_path / "cols")["class_labels"].to_pylist() == [[1, 0], None, [0, 1]]
    m = ingest("folder", csv, tmp_path / "none", {**OPTS, "label_map": {"0": "bg", "1": "fg"}})
    assert m.task == "unlabelled" and m.num_images == 3


def test_mask_value_map_and_rerun(folder, tmp_path):
    io.imsave(folder["csv"].parent / "img" / "bin.png", (folder["masks"]["a0"] > 0).astype(np.uint8) * 255,
              check_contrast=False)
    csv = folder["csv"].parent / "bin.csv"
    csv.write_text("path,patient,mask\nimg/a0.png,pa,img/bin.png\n")
    opts = {**OPTS, "mask_column": "mask", "mask_value_map": {255: 1}, "label_map": {0: "bg", 1: "lung"}}
    out = tmp_path / "bin"
    m = ingest("folder", csv, out, opts)
    assert m.label_map == {0: "bg", 1: "lung"}
    assert set(np.unique(decode_masks(read_shards_table(out)))) == {0, 1}
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert ingest("folder", csv, out, opts) == m
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes
