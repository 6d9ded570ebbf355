"""Start (or join) the Ray instance a medcl command runs on: one per command.

On a laptop this starts a small local Ray sized for the machine: twice as many
logical CPUs as cores (so that training workers and Ray Data never wait on
each other — with exactly one logical CPU per core, two train workers plus a
dataset hang), a bounded object store, no token authentication, no usage
stats, and worker logs kept out of the terminal. With ``address`` (or
``RAY_ADDRESS``) it joins a running cluster instead.
"""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

__all__ = ["init_ray", "quiet_ray_logging"]

logger = logging.getLogger(__name__)


def quiet_ray_logging(verbose: bool = False) -> None:
    """Keep Ray's and MLflow's own log lines out of the terminal unless ``verbose``."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # MLflow sets its own loggers' level from this when imported (after us: it is imported lazily),
    # e.g. the "Creating initial MLflow database tables" INFO lines of a new sqlite store.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "INFO" if verbose else "WARNING")
    level = logging.INFO if verbose else logging.WARNING
    for name in ("ray", "ray.data", "ray.tune", "ray.train", "mlflow", "alembic"):
        logging.getLogger(name).setLevel(level)
    # Ray Data warns that its progress bars are off, which is what RAY_DATA_DISABLE_PROGRESS_BARS asks.
    logging.getLogger("ray.data._internal.progress").setLevel(level if verbose else logging.ERROR)


def init_ray(address: str | None = None, *, num_cpus: int | None = None, object_store_gb: float = 2.0,
             verbose: bool = False) -> None:
    """Initialise Ray once for this process (no-op when already initialised)."""
    import ray

    if ray.is_initialized():
        return
    quiet_ray_logging(verbose)
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=verbose)
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    cores = os.cpu_count() or 2
    # A short temp dir keeps Ray's socket paths under the 107-character limit.
    temp_dir = Path(tempfile.gettempdir()) / f"medcl-ray-{os.getuid()}"
    ray.init(
        num_cpus=num_cpus or max(4, 2 * cores),
        object_store_memory=int(object_store_gb * 1024**3),
        log_to_driver=verbose,
        logging_level=logging.INFO if verbose else logging.WARNING,
        _temp_dir=str(temp_dir),
    )
    ray_data_context()


def ray_data_context() -> None:
    """Quiet Ray Data progress bars in the driver."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
