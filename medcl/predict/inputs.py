"""What ``medcl predict`` reads: the model card, the inputs and their labels, all checked before anything runs.

An input is a NIfTI volume (``.nii``, ``.nii.gz``) or a 2-D image (PNG, JPEG, TIFF), given as
one file, a folder of them, or a CSV whose ``image`` column lists them (relative to the
CSV's folder). The card's ``preprocessing`` says which the model can read: a model
trained on an ``msd`` ingest reads volumes, one trained on a ``folder`` or ``medmnist``
ingest reads 2-D images. :func:`read_inputs` (run in Ray tasks) preprocesses them with
the ingest's own functions (:mod:`medcl.data.sources.preprocess`).
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medcl.data.sources.common import IngestError, read_csv_table, source_file
from medcl.data.sources.orientation import orientation_of
from medcl.data.sources.preprocess import check_volume, load_nifti, preprocess_image, volume_slices
from medcl.model_card import CARD_FILE, WEIGHTS_FILE, ModelCard

__all__ = ["Item", "Preprocessing", "read_card", "preprocessing_of", "discover", "check_items", "read_inputs",
           "NIFTI_SUFFIXES", "IMAGE_SUFFIXES", "case_name"]

NIFTI_SUFFIXES = (".nii.gz", ".nii")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
_VOLUME_SOURCES = ("msd",)
_IMAGE_SOURCES = ("folder", "medmnist")


@dataclass(frozen=True)
class Item:
    """One input: ``name`` (output name without suffix), ``path``, and, once checked, its shape and label file."""

    name: str
    path: Path
    shape: tuple[int, ...] = ()
    label: Path | None = None


@dataclass(frozen=True)
class Preprocessing:
    """The ingest's preprocessing of a model's training data (from its card)."""

    volumes: bool
    size: int
    channels: int
    normalisation: str
    axis: int = 2

    def to_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`read_inputs`."""
        return {"volumes": self.volumes, "size": self.size, "channels": self.channels,
                "normalisation": self.normalisation, "axis": self.axis}


