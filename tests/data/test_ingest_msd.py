"""Decathlon ingest on real Task04_Hippocampus cases (a 5-case subset, and the full set once)."""
from __future__ import annotations

import json
import time

import nibabel as nib
import numpy as np
import pyarrow.compute as pc
import pytest
import torch
import torch.nn.functional as F

from medcl.data.decode import decode_images, decode_masks, read_shards_table
from medcl.data.ingest import ingest
from medcl.data.manifest import verify_checksums

CASES = ["hippocampus_001", "hippocampus_003", "hippocampus_004", "hippocampus_006", "hippocampus_007"]


@pytest.fixture(scope="module")
def hippo(shared_data):
    root = shared_data / "Task04_Hippocampus"
    if not (root / "dataset.json").is_file():
        pytest.skip(f"{root} not found")
    return root


@pytest.fixture(scope="module")
def subset(hippo, tmp_path_factory):
    """A Decathlon folder listing 5 real cases, files copied (a symlink out of the folder is refused)."""
    from msd_subset import copy_msd_subset

    return copy_msd_subset(hippo, tmp_path_factory.mktemp("msd") / "Task04_subset", CASES)


@pytest.fixture(scope="module")
def subset_ds(subset, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "hippo5"
    return out, ingest("msd", subset, out, {"size": 64})


def _volume_rows(out, case):
    t = read_shards_table(out, filter=pc.field("volume_id") == case)
    return t.take(pc.sort_indices(t, [("slice_index", "ascending")]))


def _reference_masks(label_path, axis, size):
    """Independent reference: nibabel volume -> slices along ``axis`` -> torch nearest-exact resize."""
    lab = np.moveaxis(np.asarray(nib.load(str(label_path)).dataobj), axis, 0).astype(np.float32)
    return F.interpolate(torch.from_numpy(lab)[:, None], size=(size, size), mode="nearest-exact")[:, 0].long().numpy()


def test_subset_manifest(subset_ds, hippo):
    out, m = subset_ds
    assert m.task == "segmentation" and m.num_patients == m.num_volumes == 5
    assert m.label_map == {0: "background", 1: "Anterior", 2: "Posterior"}
    assert m.image_shape == (1, 64, 64) and m.extras["axis"] == 2
    assert sum(s["patients"] for s in m.splits.values()) == 5
    assert m.num_images == sum(nib.load(str(hippo / "imagesTr" / f"{c}.nii.gz")).shape[2] for c in CASES)
    assert "percentile" in m.normalisation
    verify_checksums(out)


@pytest.mark.parametrize("case", CASES)
def test_slices_and_masks_match_nibabel(subset_ds, subset, case):
    out, _ = subset_ds
    rows = _volume_rows(out, case)
    shape = nib.load(str(subset / "imagesTr" / f"{case}.nii.gz")).shape
    assert rows.num_rows == shape[2]  # one row per slice along the last axis
    assert rows["slice_index"].to_pylist() == list(range(shape[2]))
    np.testing.assert_allclose(rows["slice_position"].to_numpy(), np.arange(shape[2]) / shape[2], rtol=1e-6)
    masks = decode_masks(rows)
    ref = _reference_masks(subset / "labelsTr" / f"{case}.nii.gz", 2, 64)
    np.testing.assert_array_equal(masks, ref)
    assert set(np.unique(masks)) == {0, 1, 2}  # every hippocampus volume has both structures
    # nearest resize keeps the label set of every slice
    raw = np.moveaxis(np.asarray(nib.load(str(subset / "labelsTr" / f"{case}.nii.gz")).dataobj), 2, 0)
    for s in range(shape[2]):
        assert set(np.unique(masks[s])) == set(np.unique(raw[s]))


def test_images_normalised_per_volume(subset_ds, subset):
    out, _ = subset_ds
    case = CASES[0]
    images = decode_images(_volume_rows(out, case))
    assert images.dtype == np.float32 and images.shape[1:] == (1, 64, 64)
    assert images.min() >= 0 and images.max() <= 1
    vol = np.asarray(nib.load(str(subset / "imagesTr" / f"{case}.nii.gz")).dataobj).astype(np.float64)
    lo, hi = np.percentile(vol, [0.5, 99.5])
    vol = (np.clip(vol, lo, hi) - lo) / (hi - lo)
    ref = F.interpolate(torch.from_numpy(np.moveaxis(vol, 2, 0)[:, None]), size=(64, 64), mode="bilinear",
                        align_corners=False).numpy()
    np.testing.assert_allclose(images, ref, atol=1e-5)


def test_other_axis_and_foreground_filter(subset, tmp_path):
    case = CASES[1]
    m = ingest("msd", subset, tmp_path / "ax0", {"axis": 0, "size": 32})
    shape = [nib.load(str(subset / "imagesTr" / f"{c}.nii.gz")).shape for c in CASES]
    assert m.num_images == sum(s[0] for s in shape) and m.image_shape == (1, 32, 32)
    np.testing.assert_array_equal(decode_masks(_volume_rows(tmp_path / "ax0", case)),
                                  _reference_masks(subset / "labelsTr" / f"{case}.nii.gz", 0, 32))
    m = ingest("msd", subset, tmp_path / "fg", {"min_foreground_pixels": 1})
    expected = sum(int(((_reference_masks(subset / "labelsTr" / f"{c}.nii.gz", 2, 64) > 0).sum((1, 2)) >= 1).sum())
                   for c in CASES)
    assert m.num_images == expected and m.extras["slices_dropped"] == sum(s[2] for s in shape) - expected


def test_rerun_is_noop(subset_ds, subset):
    out, m = subset_ds
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = ingest("msd", subset, out, {"size": 64, "axis": 2})  # same options spelled differently
    assert again == m and {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_full_hippocampus(hippo, tmp_path):
    """All 260 volumes: slice counts and per-volume class pixel counts against nibabel."""
    t0 = time.perf_counter()
    m = ingest("msd", hippo, tmp_path / "hippo", {})
    elapsed = time.perf_counter() - t0
    cases = sorted(p.name[: -len(".nii.gz")] for p in (hippo / "imagesTr").glob("hippocampus_*.nii.gz"))
    assert len(cases) == 260 and m.num_volumes == m.num_patients == 260
    t = read_shards_table(tmp_path / "hippo", columns=["volume_id", "mask"])
    flat = t["mask"].combine_chunks().flatten().to_numpy().reshape(t.num_rows, 64 * 64)
    row_counts = np.stack([(flat == k).sum(axis=1) for k in range(3)], axis=1)  # (rows, 3)
    vids = np.asarray(t["volume_id"].to_pylist())
    total = 0
    for case in cases:
        ref = _reference_masks(hippo / "labelsTr" / f"{case}.nii.gz", 2, 64)
        mine = row_counts[vids == case]
        assert len(mine) == len(ref), case
        np.testing.assert_array_equal(mine.sum(axis=0), np.bincount(ref.ravel(), minlength=3), err_msg=case)
        total += len(ref)
    assert m.num_images == total == 9270
    assert m.splits["train"]["patients"] == 130 and m.splits["val"]["patients"] == 65
    print(f"full hippocampus ingest: {elapsed:.1f} s, {m.num_images} slices")


def test_multimodal_volumes_become_channels(tmp_path):
    """A fake 2-modality task: (X, Y, Z, 2) images -> C = 2, each channel normalised on its own."""
    root = tmp_path / "Task99"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    rng = np.random.default_rng(0)
    img = np.stack([rng.random((8, 8, 4)) * 10, rng.random((8, 8, 4)) * 1000 + 500], axis=-1).astype(np.float32)
    lab = rng.integers(0, 2, (8, 8, 4)).astype(np.uint8)
    nib.save(nib.Nifti1Image(img, np.eye(4)), str(root / "imagesTr" / "c_0.nii.gz"))
    nib.save(nib.Nifti1Image(lab, np.eye(4)), str(root / "labelsTr" / "c_0.nii.gz"))
    (root / "dataset.json").write_text(json.dumps({
        "modality": {"0": "T1", "1": "FLAIR"}, "labels": {"0": "background", "1": "tumour"},
        "training": [{"image": "./imagesTr/c_0.nii.gz", "label": "./labelsTr/c_0.nii.gz"}]}))
    m = ingest("msd", root, tmp_path / "out", {"size": 8, "normalisation": "minmax"})
    assert m.image_shape == (2, 8, 8) and m.num_images == 4 and m.extras["modalities"] == {"0": "T1", "1": "FLAIR"}
    x = decode_images(_volume_rows(tmp_path / "out", "c_0"))
    for c in range(2):  # size kept: the slices are the min-max scaled channel itself
        ref = (img[..., c] - img[..., c].min()) / (img[..., c].max() - img[..., c].min())
        np.testing.assert_allclose(x[:, c], np.moveaxis(ref, 2, 0), atol=1e-6)
