"""Log to one existing MLflow run: params, per-step metrics, tags, artifacts.

A :class:`RunLogger` needs only the store URI and a run id, so rank 0 of a Ray
worker can build one from what it receives (:func:`attach_run_logger`); other
ranks log nothing. Keys and values are checked and shaped here the way the
MLflow REST API wants them (nested dicts flattened to dotted keys, values
stringified and truncated to MLflow's limits).

Example:
    >>> run = attach_run_logger("sqlite:////abs/mlflow.db", run_id)  # doctest: +SKIP
    >>> run.log_metrics({"train/loss": 0.41, "val": {"dice": 0.8}}, step=3)  # doctest: +SKIP
"""
from __future__ import annotations

import logging
import os
import posixpath
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medcl.config.paths import flatten
from medcl.tracking.store import client_for, import_mlflow

if TYPE_CHECKING:
    from medcl.tracking.store import TrackingTarget

__all__ = ["RunLogger", "attach_run_logger"]

logger = logging.getLogger(__name__)

RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")
# Limits of the MLflow REST API (mlflow.utils.validation in MLflow 3.17).
MAX_PARAM_VALUE_LENGTH = 6000
MAX_TAG_VALUE_LENGTH = 8000
MAX_KEY_LENGTH = 250
_METRICS_PER_BATCH = 1000
_PARAMS_TAGS_PER_BATCH = 100
_KEY_RE = re.compile(r"^[/\w.\- :]*$")  # MLflow's own rule for param/metric names (POSIX)
_RUN_ID_RE = re.compile(r"^[a-zA-Z0-9][\w\-]{0,255}$")


def check_run_id(run_id: Any, name: str) -> str:
    """``run_id`` if it looks like an MLflow run id.

    Raises:
        ValueError: It does not; the message names the argument ``name``.
    """
    if not isinstance(run_id, str) or not _RUN_ID_RE.match(run_id):
        raise ValueError(f"{name} must be an MLflow run id string, got {run_id!r}")
    return run_id


def check_status(status: Any) -> str:
    """``status`` if it is a terminal run status (FINISHED, FAILED or KILLED), else ValueError."""
    if status not in RUN_STATUSES:
        raise ValueError(f"status must be one of {RUN_STATUSES}, got {status!r}")
    return status


def _check_key(key: str) -> str:
    if not key or len(key) > MAX_KEY_LENGTH or not _KEY_RE.match(key) or posixpath.normpath(key) != key:
        raise ValueError(
            f"invalid MLflow key {key!r}: use 1-{MAX_KEY_LENGTH} letters, digits, '_', '-', '.', "
            "' ', ':' or '/' (no leading '/', '//' or '..')"
        )
    return key


def string_values(values: Mapping[str, Any], limit: int) -> dict[str, str]:
    """Flatten ``values`` to checked dotted keys with ``str`` values of at most ``limit`` characters."""
    out = {}
    for k, v in flatten(values).items():
        s = str(v)
        if len(s) > limit:
            logger.warning("MLflow value of %r truncated from %d to %d characters", k, len(s), limit)
            s = s[:limit]
        out[_check_key(k)] = s
    return out


class RunLogger:
    """Log to one existing MLflow run (use on rank 0 only).

    Every call is one round trip (``log_batch`` for params, metrics and tags).

    Args:
        target: Store and experiment, or just the tracking URI (inside Ray workers).
        run_id: The run to log to.
    """

    def __init__(self, target: TrackingTarget | str, run_id: str) -> None:
        self.tracking_uri = target if isinstance(target, str) else target.tracking_uri
        self.run_id = check_run_id(run_id, "run_id")
        self._client = client_for(self.tracking_uri)
        self._entities = import_mlflow().entities

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log parameters: nested dicts flattened (``a.b``), values stringified and truncated."""
        items = [self._entities.Param(k, v) for k, v in string_values(params, MAX_PARAM_VALUE_LENGTH).items()]
        for i in range(0, len(items), _PARAMS_TAGS_PER_BATCH):
            self._client.log_batch(self.run_id, params=items[i : i + _PARAMS_TAGS_PER_BATCH])

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Log scalar metrics at ``step`` (default 0) in one batch.

        Raises:
            TypeError: A value is not a real scalar, or ``step`` is not an int.
        """
        if step is not None and (isinstance(step, bool) or not isinstance(step, int)):
            raise TypeError(f"step must be an int, got {step!r}")
        now = int(time.time() * 1000)
        items = []
        for k, v in flatten(metrics).items():
            try:
                value = float(v)
            except (TypeError, ValueError) as e:
                raise TypeError(f"metric {k!r} must be a real scalar, got {v!r}") from e
            items.append(self._entities.Metric(_check_key(k), value, now, step or 0))
        for i in range(0, len(items), _METRICS_PER_BATCH):
            self._client.log_batch(self.run_id, metrics=items[i : i + _METRICS_PER_BATCH])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set tags (values stringified and truncated)."""
        items = [self._entities.RunTag(k, v) for k, v in string_values(tags, MAX_TAG_VALUE_LENGTH).items()]
        for i in range(0, len(items), _PARAMS_TAGS_PER_BATCH):
            self._client.log_batch(self.run_id, tags=items[i : i + _PARAMS_TAGS_PER_BATCH])

    def log_artifact(self, path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        """Upload a local file or directory into the run's artifacts (under ``artifact_path``).

        Raises:
            FileNotFoundError: ``path`` does not exist.
        """
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"artifact path {path} does not exist")
        if path.is_dir():
            self._client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self._client.log_artifact(self.run_id, str(path), artifact_path)

    def log_text(self, text: str, name: str) -> None:
        """Store ``text`` as the artifact file ``name``."""
        self._client.log_text(self.run_id, text, name)

    def end(self, status: str = "FINISHED") -> None:
        """Terminate the run with ``status`` (FINISHED, FAILED or KILLED)."""
        self._client.set_terminated(self.run_id, status=check_status(status))


def attach_run_logger(tracking_uri: str, run_id: str) -> RunLogger:
    """A :class:`RunLogger` for an existing run, from what a Ray worker receives (URI and run id).

    Raises:
        ValueError: ``tracking_uri`` is not a non-empty string, or ``run_id`` is malformed.
    """
    if not isinstance(tracking_uri, str) or not tracking_uri:
        raise ValueError(f"tracking_uri must be a non-empty string, got {tracking_uri!r}")
    return RunLogger(tracking_uri, run_id)
