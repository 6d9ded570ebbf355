"""Checkpoint directories: save, safe load, stage hand-over.

A checkpoint is a directory::

    model.pt       state_dict of the unwrapped model (no ``module.`` prefix)
    optimizer.pt   optimizer.state_dict()            (if an optimizer was given)
    scheduler.pt   scheduler.state_dict()            (if a scheduler was given)
    scaler.pt      GradScaler.state_dict()           (if a scaler was given)
    meta.json      {"format": 1, "epoch", "step", "config", "metrics", "files"}

Every file is written under a temporary name in the same directory and moved
into place with ``os.replace``; ``meta.json`` comes last, so a directory with a
``meta.json`` is complete. Loading uses ``torch.load(weights_only=True)`` only:
tensors and plain containers load, any other pickled object is refused, so a
checkpoint from an untrusted source cannot run code.

Reporting checkpoints to Ray and resuming from them is the stage loop's job
(:func:`medcl.train.loop.fit` through :mod:`medcl.train.context`); this module
does not import Ray.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from medcl.storage import atomic_path, is_uri, local_copy
from medcl.train.runtime import unwrap

logger = logging.getLogger(__name__)

__all__ = [
    "save_checkpoint",
    "load_checkpoint",
    "load_model_weights",
    "MODEL_FILE",
    "META_FILE",
]

MODEL_FILE = "model.pt"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
SCALER_FILE = "scaler.pt"
META_FILE = "meta.json"
FORMAT_VERSION = 1


def _jsonable(value: Any, where: str) -> Any:
    """Plain JSON types from config/metrics values (numpy scalars, paths, tuples accepted)."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)  # NaN/inf are kept (json writes NaN/Infinity)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"{where}: keys must be str, got {type(k).__name__} {k!r}")
            out[k] = _jsonable(v, f"{where}.{k}")
        return out
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    raise TypeError(
        f"{where} must be JSON-serialisable (str, int, float, bool, None, list, dict), "
        f"got {type(value).__name__}; convert it (e.g. dataclasses.asdict, float(x)) first"
    )


