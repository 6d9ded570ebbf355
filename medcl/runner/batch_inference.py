"""Batch inference on Ray Data: read tasks, then ``map_batches`` over an actor pool that holds the model.

The caller (:mod:`medcl.predict`) brings the two functions and no Ray: ``read`` turns a
batch of inputs (file paths) into model-input rows, in Ray tasks; ``model_cls`` is a
class-based UDF constructed once per actor (loading the model there) and called on
batches of ``batch_size`` rows. The pool has ``num_workers`` actors of
``cpus_per_worker`` CPUs (and one GPU each with ``use_gpu``), so the same call scales
from a laptop to a cluster. Rows come back to the driver in no particular order.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["run_batch_inference"]

logger = logging.getLogger(__name__)


def run_batch_inference(items: Sequence[Mapping[str, Any]], read: Callable[..., dict[str, np.ndarray]],
                        model_cls: type, *, read_kwargs: Mapping[str, Any], model_kwargs: Mapping[str, Any],
                        num_workers: int = 1, use_gpu: bool = False, batch_size: int = 64,
                        cpus_per_worker: float = 1.0, items_per_read: int = 1) -> Iterator[dict[str, np.ndarray]]:
    """Stream the model's outputs for ``items`` as numpy batches.

    Args:
        items: One dict of scalars per input (e.g. ``{"index": 0, "path": "..."}``).
        read: ``read(batch, **read_kwargs)`` -> rows (a dict of equal-length arrays), run in Ray tasks.
        model_cls: Class-based UDF: ``model_cls(**model_kwargs)`` once per actor, then called on batches.
        read_kwargs, model_kwargs: Their keyword arguments (picklable).
        num_workers: Actors in the pool.
        use_gpu: One GPU per actor.
        batch_size: Rows per model call.
        cpus_per_worker: Ray CPUs per actor.
        items_per_read: Inputs per read task call (1 for volumes; more for small 2-D images).

    Yields:
        The model's output batches (``batch_format="numpy"``).

    Raises:
        ValueError: ``use_gpu`` on a cluster without GPUs, or a bad count.
    """
    import ray
    from ray.data import ActorPoolStrategy

    if num_workers < 1 or batch_size < 1:
        raise ValueError(f"num_workers and batch_size must be >= 1, got {num_workers} and {batch_size}")
    if use_gpu and ray.cluster_resources().get("GPU", 0) < 1:
        raise ValueError("--use-gpu: the Ray cluster has no GPU")
    ds = ray.data.from_items(list(items), override_num_blocks=max(1, len(items) // max(1, items_per_read)))
    ds = ds.map_batches(read, fn_kwargs=dict(read_kwargs), batch_size=items_per_read, batch_format="numpy")
    ds = ds.map_batches(model_cls, fn_constructor_kwargs=dict(model_kwargs), batch_size=batch_size,
                        batch_format="numpy", compute=ActorPoolStrategy(size=num_workers),
                        num_cpus=cpus_per_worker, num_gpus=1 if use_gpu else None)
    yield from ds.iter_batches(batch_size=None, batch_format="numpy")
