"""One run per name at a time: a lock file in the run's directory ``<storage_path>/<name>/medcl.lock``.

Two ``medcl run`` (or ``medcl sweep``) of the same name would share their Tune
experiments and their MLflow parent run. The first takes the lock; the second
is refused with the holder's host, process id and start time.

Local storage: the lock file is created with ``O_CREAT | O_EXCL`` (atomic) and
holds its holder's identity (host, pid, the process's start time, when, the
command). A lock whose holder ran on this host and is gone (no such pid, or
the pid now belongs to a younger process) is stale: it is reclaimed with a
warning, under an ``flock`` of the run directory so that two reclaimers do not
both win. A holder on another host cannot be checked: delete its lock file
when you know it is gone.

URI storage (``s3://``): the lock is an object holding the same identity,
written and read back. Object stores have no exclusive create, so this lock
is advisory: it stops the common mistake (a second run of the same name), not
two runs started within the same second.

Example:
    >>> with run_lock(run_root("medcl_runs", "quickstart"), "pipeline 'quickstart'"):  # doctest: +SKIP
    ...     run_the_waves()
"""
from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

logger = logging.getLogger(__name__)

__all__ = ["LOCK_FILE", "RunLockedError", "holder_identity", "read_lock", "run_lock"]

LOCK_FILE = "medcl.lock"


class RunLockedError(RuntimeError):
    """Another process holds the run's lock; the message names it (host, pid, since when)."""


def _process_start(pid: int) -> str | None:
    """The start time of process ``pid`` in clock ticks since boot (``/proc/<pid>/stat`` field 22), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # the fields after the command name, which may hold spaces


def holder_identity() -> dict[str, Any]:
    """Who holds a lock taken now by this process: host, pid, process start, time, command, a unique token."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "process_start": _process_start(os.getpid()),
            "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv)[:300], "token": uuid.uuid4().hex}


def _is_stale(holder: dict[str, Any]) -> bool:
    """Whether the holder ran on this host and its process is gone (or its pid was reused)."""
    if holder.get("host") != socket.gethostname():
        return False
    pid = int(holder.get("pid", -1))
    if pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # a process of another user has that pid
        pass
    started = holder.get("process_start")
    return started is not None and _process_start(pid) not in (None, started)


def _describe(what: str, lock: str, holder: dict[str, Any] | None) -> str:
    if holder is None:
        return f"{what} is being started by another process (lock {lock} is still empty); try again in a moment"
    return (f"{what} is already running: pid {holder.get('pid')} on host {holder.get('host')} since "
            f"{holder.get('since')} ({holder.get('command') or 'no command recorded'}) holds {lock}. Wait for it "
            f"to finish, or give this run another name; if that process is gone (another host, a removed "
            f"container), delete {lock}")


# ------------------------------------------------------------------ local storage ----
def _read_local(path: Path) -> dict[str, Any] | None:
    """The holder in a lock file; None when it is empty or half written after a few tries (raises when absent)."""
    for _ in range(10):
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            time.sleep(0.05)  # its creator writes right after creating it
    return None


def _flock(directory: Path) -> int:
    """An exclusive ``flock`` of ``directory``; ``os.close`` of the returned descriptor releases it."""
    import fcntl

    fd = os.open(directory, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def _acquire_local(root: Path, what: str, me: dict[str, Any]) -> None:
    path = root / LOCK_FILE
    for _ in range(5):
        root.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            pass
        except FileNotFoundError:  # a run that just ended removed the (empty) directory
            continue
        else:
            with os.fdopen(fd, "w") as fh:
                fh.write(json.dumps(me, indent=2))
                fh.flush()
                os.fsync(fh.fileno())
            return
        try:
            fd = _flock(root)  # one reclaimer at a time; it re-reads the lock it removes
        except FileNotFoundError:
            continue
        try:
            try:
                holder = _read_local(path)
                age = time.time() - path.stat().st_mtime
            except FileNotFoundError:
                continue  # released meanwhile: try again
            if holder is None and age < 30:
                raise RunLockedError(_describe(what, str(path), None))
            if holder is not None and not _is_stale(holder):
                raise RunLockedError(_describe(what, str(path), holder))
            logger.warning("reclaiming the stale lock %s of %s (pid %s on %s, since %s: that process is gone)",
                           path, what, (holder or {}).get("pid"), (holder or {}).get("host"),
                           (holder or {}).get("since"))
            path.unlink()
        finally:
            os.close(fd)
    raise RunLockedError(f"{what}: could not take the lock {path} (other processes keep taking it)")


def _release_local(root: Path, me: dict[str, Any]) -> None:
    path = root / LOCK_FILE
    try:
        if json.loads(path.read_text()).get("token") == me["token"]:
            path.unlink()
    except (FileNotFoundError, json.JSONDecodeError):
        return
    with contextlib.suppress(OSError):
        root.rmdir()  # only when empty: a run that failed at start-up leaves nothing behind


# ------------------------------------------------------------------ URI storage (advisory) ----
def read_lock(root: str) -> dict[str, Any] | None:
    """The holder recorded in ``<root>/medcl.lock`` (a path or a URI), or None when there is no lock."""
    from medcl.storage import read_json

    if "://" not in root:
        path = Path(root) / LOCK_FILE
        return _read_local(path) if path.is_file() else None
    return read_json(root, LOCK_FILE)


def _acquire_uri(root: str, what: str, me: dict[str, Any]) -> None:
    from medcl.storage import write_json

    holder = read_lock(root)
    if holder is not None:
        if not _is_stale(holder):
            raise RunLockedError(_describe(what, f"{root}/{LOCK_FILE}", holder))
        logger.warning("reclaiming the stale lock %s/%s of %s (pid %s on %s is gone)", root, LOCK_FILE, what,
                       holder.get("pid"), holder.get("host"))
    write_json(root, LOCK_FILE, me)
    holder = read_lock(root)
    if (holder or {}).get("token") != me["token"]:  # another run wrote its lock just after ours
        raise RunLockedError(_describe(what, f"{root}/{LOCK_FILE}", holder))


def _release_uri(root: str, me: dict[str, Any]) -> None:
    import pyarrow.fs

    if (read_lock(root) or {}).get("token") != me["token"]:
        return
    fs, base = pyarrow.fs.FileSystem.from_uri(root)
    with contextlib.suppress(FileNotFoundError, OSError):
        fs.delete_file(f"{base}/{LOCK_FILE}")


@contextlib.contextmanager
def run_lock(root: str, what: str) -> Iterator[dict[str, Any]]:
    """Hold the lock of the run directory ``root`` (a path or a URI) for the ``with`` block.

    Released however the block ends (return, error, Ctrl-C).

    Args:
        root: ``<storage_path>/<name>`` (:func:`~medcl.runner.plan.run_root`).
        what: The run, for messages (``pipeline 'quickstart'``).

    Yields:
        This holder's identity, as written in the lock.

    Raises:
        RunLockedError: A live process holds the lock (or, on this host, one that cannot be checked).
    """
    me = holder_identity()
    remote = "://" in root
    if remote:
        _acquire_uri(root, what, me)
    else:
        _acquire_local(Path(root), what, me)
    try:
        yield me
    finally:
        if remote:
            _release_uri(root, me)
        else:
            _release_local(Path(root), me)
