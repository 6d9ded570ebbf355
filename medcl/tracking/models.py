"""MLflow models of fine-tuned networks: log one to its run, register the best of a pipeline.

:func:`log_pytorch_model` logs a network (an export loaded with :func:`medcl.model_card.load_model`)
as an MLflow 3 *logged model* of the PyTorch flavour, linked to the job's run: serialised as
``pt2`` (``torch.export``; loading needs neither pickle nor medcl), with a tensor signature
``(-1, C, H, W) -> (-1, K, H, W)`` (segmentation) or ``-> (-1, K)`` (classification) taken from
running it on an example batch of the card's shape, the model card as the MLmodel ``metadata``
and ``model.json`` among its files (``extra_files/model.json``, and the run's artifact
``model_card/model.json``). The model is created PENDING, marked READY once every file is
stored and only then named on the run (tag ``medcl.model_id``): a run without the tag has no
usable model, whatever a failure left behind (the model is marked FAILED when possible).

:func:`register_best_models` registers, per method x labelled fraction of a pipeline, the job
whose validation value is best (``best/val/<selection metric>``: the selection metric of the
stage's model selection, ``val/dice_2d`` / ``val/patient_auc``; never a test metric) as a
version of the registered model ``<name>-<method>-<fraction>``. The registry needs a
database-backed store (``sqlite:///...``, medcl's default, or a server backed by one):
:func:`check_registry` says so in one :class:`~medcl.tracking.store.TrackingError`.

Example:
    >>> model_id = log_pytorch_model(target, run_id, net, card.to_dict(), "export/model.json")  # doctest: +SKIP
    >>> net2 = mlflow.pytorch.load_model(f"models:/{model_id}")  # doctest: +SKIP
    >>> register_best_models(target, parent_run_id, "hippo")  # doctest: +SKIP
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from medcl.config.metrics import BEST_PREFIX, VALIDATION, VALIDATION_PREFIX
from medcl.tracking.logger import RunLogger
from medcl.tracking.runs import search_runs
from medcl.tracking.store import TrackingError, TrackingTarget, client_for, import_mlflow

__all__ = ["MODEL_ID_TAG", "RegisteredJob", "check_registry", "log_pytorch_model", "registered_name",
           "register_best_models"]

logger = logging.getLogger(__name__)

MODEL_ID_TAG = "medcl.model_id"   # on a job's run: its READY logged model
CARD_ARTIFACT = "model_card"      # run artifact folder of model.json
_EXAMPLE_BATCH = 2                # > 1, so that the batch dimension is exported as dynamic


@contextlib.contextmanager
def _global_tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's process-wide tracking URI set to ``uri`` (``log_model`` reads it), then restored exactly."""
    mlflow = import_mlflow()
    from mlflow.tracking._tracking_service import utils

    saved, saved_env = utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved)
        if saved_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved_env


def _model_name(text: str) -> str:
    """A logged-model name (MLflow refuses ``/ : . % " '``)."""
    return re.sub(r"[/:.%\"']+", "_", text).strip("_") or "model"


