"""The batches one stage run trains on: one sequence of passes over its stream, cut into epochs.

:func:`steps_per_epoch` is the budget (whole passes until a minimum, then a cap);
:func:`epoch_batches` yields the batches; :func:`medcl.train.loop.run_loop` takes
``steps_per_epoch`` of them an epoch from one iterator, so a capped epoch goes on
where the previous one stopped and the LR schedule counts exactly the steps taken.
"""
from __future__ import annotations

import math
from typing import Any, Callable

from medcl.train.context import StageContext

__all__ = ["epoch_batches", "steps_per_epoch"]


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

    from medcl.data.collate import torch_batches

    if collate_fn is not None and pass_collate is not None:
        raise TypeError("give collate_fn or pass_collate, not both")
    data = ctx.dataset(name)
    batch_size = cfg.batch_size_per_worker

    def one_pass(p: int):
        seed = (cfg.seed * 1_000_003 + p) * 1009 + ctx.world_rank
        return torch_batches(data, batch_size, collate_fn=pass_collate(p) if pass_collate else collate_fn,
                             device=ctx.device, drop_last=True, local_shuffle_buffer_size=shuffle_buffer,
                             local_shuffle_seed=seed)

    per_pass = None
    if steps is None or epoch > 0:  # rows of this worker's pass: the blocks, without collation
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
