"""A stage's ``schedule`` setting (issue 14, defect 3): what learning rate each optimiser step uses.

The expected rates are written out here from the definitions in the README
(linear warm-up from ``lr / (W + 1)``; then a constant ``lr``, or a half cosine
from ``lr`` down to ``min_lr_ratio * lr`` at the last step), not taken from the code.
"""
from __future__ import annotations

import math

import pytest
import torch

from medcl.config import ConfigError
from medcl.config.stages import SegFinetuneConfig, stage_config_from_dict
from medcl.train.loop import build_optimizer


def _rates(cfg, steps_per_epoch: int) -> list[float]:
    """The rate each of the stage's optimiser steps runs at."""
    optimizer, scheduler = build_optimizer([torch.nn.Parameter(torch.zeros(1))], cfg, steps_per_epoch)
    rates = []
    for _ in range(cfg.max_epochs * steps_per_epoch):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def test_constant_schedule_keeps_the_rate_after_warm_up():
    cfg = SegFinetuneConfig(lr=1e-3, max_epochs=3, schedule="constant", warmup_steps=4)
    rates = _rates(cfg, steps_per_epoch=5)
    assert rates[:4] == pytest.approx([1e-3 * k / 5 for k in (1, 2, 3, 4)])
    assert rates[4:] == pytest.approx([1e-3] * 11)


def test_cosine_schedule_ends_at_min_lr_ratio():
    lr, ratio, total = 2e-3, 0.1, 12
    cfg = SegFinetuneConfig(lr=lr, max_epochs=4, schedule="cosine", min_lr_ratio=ratio)
    rates = _rates(cfg, steps_per_epoch=3)
    expected = [lr * (ratio + (1 - ratio) * 0.5 * (1 + math.cos(math.pi * s / total))) for s in range(total)]
    assert rates == pytest.approx(expected)
    assert min(rates) > ratio * lr * 0.999  # never below the floor; the default min_lr_ratio 0 decays to 0


def test_warm_up_longer_than_the_stage_is_refused_naming_both_numbers():
    cfg = SegFinetuneConfig(max_epochs=2, warmup_steps=11)
    with pytest.raises(ValueError, match=r"warmup_steps=11 is longer than stage seg_finetune \(2 epochs x 5 steps = 10"):
        build_optimizer([torch.nn.Parameter(torch.zeros(1))], cfg, 5)


def test_unknown_schedule_is_a_config_error():
    with pytest.raises(ConfigError, match="schedule"):
        stage_config_from_dict({"kind": "seg_finetune", "schedule": "linear"})
