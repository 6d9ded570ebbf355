"""Volumes to and from the closest canonical orientation (RAS+), and the named slice axes.

A NIfTI array's axes point wherever its affine says (``LPS``, ``PIR``, ...).
:func:`to_canonical` flips and transposes the array (no resampling, so exactly
invertible) so that its axes point, as nearly as the affine allows, to Right,
Anterior and Superior: array axis 0 is R (sagittal slices are cut along it),
1 is A (coronal), 2 is S (axial). :func:`from_canonical` undoes it with the
:class:`OrientationInfo` that :func:`to_canonical` returned, e.g. to write a
predicted mask back in the input's own orientation, with the input's affine.
Only the first three axes are reoriented; trailing ones (modalities) are kept.

Example:
    >>> img = nibabel.load("case.nii.gz")
    >>> volume, info = to_canonical(img)          # volume[..., k] is the k-th axial slice
    >>> mask = from_canonical(predicted, info)    # predicted.shape[:3] == info.canonical_shape
    >>> nibabel.save(nibabel.Nifti1Image(mask, img.affine, img.header), "case_mask.nii.gz")
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "CANONICAL",
    "SLICE_AXES",
    "OrientationInfo",
    "canonical_array",
    "from_canonical",
    "orientation_of",
    "slice_axis",
    "to_canonical",
]

#: Axis codes of the canonical orientation (nibabel's closest canonical, RAS+).
CANONICAL = ("R", "A", "S")

#: Slice axis names -> axis of the canonical array they cut along.
SLICE_AXES = {"sagittal": 0, "coronal": 1, "axial": 2}


@dataclass(frozen=True)
class OrientationInfo:
    """How an input volume's axes lie, enough to put a canonical array back into them.

    Attributes:
        codes: The input's axis codes (``nibabel.aff2axcodes``), e.g. ``("L", "P", "S")``.
        shape: The input's spatial shape (its first three axes).
        spacing: Voxel size along the input's own axes (header zooms), in mm.
        affine: The input's 4x4 voxel-to-world affine, row by row.
    """

    codes: tuple[str, str, str]
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    affine: tuple[tuple[float, ...], ...]

    @property
    def ornt(self) -> np.ndarray:
        """nibabel orientation (input axis -> canonical axis, flip) of the input. Shape: (3, 2)."""
        from nibabel.orientations import axcodes2ornt

        return axcodes2ornt(self.codes)

    @property
    def canonical_shape(self) -> tuple[int, int, int]:
        """Spatial shape of the canonical array."""
        return self._canonical_order(self.shape)

    @property
    def canonical_spacing(self) -> tuple[float, float, float]:
        """Voxel size along the canonical axes (R, A, S)."""
        return self._canonical_order(self.spacing)

    def _canonical_order(self, per_axis: tuple[Any, Any, Any]) -> tuple[Any, Any, Any]:
        """Per-input-axis values reordered to the canonical axes."""
        out = list(per_axis)
        for value, (axis, _) in zip(per_axis, self.ornt):
            out[int(axis)] = value
        return tuple(out)

    @property
    def canonical_affine(self) -> np.ndarray:
        """Voxel-to-world affine of the canonical array. Shape: (4, 4)."""
        from nibabel.orientations import inv_ornt_aff

        return np.asarray(self.affine, dtype=np.float64) @ inv_ornt_aff(self.ornt, self.shape)

    def to_dict(self, decimals: int = 6) -> dict[str, Any]:
        """Compact JSON form: ``{"codes": "LPS", "shape", "spacing", "affine": 4x4 nested list}``, floats rounded."""
        return {"codes": "".join(self.codes), "shape": list(self.shape),
                "spacing": [round(float(s), decimals) for s in self.spacing],
                "affine": [[round(float(v), decimals) + 0.0 for v in row] for row in self.affine]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> OrientationInfo:
        """Inverse of :meth:`to_dict` (up to its rounding).

        Raises:
            ValueError: a field is missing or malformed (names it).
        """
        try:
            codes = tuple(str(c) for c in d["codes"])
            info = cls(codes=codes, shape=tuple(int(n) for n in d["shape"]),
                       spacing=tuple(float(s) for s in d["spacing"]),
                       affine=tuple(tuple(float(v) for v in row) for row in d["affine"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"orientation record {dict(d)!r} is malformed ({type(e).__name__}: {e}); expected "
                             "{'codes': 'RAS', 'shape': [x, y, z], 'spacing': [...], 'affine': 4x4}") from e
        if len(info.shape) != 3 or len(info.spacing) != 3 or np.shape(info.affine) != (4, 4):
            raise ValueError(f"orientation record {dict(d)!r}: shape and spacing need 3 entries, affine 4x4")
        if not _is_axcodes(info.codes):
            raise ValueError(f"orientation record {dict(d)!r}: codes {d['codes']!r} need one of R/L, A/P and S/I each")
        return info


def _is_axcodes(codes: Sequence[Any]) -> bool:
    pairs = [{"R", "L"}, {"A", "P"}, {"S", "I"}]
    return all(sum(str(c) in p for c in codes) == 1 for p in pairs)


def to_canonical(img: Any) -> tuple[np.ndarray, OrientationInfo]:
    """The image's array flipped/transposed to the closest canonical orientation (RAS+), and how to undo it.

    Args:
        img: A nibabel spatial image (``nibabel.load(path)``) with at least 3 dimensions.

    Returns:
        ``(array, info)``: the data (as ``np.asanyarray(img.dataobj)``: scaling applied, dtype
        kept; a view where possible) with axes 0, 1, 2 pointing R, A, S. Shape:
        (X, Y, Z[, M]) reordered to ``info.canonical_shape``; trailing axes kept.

    Raises:
        ValueError: fewer than 3 dimensions, or an affine with no orientation (a zero or
            repeated axis direction).
    """
    info = orientation_of(img)
    return canonical_array(np.asanyarray(img.dataobj), info), info


def orientation_of(img: Any) -> OrientationInfo:
    """The :class:`OrientationInfo` of a nibabel image, without reading its data.

    Raises:
        ValueError: fewer than 3 dimensions, or an affine with no orientation.
    """
    import nibabel as nib

    if len(img.shape) < 3:
        raise ValueError(f"image of shape {list(img.shape)}: expected at least 3 dimensions")
    affine = np.asarray(img.affine, dtype=np.float64)
    codes = nib.aff2axcodes(affine)
    if not _is_axcodes(codes):
        raise ValueError(f"affine {affine.round(4).tolist()} gives axis codes {tuple(codes)}; expected one of "
                         "R/L, A/P and S/I per spatial axis (a degenerate affine)")
    zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    return OrientationInfo(codes=tuple(codes), shape=tuple(int(n) for n in img.shape[:3]), spacing=zooms,
                           affine=tuple(tuple(float(v) for v in row) for row in affine))


def canonical_array(array: np.ndarray, info: OrientationInfo) -> np.ndarray:
    """An array in the input's own axes flipped/transposed to the canonical ones (what :func:`to_canonical` does).

    For a caller that has read the data already (``np.asanyarray(img.dataobj)``) next to
    :func:`orientation_of`.

    Args:
        array: The input's data. Shape: ``info.shape`` + trailing axes.
        info: The input's :class:`OrientationInfo`.

    Returns:
        The canonical array, a view where possible. Shape: ``info.canonical_shape`` + trailing axes.

    Raises:
        ValueError: the array's spatial shape is not ``info.shape``.
    """
    from nibabel.orientations import apply_orientation

    array = np.asanyarray(array)
    if array.ndim < 3 or tuple(array.shape[:3]) != info.shape:
        raise ValueError(f"array of shape {list(array.shape)}: expected spatial shape {list(info.shape)}")
    return apply_orientation(array, info.ornt)


def from_canonical(array: np.ndarray, info: OrientationInfo) -> np.ndarray:
    """Put an array in the canonical orientation back into the input's own axes (exact inverse of :func:`to_canonical`).

    Args:
        array: Canonical array (an image, a predicted mask). Shape: ``info.canonical_shape`` + trailing axes.
        info: What :func:`to_canonical` returned for the input (or :meth:`OrientationInfo.from_dict`).

    Returns:
        The array in the input's orientation. Shape: ``info.shape`` + trailing axes.

    Raises:
        ValueError: the array's spatial shape is not ``info.canonical_shape``.
    """
    from nibabel.orientations import apply_orientation, axcodes2ornt, ornt_transform

    array = np.asanyarray(array)
    if array.ndim < 3 or tuple(array.shape[:3]) != info.canonical_shape:
        raise ValueError(f"array of shape {list(array.shape)}: expected spatial shape {list(info.canonical_shape)} "
                         f"(the canonical shape of an input of shape {list(info.shape)}, axes {''.join(info.codes)})")
    return apply_orientation(array, ornt_transform(axcodes2ornt(CANONICAL), info.ornt))


def slice_axis(axis: int | str) -> tuple[int, str]:
    """A slice axis as (index into the canonical array, name).

    Args:
        axis: A name of :data:`SLICE_AXES` (``"axial"``, ``"coronal"``, ``"sagittal"``) or an
            index 0, 1, 2 / -1..-3 of the canonical array (2 and -1 are axial).

    Raises:
        ValueError: anything else (names the value and the choices).
    """
    if isinstance(axis, str) and axis.strip().lower() in SLICE_AXES:
        index = SLICE_AXES[axis.strip().lower()]
    elif isinstance(axis, (int, np.integer)) and not isinstance(axis, bool) and -3 <= axis <= 2:
        index = int(axis) % 3
    else:
        raise ValueError(f"axis={axis!r} must be one of {list(SLICE_AXES)} or an int in [-3, 2] "
                         "(an axis of the volume in its canonical RAS orientation)")
    return index, next(name for name, i in SLICE_AXES.items() if i == index)