def _atomic_torch_save(obj: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _atomic_write_text(text: str, path: Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def save_checkpoint(
    directory: str | os.PathLike,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    epoch: int,
    step: int,
    config: Mapping[str, Any],
    metrics: Mapping[str, Any] | None = None,
    scaler: Any = None,
) -> Path:
    """Write a checkpoint directory (see the module doc for its layout).

    Call it on rank 0 only. DDP / ``torch.compile`` wrappers are removed
    before ``state_dict()`` so keys never carry a ``module.`` prefix.

    Args:
        directory: Target directory (created if missing; existing files are replaced).
        model: The model, wrapped or not.
        optimizer: Optimizer whose state to save, or None.
        scheduler: LR scheduler (anything with ``state_dict``), or None.
        epoch: Last completed epoch (0-based); resuming starts at ``epoch + 1``.
        step: Optimizer steps taken so far.
        config: The resolved run config, JSON-serialisable.
        metrics: This epoch's metrics, JSON-serialisable, or None.
        scaler: ``torch.amp.GradScaler`` (fp16 runs), or None.

    Returns:
        The checkpoint directory as a ``Path``.

    Raises:
        TypeError: If ``model`` is not a module or ``config``/``metrics`` is not JSON-serialisable.
        ValueError: If ``epoch`` or ``step`` is not a non-negative int.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for name, value in (("epoch", epoch), ("step", step)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a dict (e.g. cfg.to_dict()), got {type(config).__name__}")
    meta = {
        "format": FORMAT_VERSION,
        "epoch": int(epoch),
        "step": int(step),
        "config": _jsonable(config, "config"),
        "metrics": _jsonable(dict(metrics or {}), "metrics"),
    }
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    (out / META_FILE).unlink(missing_ok=True)  # the directory is incomplete until meta.json is back
    files = [MODEL_FILE]
    _atomic_torch_save(unwrap(model).state_dict(), out / MODEL_FILE)
    for obj, fname in ((optimizer, OPTIMIZER_FILE), (scheduler, SCHEDULER_FILE), (scaler, SCALER_FILE)):
        if obj is not None:
            _atomic_torch_save(obj.state_dict(), out / fname)
            files.append(fname)
        else:
            (out / fname).unlink(missing_ok=True)  # never leave a stale state from an earlier save
    meta["files"] = files
    _atomic_write_text(json.dumps(meta, indent=2, sort_keys=True, allow_nan=True), out / META_FILE)
    logger.debug("saved checkpoint epoch=%d step=%d to %s", epoch, step, out)
    return out


def _safe_load(path: Path, map_location: Any) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ValueError(
            f"refusing to load {path}: it holds pickled objects other than tensors and plain containers, "
            f"and medcl loads only with torch.load(weights_only=True) so that a checkpoint cannot run code. "
            f"Re-save just the state_dict from a trusted copy. ({str(exc).splitlines()[0]})"
        ) from exc


def _read_meta(directory: Path) -> dict[str, Any]:
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(
            f"{meta_path} not found: {directory} is not a complete medcl checkpoint (meta.json is written last)"
        )
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    for field in ("epoch", "step", "config", "metrics"):
        if field not in meta:
            raise ValueError(f"{meta_path} lacks field {field!r}; it was not written by save_checkpoint")
    return meta


def load_checkpoint(
    directory: str | os.PathLike,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    map_location: Any = "cpu",
    scaler: Any = None,
) -> dict[str, Any]:
    """Restore model (strict), optimizer, scheduler and scaler state from a checkpoint directory.

    Args:
        directory: A directory written by :func:`save_checkpoint`.
        model: Module to load into (wrapped or not; loads into the unwrapped module).
        optimizer: Optimizer to restore, or None to skip.
        scheduler: Scheduler to restore, or None to skip.
        map_location: Passed to ``torch.load``; ``"cpu"`` then ``load_state_dict``
            copies onto the parameters' device.
        scaler: GradScaler to restore, or None to skip.

    Returns:
        The meta dict: ``epoch``, ``step``, ``config``, ``metrics``, ``files``, ``format``.

    Raises:
        FileNotFoundError: If ``meta.json`` or a requested state file is missing.
        ValueError: If a file holds arbitrary pickled objects (refused) or is not a state dict.
        RuntimeError: From ``load_state_dict`` when keys or shapes do not match.
    """
    root = Path(directory)
    meta = _read_meta(root)
    state = load_model_weights(root, map_location=map_location)
    unwrap(model).load_state_dict(state)
    for obj, fname, arg in (
        (optimizer, OPTIMIZER_FILE, "optimizer"),
        (scheduler, SCHEDULER_FILE, "scheduler"),
        (scaler, SCALER_FILE, "scaler"),
    ):
        if obj is None:
            continue
        if not (root / fname).is_file():
            raise FileNotFoundError(
                f"{root / fname} not found: the checkpoint was saved without {arg} state; pass {arg}=None"
            )
        obj.load_state_dict(_safe_load(root / fname, map_location))
    return meta


def load_model_weights(path_or_dir: str | os.PathLike, map_location: Any = "cpu") -> dict[str, torch.Tensor]:
    """The model ``state_dict`` of a checkpoint, for handing weights to the next stage.

    Args:
        path_or_dir: A checkpoint directory (its ``model.pt`` is read) or a ``.pt`` file, local or a URI
            (``s3://bucket/run/checkpoint_000001``: only its ``model.pt`` is downloaded, to a temporary directory).
        map_location: Passed to ``torch.load``.

    Returns:
        The state dict (parameter name -> tensor), loaded with ``weights_only=True``.

    Raises:
        FileNotFoundError: If the path or the directory's ``model.pt`` does not exist.
        ValueError: If the file holds arbitrary pickled objects or is not a name -> tensor mapping.
    """
    if is_uri(path_or_dir):
        with local_copy(str(path_or_dir), files=(MODEL_FILE,)) as local:
            return load_model_weights(local, map_location=map_location)
    path = Path(path_or_dir)
    if path.is_dir():
        path = path / MODEL_FILE
    state = _safe_load(path, map_location)
    if not isinstance(state, Mapping) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise ValueError(f"{path} does not hold a model state_dict (a mapping of parameter names to tensors)")
    return dict(state)
