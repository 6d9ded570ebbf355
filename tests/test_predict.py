"""``medcl predict`` on real hippocampus volumes against independent references (issue 16, items 3 and 7)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

CASES = ["hippocampus_001", "hippocampus_003", "hippocampus_004"]
REORIENTED = "hippocampus_003"  # stored as LPI (flipped R/L, A/P and S/I, axes permuted): not canonical


def _reorient(path: Path) -> None:
    """Rewrite ``path`` in another orientation (same voxels in space, another array layout and affine)."""
    img = nib.load(str(path))
    ornt = np.array([[1, -1], [2, -1], [0, -1]])  # array axes -> (A, S, R) reversed: a PIL-like layout
    nib.save(img.as_reoriented(ornt), str(path))


@pytest.fixture(scope="module")
def hippo(shared_data, tmp_path_factory):
    """A 3-case task folder (one case reoriented), its ingest at 32 px, and a tiny exported U-Net."""
    from msd_subset import copy_msd_subset
    from tiny_export import train_and_export

    from medcl.data.ingest import ingest

    task = shared_data / "Task04_Hippocampus"
    if not task.is_dir():
        pytest.skip(f"{task} not found")
    root = tmp_path_factory.mktemp("predict")
    src = copy_msd_subset(task, root / "Task04_subset", CASES)
    for folder in ("imagesTr", "labelsTr"):
        _reorient(src / folder / f"{REORIENTED}.nii.gz")
    ds = root / "ds"
    ingest("msd", src, ds, {"size": 32, "split_ratios": "0.34,0.33,0.33"})
    return {"src": src, "ds": ds, "model": train_and_export(ds, root / "model"), "root": root}


def _cli(argv: list[str]) -> int:
    from medcl.cli import main

    return main(argv)


def _naive_dice(pred: np.ndarray, label: np.ndarray, k: int) -> dict[int, float]:
    out = {}
    for c in range(1, k):
        p, t = (pred == c).astype(float), (label == c).astype(float)
        s = p.sum() + t.sum()
        out[c] = np.nan if s == 0 else 2 * (p * t).sum() / s
    return out


@pytest.mark.ray
def test_predict_on_raw_nifti_matches_a_plain_loop_over_the_ingested_slices(hippo, ray_session, tmp_path, capsys):
    from tiny_export import reference_slices

    from medcl.model_card import load_model

    out = tmp_path / "pred"
    images, labels = hippo["src"] / "imagesTr", hippo["src"] / "labelsTr"
    code = _cli(["predict", str(hippo["model"]), str(images), "--out", str(out), "--labels", str(labels),
                 "--num-workers", "2", "--batch-size", "16"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "Dice over 3 case(s)" in printed.out
    net, card = load_model(hippo["model"])
    metrics = pd.read_csv(out / "metrics.csv").set_index("case")
    for case in CASES:
        src = nib.load(str(images / f"{case}.nii.gz"))
        written = nib.load(str(out / f"{case}.nii.gz"))
        # (b) the input's grid: shape, affine, voxel sizes, an integer dtype
        assert written.shape == src.shape
        np.testing.assert_allclose(written.affine, src.affine)
        np.testing.assert_allclose(written.header.get_zooms(), src.header.get_zooms())
        assert np.issubdtype(written.get_data_dtype(), np.integer)
        # (a) a plain PyTorch loop over the slices `medcl ingest` wrote, resized back by torch, in RAS
        x = torch.from_numpy(reference_slices(hippo["ds"], case))
        with torch.no_grad():
            pred = torch.cat([net(x[i:i + 7]).argmax(1) for i in range(0, len(x), 7)])
        ras = nib.as_closest_canonical(src)
        h, w = ras.shape[0], ras.shape[1]  # axial slices of (R, A, S)
        back = torch.nn.functional.interpolate(pred[:, None].float(), size=(h, w), mode="nearest-exact")[:, 0]
        expected = back.permute(1, 2, 0).numpy().astype(np.int64)
        got = np.asarray(nib.as_closest_canonical(written).dataobj).astype(np.int64)
        np.testing.assert_array_equal(got, expected)
        assert 0 < (got > 0).sum() < got.size  # the tiny model segments something, not everything
        # (c) Dice from --labels == naive Dice of the written file vs the label file
        label = np.asarray(nib.load(str(labels / f"{case}.nii.gz")).dataobj)
        naive = _naive_dice(np.asarray(written.dataobj), label, card.num_classes)
        for c, name in card.label_map.items():
            if c:
                np.testing.assert_allclose(metrics.loc[case, f"dice_{name}"], naive[c], equal_nan=True)
        np.testing.assert_allclose(metrics.loc[case, "dice_mean"], np.nanmean(list(naive.values())))
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["cases"] == 3
    np.testing.assert_allclose(summary["foreground_mean"]["mean"], metrics["dice_mean"].mean())
    assert (out / "panel.png").stat().st_size > 10_000
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{c}.nii.gz" for c in CASES] + ["metrics.csv", "metrics.json", "panel.png"])


@pytest.mark.ray
def test_a_volume_that_fails_mid_run_leaves_no_output(hippo, ray_session, tmp_path, capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for case in CASES[:2]:
        shutil.copyfile(hippo["src"] / "imagesTr" / f"{case}.nii.gz", inputs / f"{case}.nii.gz")
    whole = (hippo["src"] / "imagesTr" / f"{CASES[2]}.nii.gz").read_bytes()
    bad = inputs / "truncated.nii.gz"
    bad.write_bytes(whole[: len(whole) // 2])  # a readable header, data cut short
    out = tmp_path / "pred"
    assert _cli(["predict", str(hippo["model"]), str(inputs), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and err.count("error:") == 1
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".pred")] == []  # no staging left


def _classification_copy(model: Path, dst: Path) -> Path:
    shutil.copytree(model, dst)
    card = json.loads((dst / "model.json").read_text())
    card.update(task="classification", architecture="resnet_classifier", class_names=["normal", "pneumonia"])
    card["preprocessing"].update(source_kind="medmnist", size=[28, 28])
    (dst / "model.json").write_text(json.dumps(card))
    return dst


@pytest.mark.parametrize("case", ["unreadable", "channels", "classifier_on_volumes", "empty", "seg_on_png"])
def test_bad_input_is_one_error_naming_the_file_and_writes_nothing(hippo, tmp_path, capsys, case):
    model, inputs = hippo["model"], tmp_path / "in"
    inputs.mkdir()
    vol = hippo["src"] / "imagesTr" / f"{CASES[0]}.nii.gz"
    shutil.copyfile(vol, inputs / vol.name)
    named = inputs
    if case == "unreadable":
        named = inputs / "garbage.nii.gz"
        named.write_bytes(b"not a nifti file at all" * 10)
    elif case == "channels":
        img = nib.load(str(vol))
        data = np.stack([np.asarray(img.dataobj)] * 2, axis=-1)
        named = inputs / "two_modalities.nii.gz"
        nib.save(nib.Nifti1Image(data, img.affine), str(named))
    elif case == "classifier_on_volumes":
        model = _classification_copy(model, tmp_path / "cls")
        named = inputs / vol.name
    elif case == "empty":
        (inputs / vol.name).unlink()
    else:
        from PIL import Image

        (inputs / vol.name).unlink()
        named = inputs / "xray.png"
        Image.fromarray(np.zeros((20, 20), np.uint8)).save(named)
    out = tmp_path / "out"
    code = _cli(["predict", str(model), str(inputs), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("error:") == 1 and str(named) in err, err
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["in"] + (["cls"] if model != hippo["model"] else []))


def test_a_csv_input_lists_images_relative_to_itself_and_bad_csvs_name_the_file(tmp_path):
    from PIL import Image

    from medcl.predict.inputs import discover

    for name in ("a.png", "b.png"):
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / name)
    (tmp_path / "list.csv").write_text("image,label\nb.png,1\na.png,0\n")
    assert [item.path.name for item in discover(tmp_path / "list.csv")] == ["b.png", "a.png"]  # the CSV's order
    (tmp_path / "cols.csv").write_text("file\na.png\n")
    with pytest.raises(ValueError, match=r"cols.csv: column\(s\) \['image'\] not found; columns are \['file'\]"):
        discover(tmp_path / "cols.csv")
    (tmp_path / "empty.csv").write_text("image\n")
    with pytest.raises(ValueError, match=r"empty.csv: empty source, the CSV has no rows"):
        discover(tmp_path / "empty.csv")
