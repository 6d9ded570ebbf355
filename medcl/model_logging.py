"""A pipeline's fine-tuned jobs as MLflow models: export each checkpoint, log it to the job's run.

``medcl run`` hands :func:`log_job_models` to :func:`medcl.runner.pipeline.run_pipeline` as
``after_wave``: once a wave's checkpoints are recorded (``checkpoints.json``, tag
``medcl.checkpoint``), on the driver, each finished ``seg_finetune`` / ``cls_finetune`` job whose
run has no model yet is exported as ``medcl export`` does (the best validation epoch's weights,
:func:`medcl.export.export_model`), loaded back (:func:`medcl.model_card.load_model`) and logged
with :func:`medcl.tracking.models.log_pytorch_model`. The checkpoint is only read: a model that
cannot be logged is a warning, and the next run of the same pipeline tries again (the run has
no ``medcl.model_id`` tag).

This module sits above both :mod:`medcl.runner` and :mod:`medcl.export` (which reads
the runner's file names), so the runner calls it only through the hook.
"""
from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

from medcl.tracking import TrackingTarget, search_runs
from medcl.tracking.models import MODEL_ID_TAG, log_pytorch_model

__all__ = ["log_job_models"]

logger = logging.getLogger(__name__)


def log_job_models(target: TrackingTarget, parent_run_id: str, checkpoints: Mapping[str, str | None],
                   finished: Iterable[str], dataset_dir: str) -> dict[str, str]:
    """Log the fine-tuned model of each job of ``finished`` that has none yet to its MLflow run.

    Args:
        target: The pipeline's store.
        parent_run_id: The pipeline's run (the jobs' runs are its children, named by job key).
        checkpoints: Job key -> checkpoint (``checkpoints.json``).
        finished: Keys of the jobs to consider (a wave's).
        dataset_dir: The dataset the jobs trained on.

    Returns:
        Job key -> logged model id, for the models logged now.
    """
    from medcl.export import EXPORTABLE, export_model
    from medcl.model_card import CARD_FILE, load_model

    children = search_runs(target, parent_run_id=parent_run_id)
    rows = {r["run_name"]: r for r in children.to_dict("records")} if len(children) else {}
    logged: dict[str, str] = {}
    for key in finished:
        row, checkpoint = rows.get(key), checkpoints.get(key)
        if row is None or checkpoint is None or row.get("params.kind") not in EXPORTABLE:
            continue
        if isinstance(row.get(f"tags.{MODEL_ID_TAG}"), str):
            continue  # logged by an earlier start of this pipeline
        try:
            with tempfile.TemporaryDirectory(prefix="medcl-model-") as tmp:
                export = export_model(checkpoint, Path(tmp) / "export", dataset_dir=dataset_dir, job=key)
                network, card = load_model(export)
                tags = {"medcl.job": key, "medcl.method": row.get("params.method"),
                        "medcl.label_fraction": row.get("params.label_fraction"),
                        "medcl.seed": row.get("params.seed"), "medcl.checkpoint": checkpoint,
                        "medcl.weights": card.weights.get("which")}
                card_json = json.loads((export / CARD_FILE).read_text(encoding="utf-8"))  # NaN-free, as written
                logged[key] = log_pytorch_model(target, row["run_id"], network, card_json, export / CARD_FILE,
                                                name=key, tags=tags)
        except Exception:  # the checkpoint is safe in storage: a model is a view of it, retried next start
            logger.warning("could not log the MLflow model of job %s (checkpoint %s kept); running the same "
                           "pipeline again retries", key, checkpoint, exc_info=True)
    if logged:
        logger.info("logged %d MLflow model(s): %s", len(logged), ", ".join(sorted(logged)))
    return logged
