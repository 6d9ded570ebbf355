"""Shared fixtures: real data location, one small local Ray instance and one real ``mlflow server`` per session."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
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


@pytest.fixture(scope="session")
def mlflow_server_process(tmp_path_factory):
    """A real ``mlflow server`` for the session: (process, URI, root), not yet waited for.

    Sqlite backend (``<root>/db.sqlite``) and proxied artifacts (``<root>/art``) on a free loopback
    port; no job-runner process. Tests share it (each with its own experiment); a module may request
    this fixture early (autouse) so that the ~10 s start overlaps its first tests. Stopped at the end
    of the session with its whole process group (server and uvicorn worker).
    """
    root = tmp_path_factory.mktemp("mlflow-server")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [str(Path(sys.executable).with_name("mlflow")), "server",
           "--backend-store-uri", f"sqlite:///{root}/db.sqlite", "--artifacts-destination", str(root / "art"),
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(root / "server.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        try:
            yield proc, f"http://127.0.0.1:{port}", root
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)


@pytest.fixture(scope="session")
def mlflow_server(mlflow_server_process) -> tuple[str, Path]:
    """(URI, root) of the session's ``mlflow server`` once it answers ``/health`` (up to 180 s: a loaded machine)."""
    proc, uri, root = mlflow_server_process
    deadline = time.monotonic() + 180
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as resp:
                if resp.status == 200:
                    return uri, root
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"mlflow server did not start:\n{(root / 'server.log').read_text()[-3000:]}")
        time.sleep(0.25)
