"""Per-volume and per-image preprocessing, shared by the ingest and ``medcl predict``: one definition.

What the ingest does to one NIfTI volume (:func:`load_nifti`, :func:`check_volume`,
:func:`volume_slices`) and to one 2-D image file (:func:`read_image`,
:func:`image_channels`, :func:`preprocess_image`) lives here, and
:mod:`~medcl.data.sources.msd`, :mod:`~medcl.data.sources.image_folder` and
:mod:`medcl.predict` call it, so a model sees at prediction time exactly the slices
it was trained on. Every bad input raises one :class:`IngestError` naming the file.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medcl.data.sources.common import IngestError, normalise, resize_images
from medcl.data.sources.orientation import OrientationInfo, canonical_array, orientation_of

__all__ = ["load_nifti", "check_volume", "volume_slices", "read_image", "image_channels", "preprocess_image"]


def load_nifti(path: Path, what: str = "image") -> tuple[np.ndarray, OrientationInfo]:
    """A NIfTI file's data in the canonical (RAS) orientation, and its orientation.

    Raises:
        IngestError: unreadable file, or an affine with no orientation (names ``path``).
    """
    import nibabel as nib

    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj)
    except Exception as e:  # nibabel raises many types on corrupt/truncated files
        raise IngestError(f"{path}: cannot read NIfTI {what} ({type(e).__name__}: {e})") from e
    try:
        info = orientation_of(img)
    except ValueError as e:
        raise IngestError(f"{path}: NIfTI {what} with no usable orientation ({e})") from e
    return canonical_array(data, info), info


def check_volume(img: np.ndarray, path: Path, channels: int) -> np.ndarray:
    """A canonical image volume as float32 (X, Y, Z, C), checked: 3D (one channel) or 4D with ``channels``, finite.

    Raises:
        IngestError: another shape or channel count, or NaN/inf intensities (names ``path``).
    """
    if img.ndim == 3:
        img = img[..., None]
    if img.ndim != 4 or img.shape[-1] != channels:
        raise IngestError(f"{path}: image of shape {list(img.shape)}; expected 3D or 4D with {channels} "
                          "modalities (dataset.json 'modality')")
    img = img.astype(np.float32)
    if not np.isfinite(img).all():
        raise IngestError(f"{path}: {int((~np.isfinite(img)).sum())} NaN/inf intensities")
    return img


def volume_slices(img: np.ndarray, *, axis: int, size: int, normalisation: str,
                  keep: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
    """The model's input slices of a checked volume: normalised per volume and channel, cut along ``axis``, resized.

    Args:
        img: :func:`check_volume`'s output. Shape: (X, Y, Z, C), canonical axes.
        axis: Slice axis, an index of the canonical array (:func:`~medcl.data.sources.orientation.slice_axis`).
        size: Slices are resized to ``size x size`` (bilinear, antialiased when shrinking).
        normalisation: A key of :data:`~medcl.data.sources.common.NORMALISATIONS`, applied before resizing.
        keep: Indices of the slices to return (default: all, in order).

    Returns:
        float32. Shape: (S, C, size, size); slice ``s`` keeps the other two canonical axes in order.
    """
    img = normalise(img, normalisation, axes=(0, 1, 2))
    slices = np.moveaxis(np.moveaxis(img, axis, 0), -1, 1)  # (S, C, h, w)
    return resize_images(slices if keep is None else slices[keep], size)


def read_image(path: Path) -> np.ndarray:
    """A 2-D image file (PNG, JPEG, TIFF) as stored.

    Raises:
        IngestError: unreadable file (names ``path``).
    """
    from skimage import io

    try:
        return np.asarray(io.imread(str(path)))
    except Exception as e:  # imageio/tifffile/PIL raise many types on unreadable files
        raise IngestError(f"{path}: cannot read image ({type(e).__name__}: {e})") from e


def image_channels(img: np.ndarray, channels: int, normalisation: str, path: Path) -> np.ndarray:
    """(C, H, W) float32 in the requested channels (1: luminance grey, 3: RGB, grey replicated), normalised.

    ``normalisation`` "dtype" divides integers by their dtype's maximum; any other is a key of
    :data:`~medcl.data.sources.common.NORMALISATIONS`, per image.

    Raises:
        IngestError: not a grey [H, W] or RGB(A) [H, W, 3|4] image, or NaN/inf intensities (names ``path``).
    """
    if img.ndim == 3 and img.shape[-1] in (1, 3, 4):
        img = img[..., :3] if img.shape[-1] > 1 else img[..., 0]
    if img.ndim not in (2, 3):
        raise IngestError(f"{path}: image of shape {list(img.shape)}; expected grey [H, W] or RGB(A) [H, W, 3|4]")
    if np.issubdtype(img.dtype, np.bool_):
        x = img.astype(np.float32)
    elif np.issubdtype(img.dtype, np.integer):
        x = img.astype(np.float32) / (np.iinfo(img.dtype).max if normalisation == "dtype" else 1)
    else:
        x = img.astype(np.float32)
        if not np.isfinite(x).all():
            raise IngestError(f"{path}: {int((~np.isfinite(x)).sum())} NaN/inf intensities")
    x = x[None] if x.ndim == 2 else np.moveaxis(x, -1, 0)
    if channels == 1 and x.shape[0] == 3:
        x = np.tensordot(np.array([0.2125, 0.7154, 0.0721], np.float32), x, axes=1)[None]  # ITU-R 709 luma
    elif channels == 3 and x.shape[0] == 1:
        x = np.repeat(x, 3, axis=0)
    return x if normalisation == "dtype" else normalise(x, normalisation)


def preprocess_image(path: Path, *, channels: int, normalisation: str, size: int) -> np.ndarray:
    """One image file as the model's input: read, converted to ``channels``, normalised, resized.

    Returns:
        float32. Shape: (channels, size, size).
    """
    return resize_images(image_channels(read_image(path), channels, normalisation, path)[None], size)[0]
