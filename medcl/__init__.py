"""medcl: label-efficient medical image analysis with contrastive learning, as a Ray pipeline."""
from __future__ import annotations

import os

# MLflow telemetry stays off unless the user explicitly turned it on.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

__version__ = "0.1.0"
__all__ = ["__version__"]
