"""Runtime helpers (seeding, autocast, device, unwrap) and the warm-up cosine LR schedule."""
from __future__ import annotations

import contextlib
import math
import random

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

from medcl.train.runtime import autocast_context, prepare_model_for_device, seed_everything, unwrap
from medcl.train.schedule import warmup_cosine

CUDA = torch.cuda.is_available()


# ---------------------------------------------------------------- seeding
def _draws():
    return random.random(), float(np.random.rand()), float(torch.rand(1))


def test_seed_everything_is_reproducible_and_offsets_by_rank():
    g1 = seed_everything(11)
    a = _draws()
    r1 = torch.rand(3, generator=g1)
    g2 = seed_everything(11)
    assert _draws() == a
    assert torch.equal(torch.rand(3, generator=g2), r1)
    # rank r behaves exactly like seed + r on every library
    g3 = seed_everything(10, rank=1)
    assert _draws() == a
    assert torch.equal(torch.rand(3, generator=g3), r1)
    random.seed(11), np.random.seed(11), torch.manual_seed(11)
    assert _draws() == a
    seed_everything(11, rank=1)
    assert _draws() != a


@pytest.mark.parametrize(
    "args, exc, match",
    [
        ((-1,), ValueError, "seed must be >= 0"),
        ((1.5,), TypeError, "seed must be an int"),
        ((True,), TypeError, "seed must be an int"),
        ((0, -2), ValueError, "rank must be >= 0"),
        ((2**32 - 1, 1), ValueError, "seed \\+ rank must be <="),
    ],
)
def test_seed_everything_validation(args, exc, match):
    with pytest.raises(exc, match=match):
        seed_everything(*args)


# ---------------------------------------------------------------- autocast / device
def test_autocast_is_noop_on_cpu():
    lin = nn.Linear(4, 4)
    for enabled in (True, False):
        ctx = autocast_context("cpu", enabled)
        assert isinstance(ctx, contextlib.nullcontext)
        with ctx:
            assert lin(torch.ones(2, 4)).dtype == torch.float32
    with pytest.raises(TypeError, match="enabled must be a bool"):
        autocast_context("cpu", 1)
    with pytest.raises(ValueError, match="device must name a torch device"):
        autocast_context("gpu0", True)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_autocast_bf16_and_channels_last_on_cuda():
    conv = prepare_model_for_device(nn.Conv2d(3, 8, 3), "cuda", channels_last=True)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    with autocast_context(torch.device("cuda"), True):
        assert conv(torch.ones(1, 3, 8, 8, device="cuda")).dtype == torch.bfloat16
    with autocast_context("cuda", False):
        assert conv(torch.ones(1, 3, 8, 8, device="cuda")).dtype == torch.float32


def test_prepare_model_ignores_channels_last_on_cpu():
    conv = prepare_model_for_device(nn.Conv2d(3, 8, 3), torch.device("cpu"), channels_last=True)
    assert conv.weight.device.type == "cpu"
    assert conv.weight.is_contiguous() and not conv.weight.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        prepare_model_for_device(object(), "cpu", False)
    with pytest.raises(TypeError, match="channels_last must be a bool"):
        prepare_model_for_device(conv, "cpu", "yes")


# ---------------------------------------------------------------- unwrap
def test_unwrap_inside_a_process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        inner = nn.Linear(2, 2)
        ddp = nn.parallel.DistributedDataParallel(inner)
        assert unwrap(ddp) is inner
    finally:
        dist.destroy_process_group()


def test_unwrap_plain_and_compiled():
    inner = nn.Linear(2, 2)
    assert unwrap(inner) is inner
    compiled = torch.compile(inner)  # wrapping only; nothing is compiled until called
    assert unwrap(compiled) is inner
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        unwrap("model")


# ---------------------------------------------------------------- schedule
def _closed_form(s, base, w, t, r):
    """The documented schedule, written out independently."""
    if s < w:
        return base * (s + 1) / (w + 1)
    return base * (r + (1 - r) * 0.5 * (1 + math.cos(math.pi * min(s - w, t - w) / (t - w))))


@pytest.mark.parametrize("min_lr_ratio", [0.0, 0.1])
def test_warmup_cosine_values(min_lr_ratio):
    base, w, t = 0.4, 4, 24
    opt = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=base)
    sched = warmup_cosine(opt, warmup_steps=w, total_steps=t, min_lr_ratio=min_lr_ratio)
    lrs = [opt.param_groups[0]["lr"]]
    for _ in range(t + 3):
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(base / 5)  # step 0: (0+1)/(4+1), never 0
    assert lrs[w - 1] == pytest.approx(base * 4 / 5)  # last warm-up step
    assert lrs[w] == pytest.approx(base)  # end of warm-up = peak
    assert lrs[(w + t) // 2] == pytest.approx(base * (min_lr_ratio + (1 - min_lr_ratio) * 0.5))  # mid-decay
    assert lrs[t] == pytest.approx(base * min_lr_ratio)  # end
    assert lrs[t + 3] == pytest.approx(base * min_lr_ratio)  # stays at the floor
    assert lrs == pytest.approx([_closed_form(s, base, w, t, min_lr_ratio) for s in range(t + 4)])
    assert all(b <= a + 1e-12 for a, b in zip(lrs[w:], lrs[w + 1 :]))  # monotone decay


def test_warmup_cosine_without_warmup_and_per_group_base_lr():
    m1, m2 = nn.Linear(2, 2), nn.Linear(2, 2)
    opt = torch.optim.SGD([{"params": m1.parameters(), "lr": 1.0}, {"params": m2.parameters(), "lr": 0.1}], lr=1.0)
    sched = warmup_cosine(opt, warmup_steps=0, total_steps=10)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1.0, 0.1])
    for _ in range(5):
        opt.step()
        sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.5, 0.05])


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"warmup_steps": -1, "total_steps": 10}, ValueError, "warmup_steps must be >= 0"),
        ({"warmup_steps": 0, "total_steps": 0}, ValueError, "total_steps must be >= 1"),
        ({"warmup_steps": 11, "total_steps": 10}, ValueError, "warmup_steps must be <= total_steps"),
        ({"warmup_steps": 1.0, "total_steps": 10}, TypeError, "warmup_steps must be an int"),
        ({"warmup_steps": 1, "total_steps": 10, "min_lr_ratio": 1.5}, ValueError, r"min_lr_ratio must be in \[0, 1\]"),
    ],
)
def test_warmup_cosine_validation(kwargs, exc, match):
    opt = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    with pytest.raises(exc, match=match):
        warmup_cosine(opt, **kwargs)
