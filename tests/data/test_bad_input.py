"""Bad input: one IngestError naming the file/option/value, and no partial output."""
from __future__ import annotations

import gzip
import json
import re

import nibabel as nib
import numpy as np
import pytest
from skimage import io

from medcl.data.ingest import ingest
from medcl.data.manifest import read_manifest, verify_checksums
from medcl.data.sources.common import IngestError
from medcl.data.splits import labelled_patients

SHAPE = (6, 7, 5)


def _nii(path, data):
    nib.save(nib.Nifti1Image(np.asarray(data), np.eye(4)), str(path))


def make_msd(root, n=3, labels=None):
    """A tiny Decathlon folder: n cases of SHAPE with labels {0, 1, 2}."""
    rng = np.random.default_rng(0)
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    cases = [f"case_{i:03d}" for i in range(n)]
    for c in cases:
        _nii(root / "imagesTr" / f"{c}.nii.gz", rng.random(SHAPE).astype(np.float32) * 100)
        _nii(root / "labelsTr" / f"{c}.nii.gz", rng.integers(0, 3, SHAPE).astype(np.uint8))
    meta = {"name": "Tiny", "modality": {"0": "MRI"},
            "labels": labels or {"0": "background", "1": "a", "2": "b"},
            "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in cases]}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def _no_output(parent, name="out"):
    return not (parent / name).exists() and not [p for p in parent.iterdir() if ".tmp-" in p.name]


def _expect(src, out, match, options=None, kind="msd"):
    with pytest.raises(IngestError, match=match) as info:
        ingest(kind, src, out, options or {})
    assert isinstance(info.value, ValueError)
    return info.value


@pytest.fixture()
def msd(tmp_path):
    return make_msd(tmp_path / "Task")


def test_valid_tiny_msd_works(msd, tmp_path):
    m = ingest("msd", msd, tmp_path / "out", {"size": 8})
    assert m.num_images == 3 * SHAPE[2] and m.image_shape == (1, 8, 8)


def test_truncated_gz(msd, tmp_path):
    f = msd / "imagesTr" / "case_001.nii.gz"
    f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])
    _expect(msd, tmp_path / "out", re.escape(str(f)))
    assert _no_output(tmp_path)


def test_corrupt_nifti_header(msd, tmp_path):
    f = msd / "labelsTr" / "case_002.nii.gz"
    f.write_bytes(gzip.compress(b"this is not a nifti file" * 20))
    _expect(msd, tmp_path / "out", re.escape(str(f)))
    assert _no_output(tmp_path)


def test_image_label_shape_mismatch(msd, tmp_path):
    f = msd / "labelsTr" / "case_000.nii.gz"
    _nii(f, np.zeros((6, 7, 4), np.uint8))
    err = _expect(msd, tmp_path / "out", re.escape(str(f)))
    assert "[6, 7, 4]" in str(err) and "[6, 7, 5]" in str(err)
    assert _no_output(tmp_path)


def test_label_file_without_image(msd, tmp_path):
    extra = msd / "labelsTr" / "case_999.nii.gz"
    _nii(extra, np.zeros(SHAPE, np.uint8))
    _expect(msd, tmp_path / "out", f"{re.escape(str(extra))}: label file with no image")
    assert _no_output(tmp_path)


def test_image_without_label(msd, tmp_path):
    (msd / "labelsTr" / "case_001.nii.gz").unlink()
    _expect(msd, tmp_path / "out", r"case_001.nii.gz: image has no label")
    assert _no_output(tmp_path)


def test_unlisted_image_in_images_folder(msd, tmp_path):
    extra = msd / "imagesTr" / "case_777.nii.gz"
    _nii(extra, np.zeros(SHAPE, np.float32))
    _expect(msd, tmp_path / "out", f"{re.escape(str(extra))}: image with no label")
    assert _no_output(tmp_path)


def test_label_values_not_in_dataset_json(tmp_path):
    root = make_msd(tmp_path / "Task", labels={"0": "background", "1": "a"})  # files hold 0, 1, 2
    err = _expect(root, tmp_path / "out", r"case_000.nii.gz: label values \[2\] not in dataset.json labels")
    assert "labelsTr" in str(err)
    assert _no_output(tmp_path)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_inf_intensities(msd, tmp_path, bad):
    f = msd / "imagesTr" / "case_002.nii.gz"
    data = np.ones(SHAPE, np.float32)
    data[1, 2, 3] = bad
    _nii(f, data)
    _expect(msd, tmp_path / "out", f"{re.escape(str(f))}: 1 NaN/inf")
    assert _no_output(tmp_path)


def test_empty_sources(tmp_path):
    root = make_msd(tmp_path / "Task", n=0)
    _expect(root, tmp_path / "out", "empty source")
    npz = tmp_path / "empty.npz"
    np.savez(npz, train_images=np.zeros((0, 28, 28), np.uint8), train_labels=np.zeros((0, 1), np.uint8))
    _expect(npz, tmp_path / "out", f"{re.escape(str(npz))}: empty source", kind="medmnist")
    csv = tmp_path / "empty.csv"
    csv.write_text("image,patient_id\n")
    _expect(csv, tmp_path / "out", f"{re.escape(str(csv))}: empty source", kind="folder")
    (tmp_path / "nothing").mkdir()
    _expect(tmp_path / "nothing", tmp_path / "out", "dataset.json")
    assert _no_output(tmp_path)


