"""What a single-stage run is: its default name, and the record that refuses to resume it with other settings.

Ray Train resumes a run by its name (``<storage_path>/<name>``): a second
``medcl pretrain`` under the same name with other settings would silently
continue, or return, the first run's model. So the default name is derived
from the settings (``<kind>-<hash of the resolved stage config and the
dataset>``): other settings get another run, the same settings resume. A run
also keeps ``stage.json`` (its config and dataset) beside Ray's files, and a
run under an explicit ``--name`` whose settings differ from that record is
refused, naming what changed (as :func:`medcl.runner.plan.check_resumable` does
for pipelines with ``plan.json``).

Example:
    >>> stage_run_name(GlobalPretrainConfig(lr=1e-3), "data/synth")  # doctest: +SKIP
    'global_pretrain-4f0c2a9d1e'
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from medcl.config.binder import to_dict
from medcl.config.stages import StageConfig
from medcl.storage import read_json, resolve_storage, write_json

__all__ = ["STAGE_FILE", "check_stage_resumable", "stage_record", "stage_run_name", "write_stage_record"]

STAGE_FILE = "stage.json"


def _manifest_digest(dataset_dir: str | Path) -> str | None:
    """SHA-256 of the dataset's ``manifest.json`` (its shards' checksums included), or None without one."""
    from medcl.data.schema import MANIFEST_NAME

    path = Path(dataset_dir) / MANIFEST_NAME
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def stage_record(cfg: StageConfig, dataset_dir: str | Path) -> dict[str, Any]:
    """What a single-stage run is: the resolved stage config, the dataset's path and its manifest's digest."""
    return {"config": json.loads(json.dumps(to_dict(cfg), default=str)),
            "dataset": str(Path(dataset_dir).resolve()), "manifest_sha256": _manifest_digest(dataset_dir)}


def stage_run_name(cfg: StageConfig, dataset_dir: str | Path) -> str:
    """The default run name: ``<kind>-<10 hex digits of the SHA-256 of stage_record>``; equal settings, equal name."""
    text = json.dumps(stage_record(cfg, dataset_dir), sort_keys=True)
    return f"{cfg.kind}-{hashlib.sha256(text.encode()).hexdigest()[:10]}"


def write_stage_record(cfg: StageConfig, dataset_dir: str | Path, storage_path: str | Path, name: str) -> None:
    """Keep ``stage.json`` in the run's directory ``<storage_path>/<name>`` (a path or a URI)."""
    write_json(f"{resolve_storage(storage_path)}/{name}", STAGE_FILE, stage_record(cfg, dataset_dir))


def _changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    changes = []
    if old.get("dataset") != new["dataset"]:
        changes.append(f"dataset {old.get('dataset')} -> {new['dataset']}")
    elif old.get("manifest_sha256") != new["manifest_sha256"]:
        changes.append(f"dataset contents (manifest.json of {new['dataset']} was rewritten)")
    old_cfg, new_cfg = old.get("config", {}), new["config"]
    for key in sorted(set(old_cfg) | set(new_cfg)):
        if old_cfg.get(key) != new_cfg.get(key):
            changes.append(f"{key} {old_cfg.get(key)!r} -> {new_cfg.get(key)!r}")
    return changes


def check_stage_resumable(cfg: StageConfig, dataset_dir: str | Path, storage_path: str | Path, name: str) -> bool:
    """Refuse to resume the run ``<storage_path>/<name>`` when it was started with other settings.

    Returns:
        True when a run of these settings exists there (Ray resumes it), False for a new run.

    Raises:
        ValueError: ``stage.json`` there records another config or dataset; the message names what changed.
    """
    root = f"{resolve_storage(storage_path)}/{name}"
    old = read_json(root, STAGE_FILE)
    if old is None:
        return False
    changes = _changes(old, stage_record(cfg, dataset_dir))
    if changes:
        raise ValueError(f"stage run {name!r} at {root} was started with other settings ({'; '.join(changes)}); "
                         f"leave --name out to name the run after its settings, give it a new name (--name "
                         f"{name}-2), or delete {root} to start over")
    return True
