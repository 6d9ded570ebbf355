"""Read-only access to a store that exists: its URI, an experiment in it, the experiments of a pipeline.

``medcl report`` reads through these, so looking at results never creates a database or an
experiment (:func:`medcl.tracking.store.configure_tracking` creates both, for runs that write).
"""
from __future__ import annotations

import os
from pathlib import Path

from medcl.tracking.runs import PARENT_TAG, _quote, _search
from medcl.tracking.store import TrackingError, TrackingTarget, _absolute_sqlite, _check_server, client_for, import_mlflow

__all__ = ["existing_store_uri", "open_tracking", "experiments_with_pipeline"]


def existing_store_uri(tracking_uri: str | None = None, workdir: str | os.PathLike[str] | None = None, *,
                       timeout_s: float = 5.0) -> str:
    """The URI of a store that already exists (for reading), resolved as :func:`configure_tracking` does.

    Nothing is created: a missing embedded database is an error, not a new empty one.

    Raises:
        TrackingError: No database file at the resolved ``sqlite:///`` path, or the server is unreachable.
    """
    import_mlflow()
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or None
    if uri is None:
        root = Path(workdir if workdir is not None else os.getcwd()).expanduser().resolve()
        uri = f"sqlite:///{root / 'mlflow.db'}"
    if uri.startswith("sqlite:"):
        uri, db_path = _absolute_sqlite(uri)
        if not db_path.is_file():
            raise TrackingError(f"no MLflow store at {db_path}: run the pipeline from this directory first, or "
                                "point at its store with --tracking-uri (or MLFLOW_TRACKING_URI)")
    elif uri.startswith(("http://", "https://")):
        uri = uri.rstrip("/")
        _check_server(uri, timeout_s)
    return uri


def open_tracking(tracking_uri: str, experiment: str) -> TrackingTarget:
    """A :class:`TrackingTarget` for an experiment that exists in the store ``tracking_uri`` (read-only).

    Args:
        tracking_uri: A store URI from :func:`existing_store_uri`.
        experiment: The experiment's name.

    Raises:
        TrackingError: No active experiment of that name (the message lists the ones there are).
    """
    mlflow = import_mlflow()
    client = client_for(tracking_uri)
    try:
        exp = client.get_experiment_by_name(experiment)
        names = [] if exp is not None else sorted(e.name for e in client.search_experiments())
    except mlflow.exceptions.MlflowException as e:
        raise TrackingError(f"cannot read MLflow store {tracking_uri}: {e}") from e
    if exp is None or exp.lifecycle_stage != "active":
        raise TrackingError(f"no experiment {experiment!r} in {tracking_uri} (experiments there: "
                            f"{', '.join(map(repr, names)) or 'none'})")
    return TrackingTarget(tracking_uri, experiment, exp.experiment_id, exp.artifact_location)


def experiments_with_pipeline(tracking_uri: str, name: str) -> list[str]:
    """Names of the active experiments of store ``tracking_uri`` holding a top-level run called ``name``, sorted."""
    client = client_for(tracking_uri)
    experiments = {e.experiment_id: e.name for e in client.search_experiments()}
    if not experiments:
        return []
    runs = _search(client, list(experiments), f"attributes.run_name = {_quote(name, 'name')}")
    return sorted({experiments[r.info.experiment_id] for r in runs if PARENT_TAG not in r.data.tags})
