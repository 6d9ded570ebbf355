"""``medcl predict``: an exported model over a folder of volumes or images, on Ray Data, written back as files.

Steps: read the model's card (:mod:`~medcl.predict.inputs`), find and check every input (and
label file) — any problem is one ``ValueError`` naming the file, before anything is written
— then stream the inputs through :func:`medcl.runner.batch_inference.run_batch_inference`
(read tasks preprocess as the ingest did; an actor pool runs the model) and assemble the
rows on the driver: a volume's slices are resized back (nearest) to the input's in-plane
size, stacked along the slice axis and put back in the input's own orientation
(:func:`~medcl.data.sources.orientation.from_canonical`), then written as NIfTI with the
input's affine and header; a 2-D input's mask as PNG; a classifier's probabilities as
``predictions.csv``. Everything is written into a staging folder beside ``out`` that
becomes ``out`` only when all of it succeeded (:func:`medcl.storage.atomic_dir`).
"""
from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medcl.data.sources.common import resize_masks
from medcl.data.sources.orientation import OrientationInfo, from_canonical, orientation_of
from medcl.data.sources.preprocess import load_nifti, read_image
from medcl.model_card import CARD_FILE, ModelCard
from medcl.predict.inputs import Item, Preprocessing, check_items, discover, preprocessing_of, read_card, read_inputs
from medcl.predict.model_udf import ExportedModel
from medcl.predict.scoring import auc_summary, case_dice, dice_summary, read_class_labels

__all__ = ["PredictResult", "predict", "model_directory", "PREDICTIONS_CSV", "METRICS_CSV", "METRICS_JSON",
           "PANEL_PNG"]

logger = logging.getLogger(__name__)

PREDICTIONS_CSV, METRICS_CSV, METRICS_JSON, PANEL_PNG = "predictions.csv", "metrics.csv", "metrics.json", "panel.png"


@dataclass
class PredictResult:
    """What :func:`predict` wrote: ``out``, the task, inputs and model-input images (slices) predicted, the files,
    the ``--labels`` summary (None without labels) and the seconds the prediction took (Ray start-up excluded)."""

    out: Path
    task: str
    inputs: int
    images: int
    files: list[str] = field(default_factory=list)
    metrics: dict[str, Any] | None = None
    seconds: float = 0.0


@contextlib.contextmanager
def model_directory(model: str | Path, job: str | None = None) -> Iterator[Path]:
    """An export directory for MODEL: itself, or a temporary export of a checkpoint or of a pipeline ``job``."""
    from medcl.export import export_job, export_model
    from medcl.train.checkpoints import META_FILE

    root = Path(model)
    if job is None and ((root / CARD_FILE).is_file() or not (root / META_FILE).is_file()):
        yield root  # an export (read_card says what is missing otherwise)
        return
    with tempfile.TemporaryDirectory(prefix="medcl-predict-") as tmp:
        out = Path(tmp) / "model"
        export_job(str(root), job, out) if job is not None else export_model(str(root), out)
        yield out


def _class_names(card: ModelCard) -> list[str]:
    if card.task == "segmentation":
        return [card.label_map.get(c, f"class_{c}") for c in range(1, card.num_classes)]
    return list(card.class_names) or [str(k) for k in range(card.num_classes)]


