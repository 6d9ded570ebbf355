"""The batches one stage run trains on: one sequence of passes over its stream, cut into epochs.

:func:`steps_per_epoch` is the budget (whole passes until a minimum, then a cap);
:func:`epoch_batches` yields the batches; :func:`medcl.train.loop.run_loop` takes
``steps_per_epoch`` of them an epoch from one iterator, so a capped epoch goes on
where the previous one stopped and the LR schedule counts exactly the steps taken.
"""
from __future__ import annotations

import math
import os
from typing import Any, Callable

import numpy as np

from medcl.train.context import StageContext

__all__ = ["epoch_batches", "steps_per_epoch", "CACHE_ENV", "cached_rows"]

#: Environment variable: MB of a single worker's stream kept in memory after its first read
#: (default 1024; 0 streams every pass from Ray Data).
CACHE_ENV = "MEDCL_WORKER_CACHE_MB"


def cached_rows(data: Any, limit_bytes: int) -> dict[str, np.ndarray] | None:
    """Every row of ``data`` as numpy columns (one read), or None when they exceed ``limit_bytes``."""
    columns: dict[str, list[np.ndarray]] = {}
    size = 0
    for block in data.iter_batches(batch_size=None, batch_format="numpy"):
        size += sum(v.nbytes for v in block.values() if isinstance(v, np.ndarray))
        if size > limit_bytes:
            return None
        for key, value in block.items():
            columns.setdefault(key, []).append(np.asarray(value))
    return {key: np.concatenate(parts) for key, parts in columns.items()}


