"""MSD ingest in the canonical orientation: slices of RAS-reoriented volumes, named axes, records (issue 16, item 5)."""
from __future__ import annotations

import json
import re

import nibabel as nib
import numpy as np
import pyarrow.compute as pc
import pytest

from medcl.data.decode import decode_images, decode_masks, read_shards_table
from medcl.data.ingest import ingest
from medcl.data.sources.common import IngestError, normalise, resize_images, resize_masks
from medcl.data.sources.orientation import OrientationInfo, from_canonical
from tests.data.test_bad_input import make_msd

SPACING = {"case_000": (0.8, 2.5, 1.2), "case_001": (1.5, 0.5, 3.0)}
UNIT = {"R": (1, 0, 0), "L": (-1, 0, 0), "A": (0, 1, 0), "P": (0, -1, 0), "S": (0, 0, 1), "I": (0, 0, -1)}
# case -> (its axis codes, stored shape, the canonical (R, A, S) array of stored data d, worked out by hand);
# both are (R, A, S) = (6, 6, 4) once canonical, so axial slices are 6 x 6 and need no resizing at size 6.
CASES = {
    "case_000": ("PIR", (6, 4, 6), lambda d: np.transpose(d, (2, 0, 1))[:, ::-1, ::-1]),
    "case_001": ("LPS", (6, 6, 4), lambda d: d[::-1, ::-1, :]),
}
RAW = {"size": 6, "normalisation": "none"}  # intensities kept: shard pixels are the canonical voxels


def _affine(codes, spacing, origin=(2.0, -3.0, 4.0)):
    aff = np.eye(4)
    for i, (c, s) in enumerate(zip(codes, spacing)):
        aff[:3, i] = np.asarray(UNIT[c]) * s
    aff[:3, 3] = origin
    return aff


@pytest.fixture()
def task(tmp_path):
    """make_msd's two-case folder, its volumes rewritten with non-canonical affines and anisotropic spacing."""
    root = make_msd(tmp_path / "Task", n=2)
    rng = np.random.default_rng(7)
    data = {}
    for case, (codes, shape, _) in CASES.items():
        img = (rng.random(shape) * 100).astype(np.float32)
        lab = rng.integers(0, 3, shape).astype(np.uint8)
        aff = _affine(codes, SPACING[case])
        nib.save(nib.Nifti1Image(img, aff), str(root / "imagesTr" / f"{case}.nii.gz"))
        nib.save(nib.Nifti1Image(lab, aff), str(root / "labelsTr" / f"{case}.nii.gz"))
        data[case] = (img, lab)
    return root, data


def _volume(out, case):
    t = read_shards_table(out, filter=pc.field("volume_id") == case)
    t = t.take(pc.sort_indices(t, [("slice_index", "ascending")]))
    return decode_images(t), decode_masks(t), t["slice_index"].to_pylist()


def test_axial_slices_are_those_of_the_canonical_array(task, tmp_path):
    root, data = task
    m = ingest("msd", root, tmp_path / "out", RAW)  # axis defaults to axial
    assert m.num_images == 2 * 4 and m.image_shape == (1, 6, 6)
    for case, (_, _, by_hand) in CASES.items():
        img, lab = (by_hand(a) for a in data[case])  # (R, A, S)
        images, masks, index = _volume(tmp_path / "out", case)
        assert index == [0, 1, 2, 3]  # slice k = the k-th slice from inferior to superior
        np.testing.assert_array_equal(images[:, 0], np.moveaxis(img, 2, 0))  # (S, R, A)
        np.testing.assert_array_equal(masks, np.moveaxis(lab, 2, 0))


@pytest.mark.parametrize("axis, index", [("coronal", 1), ("sagittal", 0), (-2, 1)])
def test_named_and_int_axes_cut_the_canonical_array(task, tmp_path, axis, index):
    root, data = task
    m = ingest("msd", root, tmp_path / "out", {"size": 5, "normalisation": "minmax", "axis": axis})
    name = {0: "sagittal", 1: "coronal"}[index]
    assert m.extras["axis"] == index and m.extras["axis_name"] == name and m.source["options"]["axis"] == index
    assert m.num_images == 2 * 6
    for case, (_, _, by_hand) in CASES.items():
        img, lab = (by_hand(a) for a in data[case])
        ref = normalise(img.astype(np.float32), "minmax")
        images, masks, _ = _volume(tmp_path / "out", case)
        np.testing.assert_array_equal(images, resize_images(np.moveaxis(ref, index, 0)[:, None], 5))
        np.testing.assert_array_equal(masks, resize_masks(np.moveaxis(lab.astype(np.int64), index, 0), 5))


def test_a_name_and_its_index_are_the_same_options(task, tmp_path):
    root, _ = task
    m = ingest("msd", root, tmp_path / "out", {**RAW, "axis": "sagittal"})
    mtimes = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()}
    assert ingest("msd", root, tmp_path / "out", {**RAW, "axis": 0}) == m
    assert ingest("msd", root, tmp_path / "out", {**RAW, "axis": -3}) == m
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()} == mtimes
    with pytest.raises(IngestError, match=r"axis='transverse' must be one of \['sagittal', 'coronal', 'axial'\]"):
        ingest("msd", root, tmp_path / "bad", {"axis": "transverse"})


