"""to_canonical / from_canonical on NIfTI files with non-canonical affines and anisotropic spacing (issue 16, 5)."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from medcl.data.sources.orientation import (
    OrientationInfo,
    canonical_array,
    from_canonical,
    orientation_of,
    slice_axis,
    to_canonical,
)

# axis codes -> (affine whose columns point along them, spacing 0.7 / 2.5 / 1.2 mm, origin (3, -4, 5)),
# and the canonical (RAS) array of data d worked out by hand.
SPACING = (0.7, 2.5, 1.2)
UNIT = {"R": (1, 0, 0), "L": (-1, 0, 0), "A": (0, 1, 0), "P": (0, -1, 0), "S": (0, 0, 1), "I": (0, 0, -1)}
BY_HAND = {
    "RAS": lambda d: d,
    "LPS": lambda d: d[::-1, ::-1, :],  # flip R-L and A-P
    "PIR": lambda d: np.transpose(d, (2, 0, 1))[:, ::-1, ::-1],  # R = axis 2, A = reversed axis 0, S = reversed axis 1
    "ILA": lambda d: np.transpose(d, (1, 2, 0))[::-1, :, ::-1],  # R = reversed axis 1, A = axis 2, S = reversed axis 0
}


def _affine(codes, spacing=SPACING, origin=(3.0, -4.0, 5.0)):
    aff = np.eye(4)
    for i, (c, s) in enumerate(zip(codes, spacing)):
        aff[:3, i] = np.asarray(UNIT[c]) * s
    aff[:3, 3] = origin
    return aff


def _write(tmp_path, codes, data, name="vol.nii.gz"):
    path = tmp_path / name
    nib.save(nib.Nifti1Image(data, _affine(codes)), str(path))
    return nib.load(str(path))


@pytest.mark.parametrize("codes", list(BY_HAND))
def test_round_trip_is_exact_and_axis_2_is_superior(tmp_path, codes):
    data = np.random.default_rng(1).random((3, 4, 5)).astype(np.float32)  # every axis its own length
    img = _write(tmp_path, codes, data)
    canonical, info = to_canonical(img)
    assert info.codes == tuple(codes) and info.shape == (3, 4, 5)
    np.testing.assert_allclose(info.spacing, SPACING, rtol=1e-6)
    np.testing.assert_array_equal(canonical, BY_HAND[codes](data))
    assert canonical.dtype == np.float32 and canonical.shape == info.canonical_shape
    assert nib.aff2axcodes(info.canonical_affine) == ("R", "A", "S")
    # nibabel's own reorientation agrees, affine included
    ref = nib.as_closest_canonical(img)
    np.testing.assert_array_equal(canonical, np.asanyarray(ref.dataobj))
    np.testing.assert_allclose(info.canonical_affine, ref.affine, atol=1e-6)
    # voxel size along R, A, S: the spacing of whichever input axis points there
    np.testing.assert_allclose(info.canonical_spacing, np.abs(ref.header.get_zooms()[:3]), rtol=1e-6)
    back = from_canonical(canonical, info)
    assert back.dtype == data.dtype and back.shape == data.shape
    np.testing.assert_array_equal(back, data)
    assert back.tobytes() == data.tobytes()


def test_canonical_voxel_sits_at_the_same_world_point(tmp_path):
    """Each canonical voxel holds the input voxel at the same world position (affines, not hand rules)."""
    data = np.arange(3 * 4 * 5, dtype=np.int16).reshape(3, 4, 5)
    img = _write(tmp_path, "PIR", data)
    canonical, info = to_canonical(img)
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in canonical.shape], indexing="ij"), -1).reshape(-1, 3)
    world = nib.affines.apply_affine(info.canonical_affine, ijk)
    src = np.rint(nib.affines.apply_affine(np.linalg.inv(img.affine), world)).astype(int)
    np.testing.assert_array_equal(canonical.reshape(-1), data[tuple(src.T)])


def test_trailing_axes_are_kept(tmp_path):
    data = np.random.default_rng(2).random((3, 4, 5, 2)).astype(np.float32)  # two modalities
    img = _write(tmp_path, "LPS", data)
    canonical, info = to_canonical(img)
    np.testing.assert_array_equal(canonical, data[::-1, ::-1])
    np.testing.assert_array_equal(from_canonical(canonical, info), data)
    mask = (canonical[..., 0] > 0.5).astype(np.uint8)  # a prediction made on the canonical array
    np.testing.assert_array_equal(from_canonical(mask, info), mask[::-1, ::-1])


def test_record_survives_json_and_still_inverts(tmp_path):
    data = np.random.default_rng(3).integers(0, 3, (3, 4, 5)).astype(np.uint8)
    img = _write(tmp_path, "ILA", data)
    canonical, info = to_canonical(img)
    record = json.loads(json.dumps(info.to_dict()))
    assert record["codes"] == "ILA" and record["shape"] == [3, 4, 5] and record["spacing"] == list(SPACING)
    assert np.shape(record["affine"]) == (4, 4)
    np.testing.assert_allclose(record["affine"], img.affine, atol=1e-6)
    again = OrientationInfo.from_dict(record)
    assert again.codes == info.codes and again.canonical_shape == info.canonical_shape
    np.testing.assert_array_equal(from_canonical(canonical, again), data)
    # a caller that read the data itself gets the same array
    np.testing.assert_array_equal(canonical_array(np.asanyarray(img.dataobj), orientation_of(img)), canonical)


def test_bad_inputs_name_the_problem(tmp_path):
    img = _write(tmp_path, "PIR", np.zeros((3, 4, 5), np.float32))
    _, info = to_canonical(img)
    with pytest.raises(ValueError, match=r"expected spatial shape \[5, 3, 4\].*input of shape \[3, 4, 5\], axes PIR"):
        from_canonical(np.zeros((3, 4, 5)), info)
    with pytest.raises(ValueError, match=r"array of shape \[5, 3, 4\]: expected spatial shape \[3, 4, 5\]"):
        canonical_array(np.zeros((5, 3, 4)), info)
    # no A/P direction (NIfTI cannot store such an affine; a plain nibabel image can hold one)
    flat = nib.spatialimages.SpatialImage(np.zeros((3, 4, 5), np.float32), np.diag([1.0, 0.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match=r"axis codes .*None"):
        to_canonical(flat)
    with pytest.raises(ValueError, match=r"codes 'RRS'"):
        OrientationInfo.from_dict({**info.to_dict(), "codes": "RRS"})
    with pytest.raises(ValueError, match=r"malformed"):
        OrientationInfo.from_dict({"codes": "RAS"})


@pytest.mark.parametrize("value, expected", [
    ("axial", (2, "axial")), ("Coronal", (1, "coronal")), ("sagittal", (0, "sagittal")),
    (2, (2, "axial")), (-1, (2, "axial")), (0, (0, "sagittal")), (-2, (1, "coronal")), (np.int64(1), (1, "coronal")),
])
def test_slice_axis_names_and_indices(value, expected):
    assert slice_axis(value) == expected


@pytest.mark.parametrize("value", [3, -4, "transverse", True, 1.0, None])
def test_slice_axis_refuses_the_rest(value):
    with pytest.raises(ValueError, match=r"axis=.* must be one of \['sagittal', 'coronal', 'axial'\]"):
        slice_axis(value)
