"""MLflow tracking: the one module of medcl that talks to MLflow.

Layout of a record: one *parent* run per pipeline or sweep, one *child* run per
trial/stage (tag ``mlflow.parentRunId``), created through ``MlflowClient`` so a
child can be opened from another process (a Ray Tune trial) than its parent.
Everything a worker needs travels in a small picklable :class:`TrackingTarget`.

The default store is embedded: ``sqlite:///<abs workdir>/mlflow.db`` with an
absolute artifact location (Ray moves trial working directories, so relative
paths break). ``MLFLOW_TRACKING_URI`` or ``tracking_uri=`` point at a server,
which is checked for reachability before any training starts. MLflow
telemetry is off unless the user set ``MLFLOW_DISABLE_TELEMETRY`` themselves.

``mlflow`` is imported lazily so that ``import medcl`` stays light.

Example:
    >>> target = configure_tracking(workdir="medcl_runs")  # doctest: +SKIP
    >>> parent = start_parent_run(target, "hippocampus", params={"seed": 0})  # doctest: +SKIP
    >>> with child_run(target, parent, "finetune-p0.05", params=cfg) as run:  # doctest: +SKIP
    ...     run.log_metrics({"val/dice": 0.81}, step=3)
    >>> end_parent_run(target, parent)  # doctest: +SKIP
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import posixpath
import re
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd
    from mlflow import MlflowClient

__all__ = [
    "NullLogger",
    "RunLogger",
    "TrackingError",
    "TrackingTarget",
    "attach_run_logger",
    "child_run",
    "child_run_id",
    "close_open_children",
    "configure_tracking",
    "end_parent_run",
    "find_parent_run",
    "finish_run",
    "get_run_logger",
    "log_text",
    "parent_run_id",
    "search_runs",
    "start_parent_run",
]

logger = logging.getLogger(__name__)

PARENT_TAG = "mlflow.parentRunId"
RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")
# Limits of the MLflow REST API (mlflow.utils.validation in MLflow 3.17).
MAX_PARAM_VALUE_LENGTH = 6000
MAX_TAG_VALUE_LENGTH = 8000
MAX_KEY_LENGTH = 250
_METRICS_PER_BATCH = 1000
_PARAMS_TAGS_PER_BATCH = 100
_KEY_RE = re.compile(r"^[/\w.\- :]*$")  # MLflow's own rule for param/metric names (POSIX)
_RUN_ID_RE = re.compile(r"^[a-zA-Z0-9][\w\-]{0,255}$")
_CLIENTS: dict[str, MlflowClient] = {}


class TrackingError(RuntimeError):
    """The tracking store cannot be used (unreachable server, bad URI, deleted experiment)."""


def _import_mlflow() -> Any:
    """Import mlflow with telemetry off unless the user chose otherwise."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    return mlflow


