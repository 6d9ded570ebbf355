"""Per-epoch MLflow logging from inside a stage loop (rank 0 only)."""
from __future__ import annotations

from typing import Any

__all__ = ["rank_zero_logger"]


def rank_zero_logger(ctx: Any, inputs: Any) -> Any:
    """A run logger for ``inputs.tracking`` on rank 0, else None (other ranks log nothing)."""
    if not ctx.is_rank_zero or not inputs.tracking:
        return None
    from medcl.tracking import attach_run_logger

    return attach_run_logger(**inputs.tracking)