def steps_per_epoch(num_rows: int, batch_size_per_worker: int, world_size: int, min_steps: int = 0,
                    max_steps: int = 0) -> int:
    """Optimiser steps each worker takes per epoch.

    Whole passes of full batches until there are at least ``min_steps``, then
    capped at ``max_steps`` (0: no cap).
    """
    per_pass = max(1, math.floor(num_rows / world_size) // batch_size_per_worker)
    steps = per_pass * max(1, math.ceil(min_steps / per_pass))
    return min(steps, max_steps) if max_steps > 0 else steps


def epoch_batches(ctx: StageContext, cfg: Any, epoch: int, name: str = "train", *, collate_fn=None,
                  shuffle_buffer: int = 256, steps: int | None = None, epochs: int | None = 1,
                  pass_collate: Callable[[int], Any] | None = None):
    """This worker's batches of dataset ``name`` from epoch ``epoch`` on, as tensors on ``ctx.device``.

    The batches are cut from one endless sequence of passes over the stream: pass ``p`` is a
    fresh iteration whose local shuffle is seeded by ``(cfg.seed, ctx.world_rank, p)``, and epoch
    ``e`` is that sequence's batches ``e * steps`` to ``(e + 1) * steps - 1``. A capped epoch
    (``cfg.max_steps_per_epoch``) therefore goes on where the previous one stopped, so every
    row comes round once a pass (with the streams' global shuffle, any epoch is a uniform sample
    of the whole set), and a small set is cycled (``cfg.min_steps_per_epoch``: an uncapped epoch
    is whole passes, at least that many steps). Incomplete batches are dropped, so every DDP
    rank (an equal share of the rows each) takes the same number of steps a pass; a stream
    with no full batch yields nothing.

    Starting at ``epoch > 0`` (a resumed run) gives the batches a run from epoch 0 gives from
    that step on (the same rows in the same batches): the rows a pass holds are counted (one
    pass without collation), whole passes are skipped, and the first batches of the pass the
    epoch starts in are drawn and dropped (less than a pass). Under DDP which rows each rank
    gets in a pass is Ray Data's split, so there only the steps a rank takes are fixed.

    A single worker (no DDP) whose stream fits in ``MEDCL_WORKER_CACHE_MB`` (default 1024 MB)
    reads it from Ray Data once and draws every pass from memory: pass ``p`` is a permutation
    seeded like Ray's local shuffle, cut into full batches and collated as Ray would. Each Ray
    Data pass costs a fixed start-up (~0.1 s on a CPU worker), which a small labelled set cycled
    every few steps would pay most steps. The stages' streams hold fixed rows (augmentation runs
    in the loss), so a cached pass is a fresh random order of the same rows, as a streamed one.

    Args:
        ctx: Where the loop runs.
        cfg: The stage config (``seed``, ``batch_size_per_worker``, ``min_steps_per_epoch``,
            ``max_steps_per_epoch``).
        epoch: The first epoch to yield.
        name: The dataset.
        collate_fn: The ``collate_fn`` of every pass (None: plain tensors).
        shuffle_buffer: Rows of the local shuffle window.
        steps: Steps per epoch (the LR schedule's ``StageInputs.steps_per_epoch``); None: derived
            from this worker's rows a pass as ``steps_per_epoch`` does (counted with one pass).
        epochs: How many epochs to yield (None: endless; the caller takes ``steps`` an epoch,
            e.g. with ``itertools.islice``).
        pass_collate: ``pass_collate(p)`` gives pass ``p``'s ``collate_fn`` (instead of ``collate_fn``;
            a sampling collate seeded per pass makes a resumed run draw what an uninterrupted one does).

    Returns:
        An iterator of batches: dicts of tensors on ``ctx.device`` (and numpy str arrays for ids).
    """
    from itertools import islice

    from medcl.data.collate import TensorCollate, torch_batches

    if collate_fn is not None and pass_collate is not None:
        raise TypeError("give collate_fn or pass_collate, not both")
    data = ctx.dataset(name)
    batch_size = cfg.batch_size_per_worker
    limit_mb = float(os.environ.get(CACHE_ENV, "1024"))
    cache = cached_rows(data, int(limit_mb * 2**20)) if ctx.world_size == 1 and limit_mb > 0 else None

    def one_pass(p: int):
        seed = (cfg.seed * 1_000_003 + p) * 1009 + ctx.world_rank
        collate = pass_collate(p) if pass_collate else collate_fn
        if cache is not None:
            return _cached_pass(cache, batch_size, seed, collate or TensorCollate(ctx.device))
        return torch_batches(data, batch_size, collate_fn=collate, device=ctx.device, drop_last=True,
                             local_shuffle_buffer_size=shuffle_buffer, local_shuffle_seed=seed)

    per_pass = None
    if cache is not None:
        per_pass = len(next(iter(cache.values()))) // batch_size if cache else 0
    elif steps is None or epoch > 0:  # rows of this worker's pass: the blocks, without collation
        rows = sum(block.num_rows for block in data.iter_batches(batch_size=None, batch_format="pyarrow"))
        per_pass = rows // batch_size
    if steps is None:
        steps = steps_per_epoch(per_pass * batch_size, batch_size, 1, getattr(cfg, "min_steps_per_epoch", 0),
                                getattr(cfg, "max_steps_per_epoch", 0))

    def passes():
        first, skip = divmod(epoch * steps, per_pass) if epoch > 0 and per_pass else (0, 0)
        p = first
        while True:
            drawn = 0
            for batch in one_pass(p):
                drawn += 1
                if drawn > skip:
                    yield batch
            if drawn == 0:  # no full batch: nothing to cycle
                return
            p, skip = p + 1, 0

    return passes() if epochs is None else islice(passes(), epochs * steps)


def _cached_pass(columns: dict[str, np.ndarray], batch_size: int, seed: int, collate: Callable[[dict], Any]):
    """One pass over in-memory rows: a seeded permutation cut into full batches, each collated."""
    n = len(next(iter(columns.values()))) if columns else 0
    order = np.random.default_rng(seed).permutation(n)
    for start in range(0, n - batch_size + 1, batch_size):
        rows = order[start:start + batch_size]
        yield collate({key: value[rows] for key, value in columns.items()})
