"""MLflow tracking: the one package of medcl that talks to MLflow.

- :mod:`medcl.tracking.store`: resolve the store URI, probe a server, get or create the experiment.
- :mod:`medcl.tracking.runs`: parent and child runs (create, resume, end, close orphans, read back).
- :mod:`medcl.tracking.lookup`: read-only: an existing store, an experiment in it, the experiments of a pipeline.
- :mod:`medcl.tracking.logger`: log params, per-step metrics, tags and artifacts to one run (rank 0).

``mlflow`` is imported lazily so that ``import medcl`` stays light.

Example:
    >>> target = configure_tracking(workdir="medcl_runs")  # doctest: +SKIP
    >>> parent = parent_run_id(target, "hippocampus", params={"seed": 0})  # doctest: +SKIP
    >>> with child_run(target, parent, "finetune-p0.05", params=cfg) as run:  # doctest: +SKIP
    ...     run.log_metrics({"val/dice": 0.81}, step=3)
    >>> end_parent_run(target, parent)  # doctest: +SKIP
"""
from __future__ import annotations

from medcl.tracking.logger import RunLogger, attach_run_logger
from medcl.tracking.runs import (
    ChildRun,
    child_run,
    child_run_id,
    close_open_children,
    end_parent_run,
    find_parent_run,
    finish_run,
    log_new_metrics,
    log_text,
    parent_run_id,
    reopen_run,
    run_role,
    search_runs,
    start_parent_run,
)
from medcl.tracking.lookup import existing_store_uri, experiments_with_pipeline, open_tracking
from medcl.tracking.store import TrackingError, TrackingTarget, configure_tracking

__all__ = [
    "ChildRun",
    "RunLogger",
    "TrackingError",
    "TrackingTarget",
    "attach_run_logger",
    "child_run",
    "child_run_id",
    "close_open_children",
    "configure_tracking",
    "end_parent_run",
    "existing_store_uri",
    "experiments_with_pipeline",
    "find_parent_run",
    "finish_run",
    "log_new_metrics",
    "log_text",
    "open_tracking",
    "parent_run_id",
    "reopen_run",
    "run_role",
    "search_runs",
    "start_parent_run",
]
