"""The tracking store: resolve its URI, probe a server, get or create the experiment.

The default store is embedded: ``sqlite:///<abs workdir>/mlflow.db`` with an
absolute artifact location (Ray moves trial working directories, so relative
paths break). ``MLFLOW_TRACKING_URI`` or ``tracking_uri=`` point at a server,
which is checked for reachability before any training starts. MLflow
telemetry is off unless the user set ``MLFLOW_DISABLE_TELEMETRY`` themselves.

``mlflow`` is imported lazily so that ``import medcl`` stays light.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlflow import MlflowClient

__all__ = ["TrackingError", "TrackingTarget", "configure_tracking"]

logger = logging.getLogger(__name__)

_CLIENTS: dict[str, MlflowClient] = {}


class TrackingError(RuntimeError):
    """The tracking store cannot be used (unreachable server, bad URI, deleted experiment)."""


def import_mlflow() -> Any:
    """Import mlflow with telemetry off unless the user chose otherwise."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    return mlflow


def client_for(uri: str) -> MlflowClient:
    """The ``MlflowClient`` of the store ``uri``, cached per process."""
    if uri not in _CLIENTS:
        _CLIENTS[uri] = import_mlflow().MlflowClient(tracking_uri=uri)
    return _CLIENTS[uri]


@dataclass(frozen=True)
class TrackingTarget:
    """Where runs go; small and picklable, so it can be shipped to Ray workers.

    Attributes:
        tracking_uri: Absolute store URI (``sqlite:////abs/mlflow.db`` or ``http(s)://host:port``).
        experiment_name: MLflow experiment name.
        experiment_id: MLflow experiment id in that store.
        artifact_location: The experiment's artifact root as MLflow reports it.
    """

    tracking_uri: str
    experiment_name: str
    experiment_id: str
    artifact_location: str

    @property
    def is_remote(self) -> bool:
        """True when runs go to a tracking server rather than a local store."""
        return self.tracking_uri.startswith(("http://", "https://"))

    def client(self) -> MlflowClient:
        """An ``MlflowClient`` bound to this store (cached per process)."""
        return client_for(self.tracking_uri)


def configure_tracking(
    tracking_uri: str | None = None,
    experiment: str = "medcl",
    workdir: str | os.PathLike[str] | None = None,
    *,
    timeout_s: float = 5.0,
) -> TrackingTarget:
    """Resolve the tracking store, check it, and get or create the experiment.

    Precedence: ``tracking_uri`` argument, then ``MLFLOW_TRACKING_URI``, then the
    embedded store ``sqlite:///<abs workdir>/mlflow.db`` whose experiments keep
    artifacts under ``<abs workdir>/mlruns/<experiment>`` (absolute). A relative
    ``sqlite:///`` path is made absolute against the current directory, and its
    artifacts go next to the database file. A server decides its own artifact
    location (``mlflow server --artifacts-destination``).

    Args:
        tracking_uri: Store or server URI; ``None`` uses the environment or the default.
        experiment: Experiment name (created if missing).
        workdir: Directory of the embedded store; default the current directory.
        timeout_s: Seconds allowed for the reachability check of a server.

    Returns:
        The resolved :class:`TrackingTarget`.

    Raises:
        ValueError: ``experiment`` is empty or ``timeout_s`` is not positive.
        TrackingError: The server is unreachable or refuses access, the URI is
            unusable, or the experiment is deleted.

    Example:
        >>> target = configure_tracking(workdir="medcl_runs")  # doctest: +SKIP
        >>> target.tracking_uri  # doctest: +SKIP
        'sqlite:////abs/medcl_runs/mlflow.db'
    """
    if not isinstance(experiment, str) or not experiment.strip():
        raise ValueError(f"experiment must be a non-empty string, got {experiment!r}")
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
    import_mlflow()
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or None
    if uri is None:
        root = Path(workdir if workdir is not None else os.getcwd()).expanduser().resolve()
        uri = f"sqlite:///{root / 'mlflow.db'}"
    artifact_location = None
    safe = re.sub(r"[^\w.\-]+", "_", experiment).strip(".") or "experiment"
    if uri.startswith("sqlite:"):
        uri, db_path = _absolute_sqlite(uri)
        db_path.parent.mkdir(parents=True, exist_ok=True)
        artifact_location = str(db_path.parent / "mlruns" / safe)
    elif uri.split(":")[0].split("+")[0] in {"postgresql", "mysql", "mssql"}:
        # A database used directly: MLflow's default artifact root (./mlruns) would be relative.
        root = Path(workdir if workdir is not None else os.getcwd()).expanduser().resolve()
        artifact_location = str(root / "mlruns" / safe)
    elif uri.startswith(("http://", "https://")):
        _check_server(uri.rstrip("/"), timeout_s)
        uri = uri.rstrip("/")
    with _quick_http(timeout_s):
        experiment_id = _get_or_create_experiment(uri, experiment, artifact_location)
    exp = client_for(uri).get_experiment(experiment_id)
    target = TrackingTarget(uri, experiment, experiment_id, exp.artifact_location)
    logger.info("MLflow: %s, experiment %r (id %s)", uri, experiment, experiment_id)
    return target