class _Writer:
    """Assembles the rows of each input and writes its output into the staging folder."""

    def __init__(self, tmp: Path, items: list[Item], pre: Preprocessing, card: ModelCard, scored: bool) -> None:
        from medcl.train.figures.panel import PanelCases

        self.tmp, self.items, self.pre, self.card = tmp, items, pre, card
        self.infos: dict[int, OrientationInfo] = {}
        self.expected = {}
        for i, item in enumerate(items):
            if pre.volumes:
                import nibabel as nib

                self.infos[i] = orientation_of(nib.load(str(item.path)))
                self.expected[i] = self.infos[i].canonical_shape[pre.axis]
            else:
                self.expected[i] = 1
        self.parts: dict[int, dict[int, Any]] = {}
        self.images: dict[int, dict[int, np.ndarray]] = {}
        self.probs: dict[int, np.ndarray] = {}
        self.rows: list[dict[str, Any]] = []
        self.files: list[str] = []
        self.count = 0
        self.names = _class_names(card)
        self.panel = PanelCases(card.num_classes, seed=0) if scored and card.task == "segmentation" else None

    def add(self, batch: dict[str, np.ndarray]) -> None:
        errors = [e for e in batch["error"] if e]
        if errors:
            raise ValueError(str(errors[0]))
        key = "pred" if self.card.task == "segmentation" else "probs"
        for n, (i, s) in enumerate(zip(batch["index"].tolist(), batch["slice"].tolist())):
            self.parts.setdefault(i, {})[s] = batch[key][n]
            if self.panel is not None:
                self.images.setdefault(i, {})[s] = batch["image"][n]
            if len(self.parts[i]) == self.expected[i]:
                self._finish(i)

    def _finish(self, i: int) -> None:
        parts = self.parts.pop(i)
        stacked = np.stack([parts[s] for s in range(len(parts))])
        self.count += len(stacked)
        if self.card.task == "classification":
            self.probs[i] = stacked[0]
            return
        item = self.items[i]
        label = None
        if self.pre.volumes:
            native, label, model_label = self._volume(i, item, stacked)
        else:
            native = resize_masks(stacked, item.shape[:2])[0].astype(stacked.dtype)
            name = f"{item.name}.png"
            (self.tmp / name).parent.mkdir(parents=True, exist_ok=True)
            _write_png(native, self.tmp / name)
            self.files.append(name)
            if item.label is not None:
                label = read_image(item.label)
                label = label[..., 0] if label.ndim == 3 else label
                model_label = resize_masks(label[None], self.pre.size)
        if label is not None:
            self._score(i, item, native, label, stacked, model_label)

    def _volume(self, i: int, item: Item, stacked: np.ndarray) -> tuple[np.ndarray, Any, Any]:
        import nibabel as nib

        info, axis = self.infos[i], self.pre.axis
        h, w = (n for d, n in enumerate(info.canonical_shape) if d != axis)
        canonical = np.moveaxis(resize_masks(stacked, (h, w)).astype(stacked.dtype), 0, axis)
        native = np.ascontiguousarray(from_canonical(canonical, info))
        img = nib.load(str(item.path))
        header = img.header.copy()
        header.set_data_dtype(native.dtype)
        out_img = type(img)(native, img.affine, header) if isinstance(img, nib.Nifti1Image) else \
            nib.Nifti1Image(native, img.affine)
        out_img.header.set_slope_inter(1.0, 0.0)
        name = f"{item.name}{'.nii' if item.path.name.lower().endswith('.nii') else '.nii.gz'}"
        nib.save(out_img, str(self.tmp / name))
        self.files.append(name)
        if item.label is None:
            return native, None, None
        label, _ = load_nifti(item.label, "label")  # canonical, for the panel
        model_label = resize_masks(np.moveaxis(np.rint(label).astype(np.int64), axis, 0), self.pre.size)
        return native, np.rint(np.asarray(nib.load(str(item.label)).dataobj)).astype(np.int64), model_label

    def _score(self, i: int, item: Item, native: np.ndarray, label: np.ndarray, stacked: np.ndarray,
               model_label: np.ndarray) -> None:
        k = self.card.num_classes
        bad = np.unique(label[(label < 0) | (label >= k)])
        if bad.size:
            raise ValueError(f"{item.label}: label values {bad[:10].tolist()} outside the model's classes 0..{k - 1}")
        dice = case_dice(native, label, k)
        finite = [v for v in dice.values() if not math.isnan(v)]
        row = {"case": item.name, **{f"dice_{self.names[c - 1]}": v for c, v in dice.items()},
               "dice_mean": float(np.mean(finite)) if finite else math.nan}
        self.rows.append(row)
        images = np.stack([self.images[i][s] for s in range(len(stacked))])
        del self.images[i]
        self.panel.update(images, model_label, stacked.astype(np.int64), [f"{item.name}:{s}" for s in
                                                                        range(len(stacked))])

    def close(self, class_targets: dict[Path, Any] | None) -> dict[str, Any] | None:
        """Write the classifier's CSV and the ``--labels`` metrics and panel; the summary (None without labels)."""
        if self.parts:
            missing = self.items[min(self.parts)].path
            raise RuntimeError(f"{missing}: not every slice came back from the model")
        if self.card.task == "classification":
            return self._close_classification(class_targets)
        if not self.rows:
            return None
        self.rows.sort(key=lambda r: r["case"])
        _write_csv(self.tmp / METRICS_CSV, self.rows)
        summary = dice_summary(self.rows, self.names)
        if self.panel is not None and self.panel.panel(self.tmp / PANEL_PNG, class_names=self.card.label_map):
            self.files.append(PANEL_PNG)
        (self.tmp / METRICS_JSON).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        self.files += [METRICS_CSV, METRICS_JSON]
        return summary

    def _close_classification(self, class_targets: dict[Path, Any] | None) -> dict[str, Any] | None:
        names = self.names
        rows = []
        for i, item in enumerate(self.items):
            p = self.probs[i]
            rows.append({"image": item.name, "path": str(item.path),
                         "predicted": names[int(np.argmax(p))] if not self.card.multilabel else
                         "|".join(n for n, v in zip(names, p) if v >= 0.5),
                         **{n: float(v) for n, v in zip(names, p)}})
        _write_csv(self.tmp / PREDICTIONS_CSV, rows)
        self.files.append(PREDICTIONS_CSV)
        if class_targets is None:
            return None
        scored = [(i, class_targets[item.path.resolve()]) for i, item in enumerate(self.items)
                  if item.path.resolve() in class_targets]
        if not scored:
            raise ValueError("--labels: none of the inputs has a label in the labels CSV (matched by image path)")
        probs = np.stack([self.probs[i] for i, _ in scored])
        targets = np.stack([np.asarray(t) for _, t in scored])
        summary = auc_summary(probs, targets, names, self.card.multilabel)
        _write_csv(self.tmp / METRICS_CSV, [{"class": n, "auc": v} for n, v in summary["per_class"].items()]
                   + [{"class": "macro", "auc": summary["auc"]}])
        (self.tmp / METRICS_JSON).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        self.files += [METRICS_CSV, METRICS_JSON]
        return summary


