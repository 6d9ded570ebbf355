"""Where runs are stored: a local directory or a remote URI (``s3://``, ``gs://``), and small JSON side files there.

A location that crosses a stage (a checkpoint handed to the next stage, the
``init_from`` a CLI run prints) is a local path or a full URI: Ray's
``Checkpoint.path`` is a path *on* ``Checkpoint.filesystem`` (``s3://bucket/x``
becomes ``bucket/x``), so :func:`location` puts the scheme back, and
:func:`local_copy` opens either kind as a local directory. Credentials and a
custom endpoint come from the environment (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ...), which pyarrow reads, not from the URI.

Local writes go to a temporary name first, then are renamed, so a reader never
sees half a file.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Iterator

__all__ = ["atomic_dir", "atomic_path", "refuse_occupied", "is_uri", "local_copy", "location", "resolve_storage", "read_json", "write_json"]

# pyarrow filesystem type_name -> URI scheme that pyarrow.fs.FileSystem.from_uri reads back.
_SCHEMES = {"s3": "s3", "gcs": "gs", "hdfs": "hdfs", "abfs": "abfs", "mock": "mock"}


def is_uri(path: str | os.PathLike | None) -> bool:
    """Whether ``path`` is a URI (``s3://bucket/x``) rather than a local path."""
    return path is not None and "://" in str(path)


def resolve_storage(path: str | Path) -> str:
    """Absolute local path, or a URI (``s3://bucket/prefix``) left as it is."""
    text = str(path)
    return text if is_uri(text) else str(Path(text).resolve())


def location(filesystem: Any, path: str) -> str:
    """The local path or full URI of ``path`` on a pyarrow ``filesystem`` (e.g. a Ray checkpoint's two halves).

    Args:
        filesystem: A ``pyarrow.fs.FileSystem`` (``LocalFileSystem``, ``S3FileSystem``, ...).
        path: A path on it, as Ray keeps it (``bucket/prefix/checkpoint_000001``).

    Returns:
        ``path`` for the local filesystem, else ``<scheme>://<path>`` (``s3://bucket/prefix/checkpoint_000001``).

    Raises:
        ValueError: A filesystem that a URI cannot name (a custom one passed to Ray as ``storage_filesystem``).
    """
    import pyarrow.fs

    if isinstance(filesystem, pyarrow.fs.LocalFileSystem):
        return path
    scheme = _SCHEMES.get(filesystem.type_name)
    if scheme is None:
        raise ValueError(f"cannot name {path!r} on a {filesystem.type_name!r} filesystem as a URI; "
                         f"use a local path or one of {', '.join(sorted(_SCHEMES.values()))}://")
    return f"{scheme}://{path.lstrip('/')}"


@contextlib.contextmanager
def local_copy(path: str | os.PathLike, files: tuple[str, ...] | None = None) -> Iterator[Path]:
    """A local path for ``path``: itself when local, else a temporary copy of the file or directory it names.

    Args:
        path: A local path, or a URI of a file or directory (``s3://bucket/run/checkpoint_000001``).
        files: Copy only these names of a remote directory (e.g. ``("model.pt",)``); None copies it all.

    Yields:
        The local path; a copy is removed when the block ends.

    Raises:
        FileNotFoundError: A URI that names nothing, or a directory without one of ``files``.
    """
    if not is_uri(path):
        yield Path(path)
        return
    import pyarrow.fs

    fs, base = pyarrow.fs.FileSystem.from_uri(str(path))
    info = fs.get_file_info(base)
    if info.type == pyarrow.fs.FileType.NotFound:
        raise FileNotFoundError(f"{path} does not exist")
    with tempfile.TemporaryDirectory(prefix="medcl-fetch-") as tmp:
        local = Path(tmp) / Path(base).name
        if info.type == pyarrow.fs.FileType.File or files is None:
            pyarrow.fs.copy_files(base, str(local), source_filesystem=fs)
        else:
            local.mkdir()
            for name in files:
                if fs.get_file_info(f"{base}/{name}").type != pyarrow.fs.FileType.File:
                    raise FileNotFoundError(f"{str(path).rstrip('/')}/{name} does not exist")
                pyarrow.fs.copy_files(f"{base}/{name}", str(local / name), source_filesystem=fs)
        yield local


def read_json(root: str, name: str) -> dict[str, Any] | None:
    """``root/name`` parsed, or None when the file does not exist."""
    if not is_uri(root):
        path = Path(root) / name
        return json.loads(path.read_text()) if path.is_file() else None
    import pyarrow.fs

    fs, base = pyarrow.fs.FileSystem.from_uri(root)
    try:
        with fs.open_input_file(f"{base}/{name}") as fh:
            return json.loads(fh.readall().decode())
    except (FileNotFoundError, OSError):
        return None


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary name beside ``path`` to write to; renamed onto ``path`` when the block succeeds.

    The name is unique per process and call (``.<name>.<pid>.<random>.tmp``), so threads and
    workers writing the same file never share one; on an error the temporary file is removed
    and ``path`` keeps its old content. Parent directories are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def refuse_occupied(out: str | os.PathLike[str], force: bool, option: str = "--out") -> bool:
    """Whether ``out`` holds something (a file, a non-empty folder); refused without ``force``.

    Raises:
        ValueError: ``out`` is occupied and ``force`` is false (the message names ``option``).
    """
    out = Path(out)
    occupied = out.exists() and (not out.is_dir() or any(out.iterdir()))
    if occupied and not force:
        raise ValueError(f"{out} exists and is not empty; choose another {option} or pass --force to replace it")
    return occupied


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike[str]) -> Iterator[Path]:
    """A new empty folder beside ``out`` to fill; it replaces ``out`` when the block succeeds.

    The folder is ``.<name>.tmp-*`` (normal directory permissions, not ``mkdtemp``'s 0700) and is
    deleted when the block raises, leaving ``out`` as it was. An existing ``out`` is first moved to
    ``.<name>.old-*/data`` and deleted after the swap; if the swap itself fails it is put back. The
    caller decides whether ``out`` may be replaced (:func:`refuse_occupied`).
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    backup = None
    if out.exists() or out.is_symlink():
        backup = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, backup / "data")
    try:
        os.replace(tmp, out)
    except BaseException:
        if backup is not None:
            os.replace(backup / "data", out)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)


def write_json(root: str, name: str, data: dict[str, Any]) -> None:
    """Write ``data`` to ``root/name`` (creating ``root``)."""
    text = json.dumps(data, indent=2, sort_keys=True)
    if not is_uri(root):
        with atomic_path(Path(root) / name) as tmp:
            tmp.write_text(text)
        return
    import pyarrow.fs

    fs, base = pyarrow.fs.FileSystem.from_uri(root)
    fs.create_dir(base, recursive=True)
    with fs.open_output_stream(f"{base}/{name}") as fh:
        fh.write(text.encode())