def _absolute_sqlite(uri: str) -> tuple[str, Path]:
    prefix = "sqlite:///"
    if not uri.startswith(prefix) or uri == prefix or uri.startswith(prefix + ":memory:"):
        raise TrackingError(
            f"tracking URI {uri!r} is not a file-backed sqlite URI; use sqlite:///path/to/mlflow.db"
        )
    path, sep, query = uri[len(prefix):].partition("?")
    db_path = Path(path).expanduser().resolve()
    return f"{prefix}{db_path}{sep}{query}", db_path


def _ssl_context() -> ssl.SSLContext | None:
    if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true":
        return ssl._create_unverified_context()
    cert = os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH")
    return ssl.create_default_context(cafile=cert) if cert else None


def _check_server(uri: str, timeout_s: float) -> None:
    """GET <uri>/health with a short timeout; raise TrackingError when nobody answers."""
    fix = (
        "Start the server (e.g. `mlflow server --host 0.0.0.0 --port 5000`), correct "
        "MLFLOW_TRACKING_URI or the `tracking_uri` config key, or unset both to use the "
        "local store sqlite:///<workdir>/mlflow.db."
    )
    start = time.monotonic()
    try:
        context = _ssl_context() if uri.startswith("https://") else None
        with urllib.request.urlopen(f"{uri}/health", timeout=timeout_s, context=context) as resp:
            resp.read(64)
    except urllib.error.HTTPError as e:  # the host answered; the API call decides the rest
        if e.code in (401, 403):
            raise TrackingError(
                f"MLflow server {uri} refused access (HTTP {e.code}); set MLFLOW_TRACKING_USERNAME/"
                "MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN."
            ) from e
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise TrackingError(
            f"MLflow tracking server {uri} is unreachable ({reason}; "
            f"{time.monotonic() - start:.1f} s). {fix}"
        ) from e


@contextlib.contextmanager
def _quick_http(timeout_s: float) -> Iterator[None]:
    """One retry and a bounded timeout for the set-up calls (MLflow reads these per request).

    MLflow's defaults (7 retries with backoff, 120 s timeout) would hold a
    misconfigured run for minutes; the server already answered ``/health``, so
    the first API call only gets a generous bound for a busy server's first request.
    """
    keys = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
            "MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(30, math.ceil(timeout_s)))}
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update(keys)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _get_or_create_experiment(uri: str, name: str, artifact_location: str | None) -> str:
    mlflow = import_mlflow()
    client = client_for(uri)
    try:
        exp = client.get_experiment_by_name(name)
        if exp is None:
            try:
                return client.create_experiment(name, artifact_location=artifact_location)
            except mlflow.exceptions.MlflowException as e:  # created meanwhile by another process
                exp = client.get_experiment_by_name(name)
                if exp is None:
                    raise e
    except mlflow.exceptions.MlflowException as e:
        raise TrackingError(f"cannot use MLflow store {uri} for experiment {name!r}: {e}") from e
    if exp.lifecycle_stage != "active":
        raise TrackingError(
            f"experiment {name!r} is deleted in {uri}; restore it (`mlflow experiments restore "
            f"--experiment-id {exp.experiment_id}`) or choose another experiment name"
        )
    if artifact_location and exp.artifact_location.removeprefix("file://") != artifact_location:
        logger.warning(
            "experiment %r already exists with artifact location %s (not %s); keeping it",
            name, exp.artifact_location, artifact_location,
        )
    return exp.experiment_id
