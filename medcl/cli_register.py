"""``medcl run --register NAME`` and the MLflow UI links printed after a run (helpers of :mod:`medcl.cli`)."""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from medcl.model_logging import log_job_models  # run_pipeline(after_wave=...): each fine-tune's MLflow model

__all__ = ["log_job_models", "model_hook", "registry_target", "print_registered", "print_ui_links"]


def model_hook(register: str | None) -> Callable[..., Any] | None:
    """``run_pipeline``'s ``after_wave``: :func:`log_job_models`, unless ``MEDCL_LOG_MODELS=0`` (no MLflow
    models: ~5 s a fine-tune job saved) and no ``--register`` (which registers logged models)."""
    if os.environ.get("MEDCL_LOG_MODELS", "1").strip() == "0" and register is None:
        return None
    return log_job_models


def registry_target(cfg: Any, name: str | None) -> Any:
    """The pipeline's tracking target when ``--register NAME`` is given, else None.

    Checked before any training: the NAME (a ``ValueError``: exit 2) and that the store can register
    models (a :class:`~medcl.tracking.TrackingError`: exit 1).
    """
    if name is None:
        return None
    from medcl import tracking as mlt
    from medcl.tracking.models import check_registry, registered_name

    registered_name(name, "method", 1)
    target = mlt.configure_tracking(tracking_uri=cfg.tracking.tracking_uri, experiment=cfg.tracking.experiment,
                                    workdir=cfg.tracking.workdir)
    check_registry(target)
    return target


def print_registered(target: Any, parent_run_id: str, name: str | None) -> None:
    """Register the best job of each method x fraction (:func:`medcl.tracking.models.register_best_models`); print them.

    Does nothing when ``target`` is None (no ``--register``).
    """
    from medcl.tracking.models import register_best_models

    if target is None:
        return

    for reg in register_best_models(target, parent_run_id, name):
        chosen = f"{reg.selection_metric} = {reg.value:.4f}" if reg.value is not None else "no validation metric"
        print(f"registered {reg.name} version {reg.version}: job {reg.job} ({chosen})")


def print_ui_links(result: Any) -> None:
    """Print the direct MLflow UI links of a pipeline's runs and curve (:mod:`medcl.tracking.links`)."""
    from medcl.tracking.links import format_run_links, pipeline_links

    curve = f"report/{Path(result.png_path).name}" if result.png_path else None
    print(format_run_links(pipeline_links(result.tracking_uri, result.parent_run_id, curve)))