def log_pytorch_model(target: TrackingTarget, run_id: str, network: Any, card: Mapping[str, Any],
                      card_path: str | os.PathLike[str], *, name: str | None = None,
                      tags: Mapping[str, Any] | None = None) -> str:
    """Log ``network`` as the PyTorch-flavour MLflow model of run ``run_id``; returns the logged model's id.

    Args:
        target: The store (the run's experiment is used).
        run_id: The job's run: the model's source run.
        network: The fine-tuned network in eval mode (``(B, C, H, W)`` float images).
        card: The model card as ``model.json`` holds it (JSON: no NaN): ``in_channels`` and
            ``preprocessing.size`` give the example batch; stored as the MLmodel ``metadata``.
        card_path: The export's ``model.json``, stored with the model and on the run.
        name: The logged model's name (default: the card's job key, made valid).
        tags: Tags of the logged model.

    Raises:
        Exception: whatever MLflow or ``torch.export`` raised; the model, if created, is marked FAILED
            and the run gets no ``medcl.model_id`` tag.
    """
    import numpy as np
    import torch

    mlflow = import_mlflow()
    import mlflow.pytorch
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    client = client_for(target.tracking_uri)
    run = client.get_run(run_id)
    height, width = (int(v) for v in card["preprocessing"]["size"])
    example = np.random.default_rng(0).standard_normal(
        (_EXAMPLE_BATCH, int(card["in_channels"]), height, width)).astype(np.float32)
    with torch.no_grad():
        output = network(torch.from_numpy(example)).detach().cpu().numpy()
    signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *example.shape[1:]), "image")]),
                               outputs=Schema([TensorSpec(np.dtype(output.dtype), (-1, *output.shape[1:]), "logits")]))
    model = client.create_logged_model(run.info.experiment_id, name=_model_name(name or card.get("job") or "model"),
                                       source_run_id=run_id, model_type=str(card.get("task") or "") or None,
                                       tags={str(k): str(v) for k, v in (tags or {}).items()})
    try:
        with _global_tracking_uri(target.tracking_uri):
            mlflow.pytorch.log_model(
                network, model_id=model.model_id, run_id=run_id, signature=signature, input_example=example,
                serialization_format="pt2", metadata={"medcl_model_card": dict(card)},
                extra_files=[str(card_path)], pip_requirements=[f"torch>={torch.__version__.split('+')[0]}"],
                validate_serving_input=False)  # a tensor signature: MLflow's JSON check cannot feed it
        RunLogger(target, run_id).log_artifact(card_path, CARD_ARTIFACT)
        client.finalize_logged_model(model.model_id, "READY")
    except BaseException:
        with contextlib.suppress(Exception):
            client.finalize_logged_model(model.model_id, "FAILED")
        raise
    RunLogger(target, run_id).set_tags({MODEL_ID_TAG: model.model_id})
    return model.model_id


# ----------------------------------------------------------------------------- registry
def check_registry(target: TrackingTarget) -> None:
    """Raise a :class:`TrackingError` unless the store has a usable model registry."""
    mlflow = import_mlflow()
    try:
        client_for(target.tracking_uri).search_registered_models(max_results=1)
    except mlflow.exceptions.MlflowException as e:
        raise TrackingError(_no_registry(target, e)) from e


def _no_registry(target: TrackingTarget, error: Exception) -> str:
    return (f"the MLflow store {target.tracking_uri} cannot register models ({str(error).splitlines()[0][:300]}); "
            "the Model Registry needs a database-backed store: medcl's default sqlite:///<workdir>/mlflow.db, or "
            "a server started with --backend-store-uri sqlite:///mlflow.db (or postgresql://...)")


def registered_name(prefix: str, method: str, fraction: Any) -> str:
    """``<prefix>-<method>-<fraction>`` (``hippo-global+local-0.05``); the fraction as the shortest decimal.

    Raises:
        ValueError: the name would hold ``/`` or ``:`` (MLflow refuses them), or ``prefix`` is empty.
    """
    if not isinstance(prefix, str) or not prefix.strip():
        raise ValueError(f"--register needs a non-empty model name prefix, got {prefix!r}")
    try:
        frac = f"{float(fraction):g}"
    except (TypeError, ValueError):
        frac = str(fraction)
    out = f"{prefix}-{method}-{frac}"
    if "/" in out or ":" in out:
        raise ValueError(f"registered model name {out!r} must not contain '/' or ':' (from --register {prefix!r})")
    return out


@dataclass(frozen=True)
class RegisteredJob:
    """One registration: the registered model's name and version, and the job chosen for it.

    Attributes:
        name: Registered model name.
        version: Its version holding the job's model.
        run_id: The job's run (the version's source run).
        job: The job key (run name).
        selection_metric: The validation metric it was chosen by (None: there was none to compare).
        value: Its value.
    """

    name: str
    version: str
    run_id: str
    job: str
    selection_metric: str | None
    value: float | None