def _write_png(mask: np.ndarray, path: Path) -> None:
    from PIL import Image

    Image.fromarray(mask.astype(np.uint8 if mask.max(initial=0) < 256 else np.uint16)).save(path, format="PNG")


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def predict(model: str | Path, source: str | Path, out: str | Path, *, labels: str | Path | None = None,
            job: str | None = None, num_workers: int = 1, use_gpu: bool = False, batch_size: int = 64,
            cpus_per_worker: float = 1.0, force: bool = False, image_column: str = "image",
            label_column: str = "label", address: str | None = None, verbose: bool = False) -> PredictResult:
    """Predict every input of ``source`` with ``model`` into ``out`` (see the module doc).

    Args:
        model: An export directory, a fine-tuning checkpoint, or (with ``job``) a pipeline's run directory.
        source: A NIfTI or image file, a folder of them, or a CSV listing them (``image_column``).
        out: Output folder, created whole on success (must not exist or be empty unless ``force``).
        labels: Segmentation: a folder of label files named as the inputs; classification: a CSV with
            ``image_column`` and ``label_column``. Adds ``metrics.csv``, ``metrics.json`` (and ``panel.png``).
        job: The pipeline job key, when ``model`` is a pipeline's run directory.
        num_workers, use_gpu, batch_size, cpus_per_worker: The actor pool (:func:`run_batch_inference`).
        force: Replace a non-empty ``out``.
        image_column, label_column: CSV columns.
        address, verbose: Ray cluster to join (default: a local Ray, started once the inputs are checked).

    Raises:
        ValueError / FileNotFoundError: a bad model, input or label (names the file); ``out`` is then untouched.
    """
    from medcl.runner.batch_inference import run_batch_inference
    from medcl.runner.session import init_ray
    from medcl.storage import atomic_dir, refuse_occupied

    refuse_occupied(Path(out).absolute(), force)
    with model_directory(model, job) as model_dir:
        card = read_card(model_dir)
        pre = preprocessing_of(card, str(model))
        items = check_items(discover(source, image_column), pre, card, str(model), labels)
        targets = (read_class_labels(labels, label_column, image_column, card.class_names or _class_names(card),
                                     card.multilabel) if labels is not None and card.task == "classification"
                   else None)
        init_ray(address, verbose=verbose)  # no-op when Ray is up
        start = time.perf_counter()
        with atomic_dir(Path(out).absolute()) as tmp:
            writer = _Writer(tmp, items, pre, card, scored=labels is not None)
            rows = [{"index": i, "path": str(item.path)} for i, item in enumerate(items)]
            device = "cuda" if use_gpu else "cpu"
            for batch in run_batch_inference(
                    rows, read_inputs, ExportedModel, read_kwargs=pre.to_kwargs(),
                    model_kwargs={"model_dir": str(Path(model_dir).absolute()), "device": device,
                                  "threads": max(1, int(cpus_per_worker)), "keep_images": writer.panel is not None},
                    num_workers=num_workers, use_gpu=use_gpu, batch_size=batch_size, cpus_per_worker=cpus_per_worker,
                    items_per_read=1 if pre.volumes else 32):
                writer.add(batch)
            summary = writer.close(targets)
        seconds = time.perf_counter() - start
    return PredictResult(Path(out), card.task, len(items), writer.count, writer.files, summary, seconds)
