"""Where runs are stored: a local directory or a remote URI (``s3://``, ``gs://``), and small JSON side files there.

Local writes go to a temporary name first, then are renamed, so a reader never
sees half a file.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["resolve_storage", "read_json", "write_json"]


def resolve_storage(path: str | Path) -> str:
    """Absolute local path, or a URI (``s3://bucket/prefix``) left as it is."""
    text = str(path)
    return text if "://" in text else str(Path(text).resolve())


def read_json(root: str, name: str) -> dict[str, Any] | None:
    """``root/name`` parsed, or None when the file does not exist."""
    if "://" not in root:
        path = Path(root) / name
        return json.loads(path.read_text()) if path.is_file() else None
    import pyarrow.fs

    fs, base = pyarrow.fs.FileSystem.from_uri(root)
    try:
        with fs.open_input_file(f"{base}/{name}") as fh:
            return json.loads(fh.readall().decode())
    except (FileNotFoundError, OSError):
        return None


def write_json(root: str, name: str, data: dict[str, Any]) -> None:
    """Write ``data`` to ``root/name`` (creating ``root``)."""
    text = json.dumps(data, indent=2, sort_keys=True)
    if "://" not in root:
        path = Path(root) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
        return
    import pyarrow.fs

    fs, base = pyarrow.fs.FileSystem.from_uri(root)
    fs.create_dir(base, recursive=True)
    with fs.open_output_stream(f"{base}/{name}") as fh:
        fh.write(text.encode())
