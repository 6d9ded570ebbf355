"""One run per name: the run directory's lock, held by real processes (no Ray).

A second acquirer is refused naming the holder's host and pid; a lock whose holder
was killed (a real SIGKILL, so it never released) is reclaimed with a warning; a
pid that now belongs to another process does not keep a lock alive; a lock of
another host is never reclaimed; the lock goes however the block ends; a URI
storage (``file://``, read and written through pyarrow as ``s3://`` is) holds an
advisory lock object. ``run_pipeline`` takes the lock before anything else.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from medcl.runner.lock import LOCK_FILE, RunLockedError, read_lock, run_lock

HOLDER = textwrap.dedent("""\
    import sys
    from medcl.runner.lock import run_lock

    with run_lock(sys.argv[1], "pipeline 'tiny'"):
        print("held", flush=True)
        sys.stdin.read()  # until the test closes stdin (or kills this process)
""")


def _start_holder(root: Path) -> subprocess.Popen:
    """A real process that takes the lock of ``root`` through the library and holds it."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(root)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_acquirer_is_refused_naming_the_holder_until_it_ends(tmp_path):
    root = tmp_path / "runs" / "tiny"
    holder = _start_holder(root)
    try:
        with pytest.raises(RunLockedError) as info:
            with run_lock(str(root), "pipeline 'tiny'"):
                pytest.fail("a second run of the same name got the lock")
        message = str(info.value)
        assert f"pid {holder.pid} on host {socket.gethostname()}" in message
        assert "pipeline 'tiny' is already running" in message and str(root / LOCK_FILE) in message
        assert read_lock(str(root))["pid"] == holder.pid  # the refusal left the holder's lock alone
    finally:
        holder.stdin.close()
        assert holder.wait(timeout=30) == 0
    assert not root.exists()  # released, and the (empty) run directory removed with it
    with run_lock(str(root), "pipeline 'tiny'") as me:
        assert read_lock(str(root))["token"] == me["token"] and me["pid"] == os.getpid()


def test_the_lock_of_a_killed_process_is_reclaimed_with_a_warning(tmp_path, caplog):
    root = tmp_path / "tiny"
    holder = _start_holder(root)
    holder.send_signal(signal.SIGKILL)  # it never releases
    holder.wait(timeout=30)
    assert read_lock(str(root))["pid"] == holder.pid
    (root / "plan.json").write_text("{}")  # a run directory with content stays
    with caplog.at_level(logging.WARNING, logger="medcl.runner.lock"):
        with run_lock(str(root), "pipeline 'tiny'") as me:
            assert read_lock(str(root))["token"] == me["token"]
    assert f"reclaiming the stale lock {root / LOCK_FILE}" in caplog.text and f"pid {holder.pid}" in caplog.text
    assert not (root / LOCK_FILE).exists() and (root / "plan.json").is_file()


def _write_lock(root: Path, **holder) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / LOCK_FILE).write_text(json.dumps({"since": "2026-01-01T00:00:00+00:00", "token": "old", **holder}))


def test_a_reused_pid_is_stale_and_another_hosts_lock_is_not_reclaimed(tmp_path):
    # pid 1 is alive, but it started at another time than the one recorded: the holder is gone
    _write_lock(tmp_path / "reused", host=socket.gethostname(), pid=1, process_start="0")
    with run_lock(str(tmp_path / "reused"), "pipeline 'reused'"):
        pass
    # a holder on another host cannot be checked from here: refused, and the message says how to clear it
    _write_lock(tmp_path / "remote", host="gpu-node-7", pid=4242, process_start="1")
    with pytest.raises(RunLockedError, match="pid 4242 on host gpu-node-7 .* delete"):
        with run_lock(str(tmp_path / "remote"), "sweep 'remote'"):
            pass
    assert read_lock(str(tmp_path / "remote"))["token"] == "old"


def test_the_lock_is_released_when_the_run_raises(tmp_path):
    root = tmp_path / "tiny"
    with pytest.raises(ZeroDivisionError):
        with run_lock(str(root), "pipeline 'tiny'"):
            assert (root / LOCK_FILE).is_file()
            1 / 0
    assert not root.exists()


def test_uri_storage_holds_an_advisory_lock_object(tmp_path):
    root = f"file://{tmp_path}/store/tiny"  # read and written through pyarrow.fs, like s3:// storage
    with run_lock(root, "pipeline 'tiny'") as me:
        assert json.loads((tmp_path / "store" / "tiny" / LOCK_FILE).read_text())["token"] == me["token"]
        with pytest.raises(RunLockedError, match=f"pid {os.getpid()} on host"):
            with run_lock(root, "pipeline 'tiny'"):
                pass
    assert read_lock(root) is None


def test_run_pipeline_takes_the_lock_before_anything_else(tmp_path):
    from medcl.config.pipeline import load_pipeline
    from medcl.runner.pipeline import run_pipeline

    path = tmp_path / "tiny.yaml"
    path.write_text(textwrap.dedent(f"""\
        name: tiny
        dataset: {{path: {tmp_path}/data, source: synthetic, options: {{num_patients: 4, size: 16}}}}
        stages: {{finetune: {{kind: seg_finetune, max_epochs: 1}}}}
        methods: {{random: [finetune]}}
        tracking: {{workdir: {tmp_path}}}
        storage_path: {tmp_path}/runs
        """))
    holder = _start_holder(tmp_path / "runs" / "tiny")
    try:
        with pytest.raises(RunLockedError, match=f"pipeline 'tiny' is already running: pid {holder.pid}"):
            run_pipeline(load_pipeline(path))  # no Ray needed: refused before it is used
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert not (tmp_path / "data").exists() and not (tmp_path / "mlflow.db").exists()