def _score(row: Any) -> tuple[str | None, float | None]:
    """(metric, value) a job is compared by: the best epoch's validation value, else the last validation."""
    kind = row.get("params.kind")
    if kind not in VALIDATION:
        return None, None
    for key in (f"{BEST_PREFIX}/{VALIDATION_PREFIX}/{VALIDATION[kind]}", f"{VALIDATION_PREFIX}/{VALIDATION[kind]}"):
        value = row.get(f"metrics.{key}")
        if value is not None and isinstance(value, float) and math.isfinite(value):
            return key, value
    return None, None


def register_best_models(target: TrackingTarget, parent_run_id: str, prefix: str) -> list[RegisteredJob]:
    """Register the best job of each method x labelled fraction of pipeline run ``parent_run_id``.

    Candidates are the FINISHED ``final`` jobs (``medcl.role``) with a logged model (``medcl.model_id``);
    the best has the highest :func:`_score` (``best/val/dice_2d``, ``best/val/patient_auc``), ties and
    jobs without a validation value going to the lowest seed. Registering again the same model
    under the same name adds no version.

    Returns:
        One :class:`RegisteredJob` per method x fraction, sorted by name.

    Raises:
        TrackingError: The store cannot register models, or no final job has a logged model.
        ValueError: A bad ``prefix``.
    """
    mlflow = import_mlflow()
    client = client_for(target.tracking_uri)
    registered_name(prefix, "m", 1)  # check the prefix before any work
    check_registry(target)
    runs = search_runs(target, parent_run_id=parent_run_id,
                       filter="attributes.status = 'FINISHED' and tags.`medcl.role` = 'final'")
    col = f"tags.{MODEL_ID_TAG}"
    rows = [] if col not in runs.columns else [r for r in runs.to_dict("records") if isinstance(r.get(col), str)]
    if not rows:
        raise TrackingError(f"pipeline run {parent_run_id} has no finished fine-tuning job with a logged MLflow "
                            f"model (tag {MODEL_ID_TAG}); nothing to register")
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((str(row.get("params.method")), str(row.get("params.label_fraction"))), []).append(row)
    out = []
    for (method, fraction), members in sorted(groups.items()):
        scored = [(*_score(r), r) for r in members]
        best = max(scored, key=lambda s: (s[1] is not None, s[1] if s[1] is not None else 0.0,
                                          -_seed(s[2])))
        metric, value, row = best
        if metric is None:
            logger.warning("%s at fraction %s: no validation value to compare (val_every: 0?); registering the "
                           "lowest seed's job %s", method, fraction, row["run_name"])
        name = registered_name(prefix, method, fraction)
        try:
            version = _register(client, name, row, metric, value, parent_run_id)
        except mlflow.exceptions.MlflowException as e:
            raise TrackingError(_no_registry(target, e)) from e
        out.append(RegisteredJob(name, version, row["run_id"], row["run_name"], metric, value))
    return out


def _seed(row: Mapping[str, Any]) -> float:
    try:
        return float(row.get("params.seed"))
    except (TypeError, ValueError):
        return math.inf


def _register(client: Any, name: str, row: Mapping[str, Any], metric: str | None, value: float | None,
              parent_run_id: str) -> str:
    """Add the job's model as a version of ``name`` (created if missing), unless it already is one."""
    mlflow = import_mlflow()
    model_id = row[f"tags.{MODEL_ID_TAG}"]
    try:
        client.create_registered_model(name, tags={"medcl.pipeline_run": parent_run_id},
                                       description="best job by validation of one method x labelled fraction "
                                                   "(medcl run --register)")
    except mlflow.exceptions.MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    for existing in client.search_model_versions(f"name = '{name}'"):
        if existing.source == f"models:/{model_id}":
            return str(existing.version)
    tags = {"medcl.job": row["run_name"], "medcl.pipeline_run": parent_run_id,
            "medcl.selection_metric": metric or "none", "medcl.selection_value": "" if value is None else repr(value)}
    version = client.create_model_version(name, source=f"models:/{model_id}", run_id=row["run_id"], tags=tags,
                                          model_id=model_id)
    logger.info("registered %s version %s: job %s (%s = %s)", name, version.version, row["run_name"], metric, value)
    return str(version.version)

