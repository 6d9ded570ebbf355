"""Per-epoch step budget: ``min_steps_per_epoch`` cycles small data, ``max_steps_per_epoch`` caps large data."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from medcl.config import SegFinetuneConfig
from medcl.train.context import StageContext
from medcl.train.loop import epoch_batches, steps_per_epoch


@pytest.mark.parametrize(
    ("rows", "batch", "world", "min_steps", "max_steps", "expected"),
    [
        (100, 8, 1, 0, 0, 12),     # one pass: floor(100 / 8)
        (100, 8, 2, 0, 0, 6),      # 50 rows a worker: floor(50 / 8)
        (20, 8, 1, 5, 0, 6),       # 2 steps a pass, 3 passes reach >= 5
        (100, 8, 1, 0, 5, 5),      # cap inside one pass
        (20, 8, 1, 5, 5, 5),       # cycled to 6 then capped to 5: every fraction gets exactly 5
        (1000, 8, 1, 60, 60, 60),  # a large fraction is capped to the same 60
        (3, 8, 1, 0, 0, 1),        # fewer rows than a batch still counts one step
    ],
)
def test_steps_per_epoch_matches_hand_counts(rows, batch, world, min_steps, max_steps, expected):
    assert steps_per_epoch(rows, batch, world, min_steps, max_steps) == expected


def test_max_below_min_is_refused_naming_both():
    with pytest.raises(ValueError, match=r"max_steps_per_epoch.*min_steps_per_epoch=10.*got 4"):
        SegFinetuneConfig(min_steps_per_epoch=10, max_steps_per_epoch=4)


@dataclass
class _Local(StageContext):
    data: Any = None

    def dataset(self, name: str) -> Any:
        return self.data


@dataclass(frozen=True)
class _Budget:
    seed: int = 0
    batch_size_per_worker: int = 4
    min_steps_per_epoch: int = 0
    max_steps_per_epoch: int = 0


@pytest.mark.parametrize(("min_steps", "max_steps", "expected"), [(0, 0, 5), (0, 3, 3), (7, 0, 10), (7, 7, 7)])
def test_epoch_batches_yields_exactly_the_budgeted_steps(ray_session, min_steps, max_steps, expected):
    ds = ray_session.data.from_items([{"image": np.full((1, 2, 2), i, np.float32)} for i in range(22)])
    cfg = _Budget(min_steps_per_epoch=min_steps, max_steps_per_epoch=max_steps)
    batches = list(epoch_batches(_Local(data=ds), cfg, epoch=0))
    # 22 rows, batch 4, incomplete batches dropped: 5 steps a pass
    assert len(batches) == expected == steps_per_epoch(22, 4, 1, min_steps, max_steps)
    assert all(b["image"].shape == (4, 1, 2, 2) for b in batches)