def _client(uri: str) -> MlflowClient:
    if uri not in _CLIENTS:
        _CLIENTS[uri] = _import_mlflow().MlflowClient(tracking_uri=uri)
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
        return _client(self.tracking_uri)


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
    """
    if not isinstance(experiment, str) or not experiment.strip():
        raise ValueError(f"experiment must be a non-empty string, got {experiment!r}")
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
    _import_mlflow()
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
    exp = _client(uri).get_experiment(experiment_id)
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
    mlflow = _import_mlflow()
    client = _client(uri)
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


# ---------------------------------------------------------------- runs ----
def _check_run_id(run_id: Any, name: str) -> str:
    if not isinstance(run_id, str) or not _RUN_ID_RE.match(run_id):
        raise ValueError(f"{name} must be an MLflow run id string, got {run_id!r}")
    return run_id


def _check_status(status: Any) -> str:
    if status not in RUN_STATUSES:
        raise ValueError(f"status must be one of {RUN_STATUSES}, got {status!r}")
    return status


def _get_run(target: TrackingTarget, run_id: str) -> Any:
    mlflow = _import_mlflow()
    try:
        return target.client().get_run(run_id)
    except mlflow.exceptions.MlflowException as e:
        raise TrackingError(f"run {run_id} not found in {target.tracking_uri}: {e}") from e


def _quote(value: str, what: str) -> str:
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise ValueError(f"{what} must not contain both ' and \", got {value!r}")


def start_parent_run(
    target: TrackingTarget,
    name: str,
    tags: Mapping[str, Any] | None = None,
    params: Mapping[str, Any] | None = None,
) -> str:
    """Create the parent run of a pipeline or sweep; end it with :func:`end_parent_run`.

    Returns:
        The new run id.
    """
    all_tags = {"medcl.role": "parent", **(tags or {})}
    run = target.client().create_run(
        target.experiment_id, tags=_string_values(all_tags, MAX_TAG_VALUE_LENGTH), run_name=name
    )
    if params:
        RunLogger(target, run.info.run_id).log_params(params)
    return run.info.run_id


def find_parent_run(target: TrackingTarget, name: str, *, unfinished_only: bool = False) -> str | None:
    """Id of the most recently started top-level run called ``name``, or None."""
    filt = f"attributes.run_name = {_quote(name, 'name')}"
    runs = [r for r in _search(target.client(), [target.experiment_id], filt)
            if PARENT_TAG not in r.data.tags and not (unfinished_only and r.info.status == "FINISHED")]
    return max(runs, key=lambda r: r.info.start_time).info.run_id if runs else None


def parent_run_id(
    target: TrackingTarget,
    name: str,
    params: Mapping[str, Any] | None = None,
    tags: Mapping[str, Any] | None = None,
    *,
    reopen_finished: bool = False,
) -> str:
    """The parent run ``name`` to log to: an unfinished one is resumed, else a new one.

    Re-running an interrupted pipeline thus keeps one parent (and, through
    :func:`child_run_id`, one child per job). ``reopen_finished`` also reopens
    the latest finished run of that name (re-running a pipeline whose results
    are all in storage reports on its own runs instead of starting an empty one).

    Raises:
        TrackingError: A resumed parent was started with different parameters.
    """
    run_id = find_parent_run(target, name, unfinished_only=not reopen_finished)
    if run_id is None:
        return start_parent_run(target, name, tags=tags, params=params)
    logger.info("resuming parent run %s (%s)", name, run_id)
    target.client().update_run(run_id, status="RUNNING")
    run = RunLogger(target, run_id)
    if tags:
        run.set_tags(tags)
    if params:
        try:
            run.log_params(params)
        except _import_mlflow().exceptions.MlflowException as e:
            raise TrackingError(
                f"unfinished run {name!r} ({run_id}) has different parameters; resume it with the same "
                f"configuration or give the pipeline another name: {e}"
            ) from e
    return run_id


def child_run_id(
    target: TrackingTarget,
    parent_run_id: str,
    name: str,
    params: Mapping[str, Any] | None = None,
    tags: Mapping[str, Any] | None = None,
    *,
    resume: bool = True,
) -> str:
    """Create (or resume) the child run ``name`` of ``parent_run_id``; end it with :func:`finish_run`.

    Works from any process: the child is created with ``MlflowClient.create_run``
    and the tag ``mlflow.parentRunId``, in the parent's experiment.

    Args:
        target: Store and experiment.
        parent_run_id: Run id of the parent.
        name: Deterministic run name (e.g. the job key or trial id).
        params: Parameters (nested dicts are flattened with dotted keys).
        tags: Extra tags.
        resume: Reuse an unfinished (RUNNING/FAILED/KILLED) child of the same name,
            so a restored sweep does not open a second run per trial.

    Returns:
        The child's run id.

    Raises:
        TrackingError: The parent run does not exist in this store.
    """
    client = target.client()
    parent = _get_run(target, _check_run_id(parent_run_id, "parent_run_id"))
    run_id = None
    if resume:
        filt = f"tags.{PARENT_TAG} = '{parent_run_id}' and attributes.run_name = {_quote(name, 'name')}"
        for run in _search(client, [parent.info.experiment_id], filt):
            if run.info.status != "FINISHED":
                run_id = run.info.run_id
                client.update_run(run_id, status="RUNNING")
                logger.info("resuming child run %s (%s)", name, run_id)
                break
    if run_id is None:
        all_tags = {"medcl.role": "child", **(tags or {}), PARENT_TAG: parent_run_id}
        run_id = client.create_run(
            parent.info.experiment_id, tags=_string_values(all_tags, MAX_TAG_VALUE_LENGTH), run_name=name
        ).info.run_id
    elif tags:
        RunLogger(target, run_id).set_tags(tags)
    if params:
        try:
            RunLogger(target, run_id).log_params(params)
        except BaseException:
            client.set_terminated(run_id, status="FAILED")
            raise
    return run_id


@contextlib.contextmanager
def child_run(
    target: TrackingTarget,
    parent_run_id: str,
    name: str,
    params: Mapping[str, Any] | None = None,
    tags: Mapping[str, Any] | None = None,
    *,
    resume: bool = True,
) -> Iterator[RunLogger]:
    """Context manager around :func:`child_run_id` that always ends the run.

    The run ends FINISHED on a normal exit, FAILED on an exception, KILLED on
    ``KeyboardInterrupt``/``SystemExit``. A trial whose process is killed outright
    (ASHA stopping it) cannot end its own run: :func:`end_parent_run` /
    :func:`close_open_children` on the parent mark such runs KILLED.

    Yields:
        A :class:`RunLogger` for the child run.
    """
    run_logger = RunLogger(target, child_run_id(target, parent_run_id, name, params, tags, resume=resume))
    status = "FAILED"
    try:
        yield run_logger
        status = "FINISHED"
    except (KeyboardInterrupt, SystemExit):
        status = "KILLED"
        raise
    finally:
        try:
            run_logger.end(status)
        except Exception:  # never mask the training error with a tracking error
            logger.exception("could not end MLflow run %s as %s", run_logger.run_id, status)


def finish_run(
    target: TrackingTarget, run_id: str, metrics: Mapping[str, Any] | None = None, status: str = "FINISHED"
) -> None:
    """Log final metrics (real-number values whose keys the run does not have yet) and end the run.

    Per-epoch keys already logged by the loop are not logged again, so their
    history keeps one point per epoch; non-numeric entries of a Ray result are skipped.
    """
    _check_status(status)
    run = RunLogger(target, run_id)
    if metrics:
        existing = target.client().get_run(run.run_id).data.metrics
        final = {k: v for k, v in _flatten(metrics).items() if k not in existing and _is_real(v)}
        run.log_metrics(final)
    run.end(status)


def _is_real(value: Any) -> bool:
    if isinstance(value, (bool, str, bytes)) or value is None:
        return False
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def end_parent_run(target: TrackingTarget, run_id: str, status: str = "FINISHED") -> list[str]:
    """End a pipeline/sweep parent run, first marking its children left RUNNING as KILLED.

    Returns:
        Ids of the children that were closed.
    """
    _check_status(status)
    closed = close_open_children(target, run_id)
    target.client().set_terminated(_check_run_id(run_id, "run_id"), status=status)
    return closed


def close_open_children(target: TrackingTarget, parent_run_id: str, status: str = "KILLED") -> list[str]:
    """Terminate children of ``parent_run_id`` left RUNNING (e.g. trials stopped by ASHA).

    Returns:
        Ids of the runs that were terminated.
    """
    _check_status(status)
    client = target.client()
    parent = _get_run(target, _check_run_id(parent_run_id, "parent_run_id"))
    filt = f"tags.{PARENT_TAG} = '{parent_run_id}' and attributes.status = 'RUNNING'"
    closed = [r.info.run_id for r in _search(client, [parent.info.experiment_id], filt)]
    for run_id in closed:
        client.set_terminated(run_id, status=status)
    if closed:
        logger.warning("marked %d unfinished child run(s) of %s as %s", len(closed), parent_run_id, status)
    return closed


def log_text(target: TrackingTarget, run_id: str, text: str, name: str) -> None:
    """Store ``text`` as the artifact file ``name`` of ``run_id`` (e.g. the pipeline YAML)."""
    RunLogger(target, run_id).log_text(text, name)


def _search(client: MlflowClient, experiment_ids: list[str], filter_string: str) -> list[Any]:
    runs, token = [], None
    while True:
        page = client.search_runs(experiment_ids, filter_string, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def search_runs(
    target: TrackingTarget,
    parent_run_id: str | None = None,
    experiment: str | None = None,
    filter: str | None = None,
) -> pd.DataFrame:
    """Read runs back as a table, one row per run.

    Columns follow ``mlflow.search_runs``: ``run_id``, ``run_name``, ``experiment_id``,
    ``status``, ``artifact_uri``, ``start_time``, ``end_time`` (UTC), then
    ``params.<key>`` (strings), ``metrics.<key>`` (latest value) and ``tags.<key>``.

    Args:
        target: Store and experiment.
        parent_run_id: Only children of this run (searched in the parent's experiment).
        experiment: Experiment name; default ``target.experiment_name``.
        filter: Extra MLflow filter string, AND-ed (e.g. ``"attributes.status = 'FINISHED'"``).

    Raises:
        ValueError: Unknown experiment or malformed ``parent_run_id``.
    """
    import pandas as pd

    client = target.client()
    clauses = [filter] if filter else []
    if parent_run_id is not None:
        clauses.insert(0, f"tags.{PARENT_TAG} = '{_check_run_id(parent_run_id, 'parent_run_id')}'")
    if parent_run_id is not None and experiment is None:
        experiment_id = _get_run(target, parent_run_id).info.experiment_id
    else:
        name = experiment or target.experiment_name
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise ValueError(f"experiment {name!r} not found in {target.tracking_uri}")
        experiment_id = exp.experiment_id
    rows = []
    for run in _search(client, [experiment_id], " and ".join(clauses)):
        info = run.info
        row: dict[str, Any] = {
            "run_id": info.run_id, "run_name": info.run_name, "experiment_id": info.experiment_id,
            "status": info.status, "artifact_uri": info.artifact_uri,
            "start_time": pd.to_datetime(info.start_time, unit="ms", utc=True),
            "end_time": pd.to_datetime(info.end_time, unit="ms", utc=True) if info.end_time else pd.NaT,
        }
        row.update({f"params.{k}": v for k, v in run.data.params.items()})
        row.update({f"metrics.{k}": v for k, v in run.data.metrics.items()})
        row.update({f"tags.{k}": v for k, v in run.data.tags.items()})
        rows.append(row)
    base = ["run_id", "run_name", "experiment_id", "status", "artifact_uri", "start_time", "end_time"]
    return pd.DataFrame(rows, columns=None if rows else base)


# -------------------------------------------------------------- logging ----
def _check_key(key: str) -> str:
    if not key or len(key) > MAX_KEY_LENGTH or not _KEY_RE.match(key) or posixpath.normpath(key) != key:
        raise ValueError(
            f"invalid MLflow key {key!r}: use 1-{MAX_KEY_LENGTH} letters, digits, '_', '-', '.', "
            "' ', ':' or '/' (no leading '/', '//' or '..')"
        )
    return key


def _flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for k, v in values.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            flat.update(_flatten(v, f"{key}."))
        else:
            flat[key] = v
    return flat


def _string_values(values: Mapping[str, Any], limit: int) -> dict[str, str]:
    out = {}
    for k, v in _flatten(values).items():
        s = str(v)
        if len(s) > limit:
            logger.warning("MLflow value of %r truncated from %d to %d characters", k, len(s), limit)
            s = s[:limit]
        out[_check_key(k)] = s
    return out


class RunLogger:
    """Log to one existing MLflow run (use on rank 0; other ranks get :class:`NullLogger`).

    Every call is one round trip (``log_batch`` for params, metrics and tags).

    Args:
        target: Store and experiment, or just the tracking URI (inside Ray workers).
        run_id: The run to log to.
    """

    def __init__(self, target: TrackingTarget | str, run_id: str) -> None:
        self.tracking_uri = target if isinstance(target, str) else target.tracking_uri
        self.run_id = _check_run_id(run_id, "run_id")
        self._client = _client(self.tracking_uri)
        self._entities = _import_mlflow().entities

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log parameters: nested dicts flattened (``a.b``), values stringified and truncated."""
        items = [self._entities.Param(k, v) for k, v in _string_values(params, MAX_PARAM_VALUE_LENGTH).items()]
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
        for k, v in _flatten(metrics).items():
            try:
                value = float(v)
            except (TypeError, ValueError) as e:
                raise TypeError(f"metric {k!r} must be a real scalar, got {v!r}") from e
            items.append(self._entities.Metric(_check_key(k), value, now, step or 0))
        for i in range(0, len(items), _METRICS_PER_BATCH):
            self._client.log_batch(self.run_id, metrics=items[i : i + _METRICS_PER_BATCH])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set tags (values stringified and truncated)."""
        items = [self._entities.RunTag(k, v) for k, v in _string_values(tags, MAX_TAG_VALUE_LENGTH).items()]
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

    def log_dict(self, dictionary: Mapping[str, Any], name: str) -> None:
        """Store a dict (e.g. the resolved config) as ``name`` (``.json`` or ``.yaml``).

        Values JSON cannot hold (paths, tuples, enums) are stored as their ``str``.
        """
        plain = json.loads(json.dumps(dict(dictionary), default=str))
        self._client.log_dict(self.run_id, plain, name)

    def log_text(self, text: str, name: str) -> None:
        """Store ``text`` as the artifact file ``name``."""
        self._client.log_text(self.run_id, text, name)

    def log_figure(self, figure: Any, name: str) -> None:
        """Store a matplotlib figure as the artifact file ``name`` (e.g. ``curves/loss.png``)."""
        self._client.log_figure(self.run_id, figure, name)

    def end(self, status: str = "FINISHED") -> None:
        """Terminate the run with ``status`` (FINISHED, FAILED or KILLED)."""
        self._client.set_terminated(self.run_id, status=_check_status(status))


class NullLogger:
    """The :class:`RunLogger` interface, doing nothing (ranks other than 0, tracking off)."""

    run_id = None

    def _noop(self, *args: Any, **kwargs: Any) -> None:
        """Accept the arguments of the matching :class:`RunLogger` method and do nothing."""

    log_params = log_metrics = set_tags = log_artifact = _noop
    log_dict = log_text = log_figure = end = _noop


def attach_run_logger(tracking_uri: str, run_id: str) -> RunLogger:
    """A :class:`RunLogger` for an existing run, from what a Ray worker receives (URI and run id)."""
    if not isinstance(tracking_uri, str) or not tracking_uri:
        raise ValueError(f"tracking_uri must be a non-empty string, got {tracking_uri!r}")
    return RunLogger(tracking_uri, run_id)


def get_run_logger(target: TrackingTarget | None, run_id: str | None, *, rank: int = 0) -> RunLogger | NullLogger:
    """A :class:`RunLogger` on rank 0 with a run to log to, else a :class:`NullLogger`."""
    if target is None or run_id is None or rank != 0:
        return NullLogger()
    return RunLogger(target, run_id)
