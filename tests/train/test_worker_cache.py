"""A single worker reads a small stream from Ray Data once and draws every pass from memory."""
from __future__ import annotations

import types

import numpy as np
import pytest

from in_process import InProcessContext
from medcl.train.batches import CACHE_ENV, epoch_batches

pytestmark = pytest.mark.ray
CFG = types.SimpleNamespace(seed=3, batch_size_per_worker=4, min_steps_per_epoch=0, max_steps_per_epoch=0)


class CountingStream:
    """A Ray dataset that counts how often it is read (any iteration)."""

    def __init__(self, ds) -> None:
        self.ds, self.reads = ds, 0

    def iter_batches(self, **kwargs):
        self.reads += 1
        return self.ds.iter_batches(**kwargs)

    def iter_torch_batches(self, **kwargs):
        self.reads += 1
        return self.ds.iter_torch_batches(**kwargs)


@pytest.fixture()
def stream(ray_session):
    import ray

    rows = [{"row": i, "image": np.full((1, 4, 4), i, np.float32)} for i in range(10)]
    return CountingStream(ray.data.from_items(rows).materialize())


def _passes(batches, per_pass: int, passes: int) -> list[list[int]]:
    flat = [int(r) for b in batches for r in b["row"].tolist()]
    return [flat[k * per_pass:(k + 1) * per_pass] for k in range(passes)]


def test_passes_come_from_memory_after_one_read(stream, monkeypatch):
    monkeypatch.delenv(CACHE_ENV, raising=False)
    ctx = InProcessContext({"train": stream})
    passes = _passes(epoch_batches(ctx, CFG, 0, steps=2, epochs=4), 8, 4)  # 10 rows, 2 full batches a pass
    assert stream.reads == 1
    assert all(len(p) == len(set(p)) == 8 and set(p) <= set(range(10)) for p in passes)
    assert len({tuple(p) for p in passes}) == 4  # each pass its own order
    # the same seed draws the same batches; a resumed run (epoch 2) continues the sequence
    again = _passes(epoch_batches(ctx, CFG, 0, steps=2, epochs=4), 8, 4)
    assert again == passes
    assert _passes(epoch_batches(ctx, CFG, 2, steps=2, epochs=2), 8, 2) == passes[2:]


def test_without_the_cache_every_pass_reads_ray_data(stream, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, "0")
    ctx = InProcessContext({"train": stream})
    passes = _passes(epoch_batches(ctx, CFG, 0, steps=2, epochs=3), 8, 3)
    assert stream.reads == 3 and all(len(set(p)) == 8 for p in passes)
