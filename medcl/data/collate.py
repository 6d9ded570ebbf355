"""Worker side of the Ray Data streams: batches as torch tensors, MICLe / partition sampling of bags.

Runs in the Ray Train worker (``collate_fn`` of ``iter_torch_batches``); the driver side, which
builds the streams, is :mod:`medcl.data.streams`. Ray's default ``iter_torch_batches()`` (no
``collate_fn``) raises ``TypeError`` on the str columns: iterate with :func:`torch_batches`
(:class:`TensorCollate`: numeric columns become tensors on the device, ids stay numpy str
arrays). Bags are streamed as rows; MICLe/partition sampling runs here, in
:class:`MiclePairCollate` and :class:`PartitionCollate`. In a Ray Train worker::

    shard = ray.train.get_dataset_shard("train")
    for batch in torch_batches(shard, batch_size=32):          # dict of tensors (+ str arrays)
        ...
    for batch in torch_batches(bags_shard, 16, collate_fn=MiclePairCollate(seed=0)):
        z_a, z_b = model(view(batch["image_a"])), model(view(batch["image_b"]))
"""
from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
from ray.data.collate_fn import NumpyBatchCollateFn

if TYPE_CHECKING:
    import torch

# torch (and the torch-based bags module) are imported inside the functions that need them:
# :mod:`medcl.data.streams` imports this module, and Ray Data ships its functions to fresh
# worker processes, where importing torch costs seconds per worker.

__all__ = [
    "TensorCollate",
    "MiclePairCollate",
    "PartitionCollate",
    "torch_batches",
    "tensor_from_numpy",
]


def tensor_from_numpy(array: np.ndarray) -> torch.Tensor:
    """Tensor sharing memory with ``array`` when it is writable and contiguous (else from a copy)."""
    import torch

    return torch.from_numpy(np.require(array, requirements=["C", "W"]))


def _resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"``: the Ray Train worker's device (CPU outside a training function)."""
    import torch

    if isinstance(device, str) and device == "auto":
        from ray.train.torch import get_device

        try:
            device = get_device()
        except RuntimeError:  # not inside a Ray Train training function
            return torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:  # collate runs on Ray's fetch threads: pin the index
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    import torch

    out: dict[str, Any] = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            out[key] = value.to(device, non_blocking=True)
        elif isinstance(value, np.ndarray) and value.dtype.kind in "biuf":
            out[key] = tensor_from_numpy(value).to(device, non_blocking=True)
        else:
            out[key] = np.asarray(value)
    return out


class TensorCollate(NumpyBatchCollateFn):
    """Numeric columns -> torch tensors on ``device``; string columns stay numpy str arrays."""

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = _resolve_device(device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        return _to_device(batch, self.device)


class _SamplingCollate(NumpyBatchCollateFn):
    def __init__(self, seed: Any = None, device: str | torch.device = "cpu") -> None:
        self.rng = np.random.default_rng(seed)
        self.lock = threading.Lock()  # Ray calls collate_fn from several threads
        self.device = _resolve_device(device)


class MiclePairCollate(_SamplingCollate):
    """``collate_fn`` for bag streams: ``sample_micle_pairs`` (two different images per bag).

    Args:
        seed: seed of the pair choice, anything ``numpy.random.default_rng`` takes (e.g.
            ``[seed, rank]`` for one stream per worker; None: OS entropy).
        device: where the tensors go (``"auto"``: the Ray Train device).
    """

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        from medcl.data.bags import sample_micle_pairs

        with self.lock:
            out = sample_micle_pairs(batch, self.rng)
        return _to_device(out, self.device)


class PartitionCollate(_SamplingCollate):
    """``collate_fn`` for bag streams: ``sample_partitions`` (one slice per volume partition).

    Args:
        num_partitions: S partitions per volume.
        seed: seed of the slice choice, as for ``MiclePairCollate``.
        device: where the tensors go (``"auto"``: the Ray Train device).
    """

    def __init__(self, num_partitions: int = 4, seed: Any = None, device: str | torch.device = "cpu") -> None:
        if isinstance(num_partitions, bool) or not isinstance(num_partitions, int) or num_partitions < 1:
            raise ValueError(f"num_partitions must be an integer >= 1, got {num_partitions!r}")
        super().__init__(seed, device)
        self.num_partitions = num_partitions

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        from medcl.data.bags import sample_partitions

        with self.lock:
            out = sample_partitions(batch, self.num_partitions, self.rng)
        return _to_device(out, self.device)


def torch_batches(shard: Any, batch_size: int, *, collate_fn: NumpyBatchCollateFn | None = None,
                  device: str | torch.device = "auto", drop_last: bool = False,
                  local_shuffle_buffer_size: int | None = None, local_shuffle_seed: int | None = None,
                  prefetch_batches: int = 1):
    """Iterate a Ray dataset shard (``ray.train.get_dataset_shard(...)``) or Dataset as torch batches.

    Args:
        shard: a ``DataIterator`` or ``Dataset``.
        batch_size: rows (bags for bag streams) per batch, >= 1.
        collate_fn: a ``NumpyBatchCollateFn`` (default ``TensorCollate(device)``).
        device: target device of the default collate (``"auto"``: the Ray Train device, else CPU).
        drop_last: drop a last incomplete batch (keep workers in step under DDP).
        local_shuffle_buffer_size: rows of the local shuffle buffer (None: no shuffle).
        local_shuffle_seed: seed of the local shuffle.
        prefetch_batches: batches fetched ahead.

    Returns:
        An iterable of dicts: tensors for numeric columns, numpy str arrays for id columns.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if collate_fn is None:
        collate_fn = TensorCollate(device)
    return shard.iter_torch_batches(batch_size=batch_size, collate_fn=collate_fn, drop_last=drop_last,
                                    local_shuffle_buffer_size=local_shuffle_buffer_size,
                                    local_shuffle_seed=local_shuffle_seed, prefetch_batches=prefetch_batches)
