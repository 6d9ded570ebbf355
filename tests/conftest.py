"""Shared fixtures: real data location and one small local Ray instance per session."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Quiet, offline, token-free local Ray and no MLflow telemetry for every test.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# `medcl run` logs no MLflow models (~5 s a fine-tune job) unless a test asks (--register, tests/test_mlflow_ui.py).
os.environ.setdefault("MEDCL_LOG_MODELS", "0")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Directory holding Task04_Hippocampus/ and pneumoniamnist/ (never copied into the repo)."""
    root = Path(os.environ.get("MEDCL_SHARED_DATA", REPO.parent / "shared" / "data"))
    if not root.is_dir():
        pytest.skip(f"shared data not found at {root}; set MEDCL_SHARED_DATA")
    return root


@pytest.fixture(scope="session")
def ray_session(tmp_path_factory):
    """One local Ray instance for the whole test session (ray.init costs ~7 s here).

    4 logical CPUs on a 2-core machine so that 2 train workers and Ray Data never
    starve each other (a 2-CPU Ray with 2 workers + a dataset hangs).
    """
    import ray

    if not ray.is_initialized():
        tmp = Path("/tmp") / f"medcl-ray-{os.getpid()}"
        ray.init(
            num_cpus=4,
            object_store_memory=1_000_000_000,
            log_to_driver=False,
            _temp_dir=str(tmp),
        )
    yield ray
    ray.shutdown()


@pytest.fixture
def restore_root_logging():
    """``medcl.cli.main`` points the root logger at this test's (captured, then closed) stderr: undo it."""
    import logging

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
