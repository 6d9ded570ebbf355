"""Self-describing model artifacts: a fine-tuned checkpoint as ``model.safetensors`` + ``model.json``.

An export directory holds everything needed to use the model, and nothing that runs code::

    model.safetensors   the network's weights (safetensors: tensors only, no pickle)
    model.json          the model card: task, architecture and its settings, in_channels,
                        num_classes, label map / class names, the ingest preprocessing
                        (source kind, size, normalisation, slice axis, channels), the
                        dataset's path and fingerprint, the stage's metrics, which weights
                        (best validation epoch or last), the job key, when it was made

:func:`export_model` reads a fine-tuning checkpoint (``seg_finetune``, ``cls_finetune``)
and the dataset it was trained on (the path its run recorded in ``stage.json`` or a
pipeline's ``plan.json``, or ``dataset_dir``); :func:`export_job` finds a pipeline job's
checkpoint in ``<storage_path>/<name>/checkpoints.json``. :func:`load_model` rebuilds the
network from the directory alone, in eval mode (:mod:`medcl.model_card`).

Example:
    >>> export_model("medcl_runs/quickstart/wave2/.../checkpoint_000019", "models/seg")  # doctest: +SKIP
    >>> net, card = load_model("models/seg")  # doctest: +SKIP
    >>> net(torch.zeros(1, card.in_channels, *card.image_size)).shape  # (1, K, H, W)  # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from medcl.model_card import CARD_FILE, FORMAT_VERSION, WEIGHTS_FILE, ModelCard, build_network, load_model, load_strict
from medcl.storage import atomic_dir, is_uri, local_copy, read_json, refuse_occupied

__all__ = ["CARD_FILE", "WEIGHTS_FILE", "EXPORTABLE", "ModelCard", "export_model", "export_job", "job_checkpoint",
           "load_model"]

logger = logging.getLogger(__name__)

#: Stage kind -> task of the models that can be exported (fine-tuned ones).
EXPORTABLE = {"seg_finetune": "segmentation", "cls_finetune": "classification"}
_ARCHITECTURES = {"segmentation": "unet", "classification": "resnet_classifier"}
_SEARCH_UP = 4  # how many folders above a checkpoint to look for its run's stage.json / plan.json


# ----------------------------------------------------------------------------- where a checkpoint came from
def _parents(path: str) -> list[str]:
    """Up to ``_SEARCH_UP`` folders above ``path`` (a local path or a URI), nearest first."""
    if not is_uri(path):
        return [str(p) for p in Path(path).resolve().parents[:_SEARCH_UP]]
    scheme, rest = path.split("://", 1)
    parts = rest.rstrip("/").split("/")
    return [f"{scheme}://{'/'.join(parts[:n])}" for n in range(len(parts) - 1, 0, -1)][:_SEARCH_UP]


def _same(a: str, b: str) -> bool:
    if is_uri(a) or is_uri(b):
        return a.rstrip("/") == b.rstrip("/")
    return os.path.realpath(a) == os.path.realpath(b)


def _run_record(checkpoint: str) -> dict[str, Any]:
    """What the runs above ``checkpoint`` recorded: ``dataset``, ``job`` (from a pipeline's ``checkpoints.json``).

    The nearest ``stage.json`` (a single-stage run, or a pipeline job's Train run) or ``plan.json``
    (a pipeline) gives the dataset; a pipeline's ``checkpoints.json`` the job key.
    """
    from medcl.runner.pipeline import CHECKPOINTS_FILE
    from medcl.runner.plan import PLAN_FILE
    from medcl.train.run_record import STAGE_FILE

    out: dict[str, Any] = {}
    for root in _parents(checkpoint):
        stage = read_json(root, STAGE_FILE)
        if stage is not None:
            out.setdefault("dataset", stage.get("dataset"))
            out.setdefault("manifest_sha256", stage.get("manifest_sha256"))
            continue
        plan = read_json(root, PLAN_FILE)
        if plan is not None:
            out.setdefault("dataset", plan.get("dataset"))
            listed = read_json(root, CHECKPOINTS_FILE) or {}
            out["job"] = next((key for key, path in listed.items() if path and _same(path, checkpoint)), None)
            break
    return out


def job_checkpoint(run_dir: str | os.PathLike, job: str) -> str:
    """The checkpoint of pipeline job ``job``, from ``<run_dir>/checkpoints.json``.

    Raises:
        FileNotFoundError: ``run_dir`` has no ``checkpoints.json`` (not a pipeline run, or no wave finished).
        ValueError: ``job`` is not listed (the message lists some keys that are), or has no checkpoint.
    """
    from medcl.runner.pipeline import CHECKPOINTS_FILE

    listed = read_json(str(run_dir), CHECKPOINTS_FILE)
    if listed is None:
        raise FileNotFoundError(f"{run_dir}/{CHECKPOINTS_FILE} not found: give a pipeline's run directory "
                                "(<storage_path>/<name>) after at least one wave finished, or a checkpoint directory")
    if job not in listed:
        keys = sorted(listed)
        shown = ", ".join(keys[:5]) + (f", ... ({len(keys)} jobs)" if len(keys) > 5 else "")
        raise ValueError(f"job {job!r} is not in {run_dir}/{CHECKPOINTS_FILE}; its jobs: {shown or 'none'}")
    if not listed[job]:
        raise ValueError(f"job {job!r} of {run_dir} finished without a checkpoint; re-run the pipeline to resume it")
    return str(listed[job])


# ----------------------------------------------------------------------------- export
def _chosen_weights(root: Path, meta: dict[str, Any], weights: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The state dict ``weights`` names ("best": the selection's, "last": ``model.pt``) and what it is."""
    from medcl.train.checkpoints import load_model_weights
    from medcl.train.selection import SELECTION_FILE

    last = int(meta["epoch"])
    selection = None
    if weights == "best" and (root / SELECTION_FILE).is_file():
        selection = torch.load(root / SELECTION_FILE, map_location="cpu", weights_only=True)
    if selection is None or selection.get("epoch") is None:
        if weights == "best":
            logger.warning("%s has no best validation epoch (trained with val_every: 0, or no finite validation "
                           "value): exporting the last epoch's weights", root)
        return load_model_weights(root), {"which": "last", "epoch": last, "requested": weights}
    epoch = int(selection["epoch"])
    state = selection.get("state_dict")
    if state is None:
        if epoch != last:
            raise ValueError(f"{root / SELECTION_FILE} names best epoch {epoch} without its weights; export "
                             "--weights last")
        state = load_model_weights(root)
    return dict(state), {"which": "best", "epoch": epoch, "requested": weights, "selection_metric":
                         selection.get("metric"), "selection_value": selection.get("value")}


def _finite(value: Any) -> Any:
    """JSON without NaN/inf (they become null), recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _metrics_of(stage_metrics: Mapping[str, Any], which: str) -> dict[str, Any]:
    """The evaluation metrics of the exported weights: ``best/*`` without its prefix, or the last epoch's."""
    if which == "best":
        return {k[len("best/"):]: v for k, v in stage_metrics.items() if k.startswith("best/") and k != "best/epoch"}
    return {k: v for k, v in stage_metrics.items() if k.split("/", 1)[0] in ("test", "shifted", "val")}


def _preprocessing(manifest: Any) -> dict[str, Any]:
    """What the ingest did to the images: the manifest's source kind and options, size, channels, normalisation."""
    source = manifest.source or {}
    out = {"source_kind": source.get("kind"), "size": list(manifest.image_shape[1:]),
           "channels": int(manifest.image_shape[0]), "normalisation": manifest.normalisation,
           "ingest_options": dict(source.get("options") or {})}
    out.update({k: manifest.extras[k] for k in ("axis", "axis_name", "orientation", "modalities")
                if k in manifest.extras})
    return out


def _card(meta: dict[str, Any], manifest: Any, dataset_dir: Path, chosen: dict[str, Any], job: str | None,
          checkpoint: str) -> ModelCard:
    from medcl import __version__
    from medcl.data.schema import MANIFEST_NAME

    config = meta["config"]
    task = EXPORTABLE[config["kind"]]
    if task == "classification":
        num_classes, multilabel = max(1, len(manifest.class_names)), manifest.task == "multilabel"
    else:  # as medcl.train.driver.stage_inputs sizes the network
        num_classes, multilabel = max(2, len(manifest.label_map)), False
    digest = hashlib.sha256((dataset_dir / MANIFEST_NAME).read_bytes()).hexdigest()
    stage_metrics = dict(meta.get("metrics") or {})
    return ModelCard(
        task=task, stage_kind=config["kind"], architecture=_ARCHITECTURES[task], model_spec=dict(config["model"]),
        in_channels=int(manifest.image_shape[0]), num_classes=num_classes, label_map=dict(manifest.label_map),
        class_names=tuple(manifest.class_names), multilabel=multilabel, preprocessing=_preprocessing(manifest),
        dataset={"path": str(dataset_dir), "fingerprint": manifest.fingerprint, "manifest_sha256": digest,
                 "task": manifest.task},
        metrics=_metrics_of(stage_metrics, chosen["which"]), stage_metrics=stage_metrics, weights=chosen, job=job,
        format_version=FORMAT_VERSION, medcl_version=__version__,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        source={"checkpoint": checkpoint, "config": config})


def _dataset_for(checkpoint: str, dataset_dir: str | os.PathLike | None, record: dict[str, Any]) -> Path:
    if dataset_dir is not None:
        if record.get("dataset") and not _same(str(dataset_dir), record["dataset"]):
            logger.warning("exporting %s with dataset %s; its run recorded %s", checkpoint, dataset_dir,
                           record["dataset"])
        return Path(dataset_dir).resolve()
    recorded = record.get("dataset")
    if not recorded:
        raise ValueError(f"{checkpoint}: no stage.json or plan.json above it records its dataset; pass --data "
                         "DATASET_DIR (dataset_dir=), the dataset it was trained on")
    if not Path(recorded).is_dir():
        raise ValueError(f"{checkpoint}: its run recorded dataset {recorded}, which is gone; pass --data "
                         "DATASET_DIR (dataset_dir=), the dataset it was trained on")
    return Path(recorded)


def export_model(checkpoint_dir: str | os.PathLike, out_dir: str | os.PathLike, *, weights: str = "best",
                 dataset_dir: str | os.PathLike | None = None, job: str | None = None, force: bool = False) -> Path:
    """Write a fine-tuned checkpoint as ``out_dir/model.safetensors`` + ``out_dir/model.json``.

    Args:
        checkpoint_dir: A checkpoint directory (``meta.json``, ``model.pt``, maybe ``selection.pt``) of a
            ``seg_finetune`` or ``cls_finetune`` stage, local or a URI.
        out_dir: Directory to create; written under a temporary name beside it, then renamed.
        weights: "best" (the best validation epoch's weights; the last epoch's when the stage did not
            select) or "last".
        dataset_dir: The dataset it was trained on; default: the one its run recorded (``stage.json`` of a
            single-stage run, ``plan.json`` of a pipeline, in a folder above the checkpoint).
        job: The pipeline job key to record (default: looked up in the pipeline's ``checkpoints.json``).
        force: Replace an existing non-empty ``out_dir``.

    Returns:
        ``out_dir``.

    Raises:
        ValueError: A pretraining checkpoint, a bad ``weights``, an existing ``out_dir`` without ``force``, no
            dataset known (pass ``dataset_dir``), or weights that do not fit the dataset's channels/classes.
        FileNotFoundError: ``checkpoint_dir`` is not a complete checkpoint, or the dataset has no manifest.
    """
    from safetensors.torch import save_file

    from medcl.data.manifest import read_manifest
    from medcl.train.checkpoints import META_FILE

    if weights not in ("best", "last"):
        raise ValueError(f"weights must be 'best' or 'last', got {weights!r}")
    checkpoint, out = str(checkpoint_dir), Path(out_dir).absolute()
    refuse_occupied(out, force)  # before any work
    with local_copy(checkpoint) as root:
        if not (root / META_FILE).is_file():
            raise FileNotFoundError(f"{checkpoint}/{META_FILE} not found: not a complete medcl checkpoint directory")
        meta = json.loads((root / META_FILE).read_text(encoding="utf-8"))
        kind = (meta.get("config") or {}).get("kind")
        if kind is None:
            raise ValueError(f"{checkpoint}/{META_FILE} records no stage kind (config.kind); not a medcl stage "
                             "checkpoint")
        if kind not in EXPORTABLE:
            raise ValueError(f"{checkpoint} is a {kind} checkpoint; only fine-tuned models "
                             f"({', '.join(EXPORTABLE)}) can be exported (a pretrained encoder is not a model "
                             "of images to labels: export the fine-tune that started from it)")
        state, chosen = _chosen_weights(root, meta, weights)
    record = _run_record(checkpoint)
    dataset = _dataset_for(checkpoint, dataset_dir, record)
    card = _card(meta, read_manifest(dataset), dataset, chosen, job or record.get("job"), checkpoint)
    network = build_network(card.task, card.model_spec, card.in_channels, card.num_classes, card.multilabel)
    load_strict(network, state, f"{checkpoint} with dataset {dataset}")  # channels and classes fit the dataset
    if record.get("manifest_sha256") not in (None, card.dataset["manifest_sha256"]):
        logger.warning("%s: the manifest of dataset %s changed since the run started (re-ingested?); the card "
                       "describes it as it is now", checkpoint, dataset)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in network.state_dict().items()}
    with atomic_dir(out) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "card": CARD_FILE})
        digest = hashlib.sha256((tmp / WEIGHTS_FILE).read_bytes()).hexdigest()
        card = dataclasses.replace(card, weights={**card.weights, "sha256": digest})
        (tmp / CARD_FILE).write_text(json.dumps(_finite(card.to_dict()), indent=2, allow_nan=False) + "\n",
                                     encoding="utf-8")
    logger.info("exported %s (%s, %s weights of epoch %d) to %s", checkpoint, card.task, chosen["which"],
                chosen["epoch"], out)
    return out


def export_job(run_dir: str | os.PathLike, job: str, out_dir: str | os.PathLike, **kwargs: Any) -> Path:
    """:func:`export_model` of pipeline job ``job`` of the run ``run_dir`` (``<storage_path>/<name>``)."""
    return export_model(job_checkpoint(run_dir, job), out_dir, job=job, **kwargs)