def test_cli_axis_option_takes_names(task, tmp_path):
    from medcl.cli import main

    root, _ = task
    assert main(["ingest", "msd", str(root), "--out", str(tmp_path / "out"), "--axis", "coronal", "--size", "6",
                 "-q"]) == 0
    extras = json.loads((tmp_path / "out" / "manifest.json").read_text())["extras"]
    assert (extras["axis"], extras["axis_name"]) == (1, "coronal")


def test_manifest_records_what_writing_back_needs(task, tmp_path):
    root, data = task
    m = ingest("msd", root, tmp_path / "out", RAW)
    assert (m.extras["axis"], m.extras["axis_name"], m.extras["orientation"]) == (2, "axial", "RAS")
    volumes = json.loads((tmp_path / "out" / "manifest.json").read_text())["extras"]["volumes"]
    assert list(volumes) == ["case_000", "case_001"]
    for case, (codes, shape, _) in CASES.items():
        rec = volumes[case]
        assert rec["codes"] == codes and rec["shape"] == list(shape) and rec["spacing"] == list(SPACING[case])
        np.testing.assert_allclose(rec["affine"], _affine(codes, SPACING[case]), atol=1e-6)
        # the record alone puts the shard masks, stacked back along the slice axis, into the file's own grid
        _, masks, _ = _volume(tmp_path / "out", case)
        back = from_canonical(np.moveaxis(masks, 0, 2), OrientationInfo.from_dict(rec))
        np.testing.assert_array_equal(back, data[case][1])


def test_label_on_another_grid_is_refused(task, tmp_path):
    root, data = task
    lab_path = root / "labelsTr" / "case_001.nii.gz"
    img_path = root / "imagesTr" / "case_001.nii.gz"
    canon = CASES["case_001"][2](data["case_001"][1])
    nib.save(nib.Nifti1Image(np.ascontiguousarray(canon), _affine("RAS", SPACING["case_001"])), str(lab_path))
    msg = (f"{re.escape(str(lab_path))}: label affine differs from the affine of image {re.escape(str(img_path))}"
           r".*label RAS .*image LPS")
    with pytest.raises(IngestError, match=msg):
        ingest("msd", root, tmp_path / "out", RAW)
    assert not (tmp_path / "out").exists()
    # the same grid up to float noise is accepted
    jitter = _affine("LPS", SPACING["case_001"]) + 1e-6
    nib.save(nib.Nifti1Image(data["case_001"][1], jitter), str(lab_path))
    assert ingest("msd", root, tmp_path / "out", RAW).num_images == 8


def test_shape_mismatch_names_canonical_shapes(task, tmp_path):
    root, _ = task
    lab_path = root / "labelsTr" / "case_000.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((6, 4, 5), np.uint8), _affine("PIR", SPACING["case_000"])), str(lab_path))
    with pytest.raises(IngestError, match=rf"{re.escape(str(lab_path))}: label shape \[5, 6, 4\] differs from "
                                          r"image shape \[6, 6, 4\]"):
        ingest("msd", root, tmp_path / "out", RAW)


HIPPO_CASES = ["hippocampus_001", "hippocampus_017", "hippocampus_204"]


def test_real_hippocampus_pixels_unchanged(shared_data, tmp_path):
    """Task04 volumes are RAS with 1 mm voxels: the shards equal the pre-reorientation ingest's, byte for byte."""
    hippo = shared_data / "Task04_Hippocampus"
    if not (hippo / "dataset.json").is_file():
        pytest.skip(f"{hippo} not found")
    from msd_subset import copy_msd_subset

    root = copy_msd_subset(hippo, tmp_path / "Task04_subset", HIPPO_CASES)
    m = ingest("msd", root, tmp_path / "out", {"size": 64})
    for case in HIPPO_CASES:
        # before: the file's array as stored, sliced along its last axis, normalised and resized as the ingest does
        vol = np.asarray(nib.load(str(root / "imagesTr" / f"{case}.nii.gz")).dataobj).astype(np.float32)[..., None]
        lab = np.asarray(nib.load(str(root / "labelsTr" / f"{case}.nii.gz")).dataobj)
        vol = normalise(vol, "percentile", axes=(0, 1, 2))
        ref_images = resize_images(np.moveaxis(np.moveaxis(vol, 2, 0), -1, 1), 64)
        ref_masks = resize_masks(np.moveaxis(lab.astype(np.int64), 2, 0), 64)
        images, masks, index = _volume(tmp_path / "out", case)
        assert index == list(range(lab.shape[2]))
        assert images.tobytes() == ref_images.tobytes() and masks.tobytes() == ref_masks.tobytes(), case
        assert m.extras["volumes"][case]["codes"] == "RAS" and m.extras["volumes"][case]["spacing"] == [1.0] * 3
