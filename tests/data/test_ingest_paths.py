"""Ingest reads only files inside the source's folder unless told otherwise (issue 13, item 11).

A CSV row (image folder source) or a ``dataset.json`` entry (MSD) naming a
file outside the folder — ``../``, an absolute path, or a symlink inside the
folder that points out of it — is refused with the row / entry and the path;
``allow_outside_paths: true`` reads them. Tiny files in tmp_path folders.
"""
from __future__ import annotations

import json
import re
import shutil

import nibabel as nib
import numpy as np
import pytest
from skimage import io

from medcl.data.ingest import ingest, ingest_options
from medcl.data.sources.common import IngestError


def make_msd(root):
    """A Decathlon folder of 3 tiny cases, listed as ./imagesTr/case_00i.nii.gz and ./labelsTr/..."""
    rng = np.random.default_rng(0)
    cases = [f"case_{i:03d}" for i in range(3)]
    for folder, data in (("imagesTr", lambda: rng.random((6, 7, 5)).astype(np.float32)),
                         ("labelsTr", lambda: rng.integers(0, 2, (6, 7, 5)).astype(np.uint8))):
        (root / folder).mkdir(parents=True)
        for case in cases:
            nib.save(nib.Nifti1Image(data(), np.eye(4)), str(root / folder / f"{case}.nii.gz"))
    (root / "dataset.json").write_text(json.dumps({
        "labels": {"0": "background", "1": "a"},
        "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in cases]}))
    return root


@pytest.fixture()
def folder(tmp_path):
    """<tmp>/src/images.csv with 4 images of 2 patients inside src/img/, and one image outside src/."""
    src = tmp_path / "src"
    (src / "img").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ("a0", "a1", "b0", "b1"):
        io.imsave(src / "img" / f"{name}.png", rng.integers(0, 255, (8, 8), dtype=np.uint8), check_contrast=False)
    io.imsave(tmp_path / "secret.png", rng.integers(0, 255, (8, 8), dtype=np.uint8), check_contrast=False)
    return src


def _csv(src, images):
    rows = [f"{image},{'p' + str(i // 2)}" for i, image in enumerate(images)]
    (src / "images.csv").write_text("image,patient_id\n" + "\n".join(rows) + "\n")
    return src / "images.csv"


def _opts(**extra):
    return {"size": 8, "split_ratios": [0.5, 0.0, 0.5], **extra}


def test_paths_inside_the_csv_folder_are_read(folder, tmp_path):
    csv = _csv(folder, ["img/a0.png", "./img/a1.png", str(folder / "img" / "b0.png"), "img/../img/b1.png"])
    m = ingest("folder", csv, tmp_path / "out", _opts())
    assert m.num_images == 4


@pytest.mark.parametrize("outside", ["../secret.png", "{tmp}/secret.png", "img/../../secret.png", "link.png"])
def test_a_row_naming_a_file_outside_the_folder_is_refused(folder, tmp_path, outside):
    (folder / "link.png").symlink_to(tmp_path / "secret.png")  # inside the folder, pointing out of it
    name = outside.format(tmp=tmp_path)
    csv = _csv(folder, ["img/a0.png", "img/a1.png", name, "img/b1.png"])
    pattern = (f"{re.escape(str(csv))} row 4, column 'image': {re.escape(repr(name))}.* lies outside the source "
               f"folder {re.escape(str(folder))}; .*allow_outside_paths: true")
    with pytest.raises(IngestError, match=pattern):
        ingest("folder", csv, tmp_path / "out", _opts())
    assert not (tmp_path / "out").exists()
    # explicitly allowed, the same CSV ingests
    m = ingest("folder", csv, tmp_path / "out", _opts(allow_outside_paths=True))
    assert m.num_images == 4


def test_a_mask_outside_the_folder_is_refused_too(folder, tmp_path):
    csv = _csv(folder, ["img/a0.png", "img/a1.png", "img/b0.png", "img/b1.png"])
    csv.write_text(csv.read_text().replace("image,patient_id", "image,patient_id,mask")
                   .replace("img/b0.png,p1", "img/b0.png,p1,../secret.png").replace(",p0\n", ",p0,\n")
                   .replace("img/b1.png,p1", "img/b1.png,p1,"))
    with pytest.raises(IngestError, match=r"row 4, column 'mask': '\.\./secret\.png'.* lies outside"):
        ingest("folder", csv, tmp_path / "out", _opts(mask_column="mask"))


def test_the_option_is_a_keyword_of_both_path_sources_and_must_be_a_bool(folder, tmp_path):
    assert ingest_options("folder")["allow_outside_paths"] is False
    assert ingest_options("msd")["allow_outside_paths"] is False
    assert "allow_outside_paths" not in ingest_options("medmnist")
    with pytest.raises(IngestError, match=r"allow_outside_paths='yes' must be true or false"):
        ingest("folder", _csv(folder, ["img/a0.png"]), tmp_path / "out", _opts(allow_outside_paths="yes"))


@pytest.mark.parametrize("entry", ["../outside/case_001.nii.gz", "{tmp}/outside/case_001.nii.gz", "symlink"])
def test_a_dataset_json_entry_outside_the_task_folder_is_refused(tmp_path, entry):
    root = make_msd(tmp_path / "Task")
    (tmp_path / "outside").mkdir()
    shutil.move(root / "labelsTr" / "case_001.nii.gz", tmp_path / "outside" / "case_001.nii.gz")
    if entry == "symlink":
        (root / "labelsTr" / "case_001.nii.gz").symlink_to(tmp_path / "outside" / "case_001.nii.gz")
        name = "./labelsTr/case_001.nii.gz"
    else:
        name = entry.format(tmp=tmp_path)
    meta = json.loads((root / "dataset.json").read_text())
    meta["training"][1]["label"] = name
    (root / "dataset.json").write_text(json.dumps(meta))
    pattern = (f"{re.escape(str(root / 'dataset.json'))} training\\[1\\].label: {re.escape(repr(name))}.* lies "
               f"outside the source folder {re.escape(str(root))}")
    with pytest.raises(IngestError, match=pattern):
        ingest("msd", root, tmp_path / "out", {"size": 8})
    if entry != "symlink":  # a listed file outside labelsTr/ is fine once allowed
        assert ingest("msd", root, tmp_path / "out", {"size": 8, "allow_outside_paths": True}).num_volumes == 3