def read_card(model_dir: str | Path) -> ModelCard:
    """The card of an export directory, without loading its weights (the actors do).

    Raises:
        FileNotFoundError: ``model.json`` or ``model.safetensors`` missing.
        ValueError: a malformed card.
    """
    root = Path(model_dir)
    for name in (CARD_FILE, WEIGHTS_FILE):
        if not (root / name).is_file():
            raise FileNotFoundError(f"{root / name} not found: MODEL must be a medcl model export (medcl export), a "
                                    "fine-tuning checkpoint, or a pipeline run directory with --job")
    try:
        data = json.loads((root / CARD_FILE).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{root / CARD_FILE}: not JSON ({e})") from e
    return ModelCard.from_dict(data, str(root / CARD_FILE))


def preprocessing_of(card: ModelCard, where: str) -> Preprocessing:
    """What :func:`read_inputs` does for this model: the ingest's steps, from ``card.preprocessing``.

    Raises:
        ValueError: a task or ingest source ``medcl predict`` cannot reproduce (names ``where``).
    """
    pre, kind = card.preprocessing, card.preprocessing.get("source_kind")
    if card.task not in ("segmentation", "classification"):
        raise ValueError(f"{where}: task {card.task!r}; medcl predict runs segmentation and classification models")
    size = [int(s) for s in pre.get("size") or ()]
    if len(size) != 2 or size[0] != size[1]:
        raise ValueError(f"{where}: preprocessing size {pre.get('size')!r}; expected a square [size, size]")
    options = pre.get("ingest_options") or {}
    if kind in _VOLUME_SOURCES:
        return Preprocessing(True, size[0], card.in_channels, str(options.get("normalisation", "percentile")),
                             int(pre.get("axis", options.get("axis", 2))))
    if kind in _IMAGE_SOURCES:
        norm = "dtype" if kind == "medmnist" else str(options.get("normalisation", "dtype"))
        return Preprocessing(False, size[0], card.in_channels, norm)
    raise ValueError(f"{where}: trained on a {kind!r} ingest; medcl predict reproduces the "
                     f"{', '.join(_VOLUME_SOURCES + _IMAGE_SOURCES)} ingests only")


def case_name(path: Path) -> str:
    """A file's name without its image suffix (``case.nii.gz`` -> ``case``)."""
    for suffix in NIFTI_SUFFIXES + IMAGE_SUFFIXES:
        if path.name.lower().endswith(suffix):
            return path.name[: -len(suffix)]
    return path.stem


def _is_input(path: Path) -> bool:
    return not path.name.startswith(".") and path.name.lower().endswith(NIFTI_SUFFIXES + IMAGE_SUFFIXES)


def discover(source: str | Path, image_column: str = "image") -> list[Item]:
    """The inputs of INPUT: a file, a folder's image files (sorted), or a CSV's ``image_column``.

    Raises:
        ValueError: INPUT missing, of an unknown type, empty, mixing volumes and images, or two inputs with
            the same output name (names the file).
    """
    src = Path(source)
    if src.is_dir():
        files = sorted(p for p in src.iterdir() if p.is_file() and _is_input(p))
        names = [case_name(p) for p in files]
        if not files:
            raise ValueError(f"{src}: no NIfTI ({', '.join(NIFTI_SUFFIXES)}) or image ({', '.join(IMAGE_SUFFIXES)}) "
                             "files in this folder")
    elif src.suffix.lower() == ".csv":
        files, names = _csv_files(src.absolute(), image_column)
    elif src.is_file() and _is_input(src):
        files, names = [src], [case_name(src)]
    elif not src.exists():
        raise FileNotFoundError(f"{src}: INPUT not found")
    else:
        raise ValueError(f"{src}: INPUT must be a NIfTI or image file, a folder of them, or a CSV listing them")
    kinds = {p.name.lower().endswith(NIFTI_SUFFIXES) for p in files}
    if len(kinds) > 1:
        raise ValueError(f"{src}: holds both NIfTI volumes and 2-D images; give one kind at a time")
    seen: dict[str, Path] = {}
    for name, path in zip(names, files):
        if name in seen:
            raise ValueError(f"{path}: its output name {name!r} is also that of {seen[name]}; rename one")
        seen[name] = path
    return [Item(n, p) for n, p in zip(names, files)]


def _csv_files(csv: Path, column: str) -> tuple[list[Path], list[str]]:
    if not csv.is_file():
        raise FileNotFoundError(f"{csv}: INPUT CSV not found")
    df = read_csv_table(csv, [column])  # the ingest's reader: one error naming the file (IngestError is a ValueError)
    files = []
    for i, cell in enumerate(df[column]):
        if not cell.strip():
            raise ValueError(f"{csv} row {i + 2}: empty {column!r}")
        files.append(source_file(csv.parent, cell.strip(), f"{csv} row {i + 2}, column {column!r}", False))
    names = [Path(f).relative_to(csv.parent).with_name(case_name(Path(f))).as_posix()
             if Path(f).is_relative_to(csv.parent) else case_name(Path(f)) for f in files]
    return files, names


def _volume_shape(path: Path, channels: int) -> tuple[int, ...]:
    import nibabel as nib

    try:
        img = nib.load(str(path))
        orientation_of(img)
    except Exception as e:  # nibabel raises many types on unreadable headers
        raise ValueError(f"{path}: cannot read NIfTI ({type(e).__name__}: {e})") from e
    shape = tuple(int(n) for n in img.shape)
    got = 1 if len(shape) == 3 else shape[3] if len(shape) == 4 else None
    if got != channels:
        raise ValueError(f"{path}: image of shape {list(shape)} has {got if got is not None else 'no'} channel(s); "
                         f"the model takes {channels} (3D for 1, 4D (X, Y, Z, {channels}) otherwise)")
    return shape


def _image_shape(path: Path) -> tuple[int, ...]:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return (im.size[1], im.size[0])
    except Exception as e:  # PIL raises many types on unreadable files
        raise ValueError(f"{path}: cannot read image ({type(e).__name__}: {e})") from e


def check_items(items: Sequence[Item], pre: Preprocessing, card: ModelCard, model: str,
                labels: str | Path | None = None) -> list[Item]:
    """Each input's header read (shape, channels) and its label file found, before anything is written.

    Args:
        items: :func:`discover`'s inputs.
        pre: The model's preprocessing.
        card: The model's card (its task).
        model: The model's name for messages.
        labels: Segmentation: a folder with a label file of each input's file name (or one file for one
            input); classification labels are read by :mod:`medcl.predict.scoring`.

    Returns:
        The items with ``shape`` (and ``label``) set.

    Raises:
        ValueError: naming the file: a volume for a 2-D model or the reverse, unreadable, wrong channel count,
            a missing label file or one of another shape.
    """
    out = []
    for item in items:
        is_volume = item.path.name.lower().endswith(NIFTI_SUFFIXES)
        if is_volume != pre.volumes:
            what = "a NIfTI volume" if is_volume else "a 2-D image"
            trained = "slices of NIfTI volumes" if pre.volumes else "2-D images"
            raise ValueError(f"{item.path}: is {what}, but {model} is a {card.task} model trained on {trained} "
                             f"({card.preprocessing.get('source_kind')} ingest); give it {trained}")
        shape = _volume_shape(item.path, pre.channels) if is_volume else _image_shape(item.path)
        label = None
        if labels is not None and card.task == "segmentation":
            label = _label_file(Path(labels), item, len(items))
            label_shape = _volume_shape(label, 1)[:3] if is_volume else _image_shape(label)
            if label_shape != shape[: len(label_shape)]:
                raise ValueError(f"{label}: label of shape {list(label_shape)} differs from the shape "
                                 f"{list(shape)} of {item.path}")
        out.append(Item(item.name, item.path, shape, label))
    return out


def _label_file(labels: Path, item: Item, n_items: int) -> Path:
    if labels.is_file() and n_items == 1:
        return labels
    if not labels.is_dir():
        raise FileNotFoundError(f"{labels}: --labels folder not found")
    candidate = labels / item.path.name
    if not candidate.is_file():
        raise FileNotFoundError(f"{candidate}: no label file for {item.path} in --labels {labels}")
    return candidate


def read_inputs(batch: Mapping[str, np.ndarray], *, volumes: bool, size: int, channels: int, normalisation: str,
                axis: int) -> dict[str, np.ndarray]:
    """Model-input rows of a batch of inputs (``index``, ``path``), preprocessed as the ingest did.

    An input that fails gives one row whose ``error`` names it (the driver raises it); the others give
    ``error`` "".

    Returns:
        ``index`` (S,), ``slice`` (S,), ``image`` float32 (S, C, size, size), ``error`` (S,) str.
    """
    index, slices, images, errors = [], [], [], []
    for i, path in zip(batch["index"], batch["path"]):
        p = Path(str(path))
        try:
            if volumes:
                x = volume_slices(check_volume(load_nifti(p)[0], p, channels), axis=axis, size=size,
                                  normalisation=normalisation)
            else:
                x = preprocess_image(p, channels=channels, normalisation=normalisation, size=size)[None]
            err = ""
        except (IngestError, ValueError) as e:
            x, err = np.zeros((1, channels, size, size), np.float32), str(e)
        index.append(np.full(len(x), int(i), np.int64))
        slices.append(np.arange(len(x), dtype=np.int64))
        images.append(x)
        errors.extend([err] * len(x))
    return {"index": np.concatenate(index), "slice": np.concatenate(slices), "image": np.concatenate(images),
            "error": np.array(errors, dtype=object)}
