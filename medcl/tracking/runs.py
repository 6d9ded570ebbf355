"""Parent and child runs: create or resume, end, close the orphans, read back.

Layout of a record: one *parent* run per pipeline or sweep, one *child* run per
trial/stage (tag ``mlflow.parentRunId``), created through ``MlflowClient`` so a
child can be opened from another process (a Ray Tune trial) than its parent.
Run names are deterministic, so an interrupted pipeline or a restored sweep
finds its unfinished runs again instead of opening new ones.

Example:
    >>> target = configure_tracking(workdir="medcl_runs")  # doctest: +SKIP
    >>> parent = parent_run_id(target, "hippocampus", params={"seed": 0})  # doctest: +SKIP
    >>> with child_run(target, parent, "finetune-p0.05", params=cfg) as run:  # doctest: +SKIP
    ...     run.log_metrics({"val/dice": 0.81}, step=3)
    ...     run.final_metrics = {"test/dice": 0.79}
    >>> end_parent_run(target, parent)  # doctest: +SKIP
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from medcl.config.paths import flatten
from medcl.tracking.logger import MAX_TAG_VALUE_LENGTH, RunLogger, check_run_id, check_status, string_values
from medcl.tracking.store import TrackingError, TrackingTarget, import_mlflow

if TYPE_CHECKING:
    import pandas as pd
    from mlflow import MlflowClient

__all__ = [
    "ChildRun",
    "child_run",
    "child_run_id",
    "close_open_children",
    "end_parent_run",
    "find_parent_run",
    "finish_run",
    "log_new_metrics",
    "log_text",
    "parent_run_id",
    "reopen_run",
    "run_role",
    "search_runs",
    "start_parent_run",
]

logger = logging.getLogger(__name__)

PARENT_TAG = "mlflow.parentRunId"
ROLE_TAG = "medcl.role"


def _get_run(target: TrackingTarget, run_id: str) -> Any:
    mlflow = import_mlflow()
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


def _search(client: MlflowClient, experiment_ids: list[str], filter_string: str) -> list[Any]:
    runs, token = [], None
    while True:
        page = client.search_runs(experiment_ids, filter_string, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def reopen_run(target: TrackingTarget, run_id: str) -> None:
    """Set the status of an ended (or interrupted) run back to RUNNING, to log to it again."""
    target.client().update_run(check_run_id(run_id, "run_id"), status="RUNNING")


def run_role(target: TrackingTarget, run_id: str) -> str | None:
    """The ``medcl.role`` tag of a run (``pipeline``, ``sweep``, ``trial``, ``final``, ...), or None."""
    return _get_run(target, check_run_id(run_id, "run_id")).data.tags.get(ROLE_TAG)


# ------------------------------------------------------------------ parents ----
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
    all_tags = {ROLE_TAG: "parent", **(tags or {})}
    run = target.client().create_run(
        target.experiment_id, tags=string_values(all_tags, MAX_TAG_VALUE_LENGTH), run_name=name
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
    reopen_run(target, run_id)
    run = RunLogger(target, run_id)
    if tags:
        run.set_tags(tags)
    if params:
        try:
            run.log_params(params)
        except import_mlflow().exceptions.MlflowException as e:
            raise TrackingError(
                f"unfinished run {name!r} ({run_id}) has different parameters; resume it with the same "
                f"configuration or give the pipeline another name: {e}"
            ) from e
    return run_id


def end_parent_run(target: TrackingTarget, run_id: str, status: str = "FINISHED") -> list[str]:
    """End a pipeline/sweep parent run, first marking its children left RUNNING as KILLED.

    Returns:
        Ids of the children that were closed.
    """
    check_status(status)
    closed = close_open_children(target, run_id)
    target.client().set_terminated(check_run_id(run_id, "run_id"), status=status)
    return closed


def close_open_children(target: TrackingTarget, parent_run_id: str, status: str = "KILLED") -> list[str]:
    """Terminate children of ``parent_run_id`` left RUNNING (e.g. trials stopped by ASHA).

    Returns:
        Ids of the runs that were terminated.
    """
    check_status(status)
    client = target.client()
    parent = _get_run(target, check_run_id(parent_run_id, "parent_run_id"))
    filt = f"tags.{PARENT_TAG} = '{parent_run_id}' and attributes.status = 'RUNNING'"
    closed = [r.info.run_id for r in _search(client, [parent.info.experiment_id], filt)]
    for run_id in closed:
        client.set_terminated(run_id, status=status)
    if closed:
        logger.warning("marked %d unfinished child run(s) of %s as %s", len(closed), parent_run_id, status)
    return closed


# ------------------------------------------------------------------- children ----
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
    and the tag ``mlflow.parentRunId``, in the parent's experiment. Prefer
    :func:`child_run`, which also ends the run.

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
    parent = _get_run(target, check_run_id(parent_run_id, "parent_run_id"))
    run_id = None
    if resume:
        filt = f"tags.{PARENT_TAG} = '{parent_run_id}' and attributes.run_name = {_quote(name, 'name')}"
        for run in _search(client, [parent.info.experiment_id], filt):
            if run.info.status != "FINISHED":
                run_id = run.info.run_id
                reopen_run(target, run_id)
                logger.info("resuming child run %s (%s)", name, run_id)
                break
    if run_id is None:
        all_tags = {ROLE_TAG: "child", **(tags or {}), PARENT_TAG: parent_run_id}
        run_id = client.create_run(
            parent.info.experiment_id, tags=string_values(all_tags, MAX_TAG_VALUE_LENGTH), run_name=name
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


class ChildRun(RunLogger):
    """The :class:`RunLogger` of a :func:`child_run` block.

    Attributes:
        final_metrics: Set inside the block (e.g. to a stage's result) to have them
            logged as :func:`finish_run` does when the block ends normally; None logs nothing more.
    """

    final_metrics: Mapping[str, Any] | None = None


@contextlib.contextmanager
def child_run(
    target: TrackingTarget,
    parent_run_id: str,
    name: str,
    params: Mapping[str, Any] | None = None,
    tags: Mapping[str, Any] | None = None,
    *,
    resume: bool = True,
) -> Iterator[ChildRun]:
    """Open (or resume) a child run with :func:`child_run_id` and always end it.

    A normal exit logs ``run.final_metrics`` (only keys the run does not have yet,
    only real numbers) and ends the run FINISHED; an exception ends it FAILED,
    ``KeyboardInterrupt``/``SystemExit`` KILLED, and is re-raised unchanged (a
    tracking error while ending is logged, never raised in its place). A failure
    while logging the final metrics ends the run FAILED and is raised. A trial
    whose process is killed outright (ASHA stopping it) cannot end its own run:
    :func:`end_parent_run` / :func:`close_open_children` on the parent mark such
    runs KILLED.

    Args:
        The arguments of :func:`child_run_id`.

    Yields:
        A :class:`ChildRun` for the child run.

    Raises:
        TrackingError: The parent run does not exist in this store.

    Example:
        >>> with child_run(target, parent, job.key, params=params, tags=tags) as run:  # doctest: +SKIP
        ...     run.final_metrics = train(tracking={"tracking_uri": run.tracking_uri, "run_id": run.run_id})
    """
    run = ChildRun(target, child_run_id(target, parent_run_id, name, params, tags, resume=resume))
    try:
        yield run
        finish_run(target, run.run_id, metrics=run.final_metrics)
    except BaseException as error:
        status = "KILLED" if isinstance(error, (KeyboardInterrupt, SystemExit)) else "FAILED"
        try:
            run.end(status)
        except Exception:  # never mask the training error with a tracking error
            logger.exception("could not end MLflow run %s as %s", run.run_id, status)
        raise


def log_new_metrics(target: TrackingTarget, run_id: str, metrics: Mapping[str, Any]) -> None:
    """Log the real-number ``metrics`` (nested dicts flattened) whose keys the run does not have yet.

    Per-epoch keys already logged by the loop are not logged again, so their
    history keeps one point per epoch, and a restored trial does not log a stage
    twice; non-numeric entries (of a Ray result) are skipped.
    """
    run = RunLogger(target, run_id)
    existing = target.client().get_run(run.run_id).data.metrics
    run.log_metrics({k: v for k, v in flatten(metrics).items() if k not in existing and _is_real(v)})


def _is_real(value: Any) -> bool:
    if isinstance(value, (bool, str, bytes)) or value is None:
        return False
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def finish_run(
    target: TrackingTarget, run_id: str, metrics: Mapping[str, Any] | None = None, status: str = "FINISHED"
) -> None:
    """Log final metrics with :func:`log_new_metrics` and end the run with ``status``.

    Raises:
        ValueError: ``status`` is not FINISHED, FAILED or KILLED, or ``run_id`` is malformed.
    """
    check_status(status)
    if metrics:
        log_new_metrics(target, run_id, metrics)
    RunLogger(target, run_id).end(status)


def log_text(target: TrackingTarget, run_id: str, text: str, name: str) -> None:
    """Store ``text`` as the artifact file ``name`` of ``run_id`` (e.g. the pipeline YAML)."""
    RunLogger(target, run_id).log_text(text, name)


# ------------------------------------------------------------------- reading ----
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
        clauses.insert(0, f"tags.{PARENT_TAG} = '{check_run_id(parent_run_id, 'parent_run_id')}'")
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