@pytest.mark.parametrize("fraction", [0, -0.5, 1.5])
def test_label_fraction_outside_unit_interval(fraction):
    with pytest.raises(ValueError, match=re.escape(f"fraction={fraction!r}")):
        labelled_patients(["a", "b"], fraction)


def test_unknown_option_and_kind(msd, tmp_path):
    _expect(msd, tmp_path / "out", "unknown msd ingest option.*'sise'", {"sise": 64})
    with pytest.raises(IngestError, match="source_kind='nifti'"):
        ingest("nifti", msd, tmp_path / "out")
    _expect(msd, tmp_path / "out", r"size=0", {"size": 0})
    _expect(msd, tmp_path / "out", r"axis=3", {"axis": 3})
    _expect(msd, tmp_path / "out", r"normalisation='fancy'", {"normalisation": "fancy"})
    _expect(msd, tmp_path / "out", r"split_ratios", {"split_ratios": [0.5, 0.5, 0.5]})
    assert _no_output(tmp_path)


def test_failed_reingest_keeps_old_dataset(msd, tmp_path):
    out = tmp_path / "out"
    old = ingest("msd", msd, out, {"size": 8})
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    f = msd / "imagesTr" / "case_002.nii.gz"  # the last case: the failure comes mid-write
    f.write_bytes(f.read_bytes()[:100])
    _expect(msd, out, re.escape(str(f)), {"size": 8})
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert read_manifest(out).fingerprint == old.fingerprint and verify_checksums(out)
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_bad_npz(tmp_path):
    npz = tmp_path / "bad.npz"
    npz.write_bytes(b"PK\x03\x04 truncated")
    _expect(npz, tmp_path / "out", re.escape(str(npz)), kind="medmnist")
    np.savez(npz, train_images=np.zeros((3, 4, 4), np.uint8), train_labels=np.zeros((2, 1), np.uint8))
    _expect(npz, tmp_path / "out", "3 images but train_labels 2", kind="medmnist")
    np.savez(npz, train_images=np.full((2, 4, 4), np.nan, np.float32), train_labels=np.zeros((2, 1), np.uint8))
    _expect(npz, tmp_path / "out", "NaN/inf", kind="medmnist")
    np.savez(npz, train_images=np.zeros((2, 4, 4), np.uint8), train_labels=np.array([[0], [3]]))
    _expect(npz, tmp_path / "out", r"class_names=\['a', 'b'\] has 2 names for 4 classes",
            {"class_names": ["a", "b"]}, kind="medmnist")
    assert _no_output(tmp_path)


@pytest.fixture()
def pngs(tmp_path):
    (tmp_path / "im").mkdir()
    io.imsave(tmp_path / "im" / "a.png", np.zeros((8, 8), np.uint8), check_contrast=False)
    io.imsave(tmp_path / "im" / "m.png", np.full((8, 8), 3, np.uint8), check_contrast=False)
    io.imsave(tmp_path / "im" / "small.png", np.zeros((4, 4), np.uint8), check_contrast=False)
    (tmp_path / "im" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    return tmp_path


def _csv(root, text):
    (root / "x.csv").write_text(text)
    return root / "x.csv"


def test_folder_errors(pngs):
    out = pngs / "out"
    csv = _csv(pngs, "image,patient_id\nim/missing.png,p1\n")
    _expect(csv, out, re.escape(str(pngs / "im" / "missing.png")) + " not found", kind="folder")
    csv = _csv(pngs, "image,patient_id\nim/broken.png,p1\n")
    _expect(csv, out, re.escape(str(pngs / "im" / "broken.png")) + ": cannot read image", kind="folder")
    csv = _csv(pngs, "img,patient_id\nim/a.png,p1\n")
    _expect(csv, out, r"column\(s\) \['image'\] not found", kind="folder")
    csv = _csv(pngs, "image,patient_id,mask\nim/a.png,p1,im/small.png\n")
    _expect(csv, out, "small.png: mask shape", {"mask_column": "mask"}, kind="folder")
    csv = _csv(pngs, "image,patient_id,mask\nim/a.png,p1,im/m.png\n")
    _expect(csv, out, r"m.png: mask values \[3\] not in label_map", {"mask_column": "mask",
                                                                     "label_map": {0: "bg", 1: "fg"}}, kind="folder")
    csv = _csv(pngs, "image,patient_id,label\nim/a.png,p1,cat\n")
    _expect(csv, out, r"row 2: label 'cat' not in class_names", {"label_column": "label",
                                                                 "class_names": ["dog"]}, kind="folder")
    csv = _csv(pngs, "image,patient_id,fold\nim/a.png,p1,train\nim/a.png,p1,test\n")
    _expect(csv, out, "patient 'p1' is in splits", {"split_column": "fold"}, kind="folder")
    _expect(csv, out, "channels=2", {"channels": 2}, kind="folder")
    assert _no_output(pngs)
