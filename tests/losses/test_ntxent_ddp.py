"""gather_distributed=True on a real 2-process gloo group (CPU) vs. the single-process loss.

Convention under test (medcl.losses._distributed): the mean over ranks of the
per-rank losses equals the single-process loss on the concatenated batch, and
after DDP averages gradients over ranks the model gradient equals the
single-process gradient. For input tensors (not averaged by DDP) that means
``grad on rank r / world_size == d(single loss)/d(rank r's rows)``.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from medcl.losses import multi_positive_nt_xent, nt_xent

WORLD = 2
TAU = 0.1
# rows per rank: unequal sizes exercise the padded gather and the global anchor count
NT_SIZES = {"equal": (3, 3), "unequal": (3, 2)}
MP_SIZES = (5, 7)
# group ids of the 12 multi-positive rows (rank 0: first 5); 4, 6, 9 have no positive
MP_IDS = [0, 1, 2, 0, 3, 1, 4, 3, 0, 6, 2, 2]
# second case: rank 1's ids are all unique -> rank 1 has no anchor of its own
MP_IDS_NO_LOCAL = [0, 1, 0, 1, 2, 10, 11, 12, 13, 14, 15, 16]


def _data(seed: int, n: int, d: int = 5) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _rows(sizes, r):
    start = sum(sizes[:r])
    return slice(start, start + sizes[r])


def _worker(r: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=r, world_size=WORLD)
    torch.set_num_threads(1)
    res: dict[str, object] = {}
    # 1. nt_xent on leaf inputs, equal and unequal per-rank batch sizes
    for name, sizes in NT_SIZES.items():
        total = sum(sizes)
        z1 = _data(1, total)[_rows(sizes, r)].requires_grad_()
        z2 = _data(2, total)[_rows(sizes, r)].requires_grad_()
        loss = nt_xent(z1, z2, TAU, gather_distributed=True)
        res[f"nt_{name}"] = (loss.detach(), *torch.autograd.grad(loss, (z1, z2)))
    # 2. multi-positive on leaf inputs
    for name, ids in (("mp", MP_IDS), ("mp_no_local", MP_IDS_NO_LOCAL)):
        z = _data(3, sum(MP_SIZES))[_rows(MP_SIZES, r)].requires_grad_()
        g = torch.tensor(ids)[_rows(MP_SIZES, r)]
        loss = multi_positive_nt_xent(z, g, TAU, gather_distributed=True)
        res[name] = (loss.detach(), torch.autograd.grad(loss, z)[0])
    # 3. a real DDP model: gradients are averaged by DDP itself
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(6, 4).double())
    b = 3
    x1 = _data(4, WORLD * b, 6)[r * b:(r + 1) * b]
    x2 = _data(5, WORLD * b, 6)[r * b:(r + 1) * b]
    z1, z2 = model(torch.cat([x1, x2])).split(b)
    loss = nt_xent(z1, z2, TAU, gather_distributed=True)
    loss.backward()
    res["ddp"] = (loss.detach(), model.module.weight.grad.clone(), model.module.bias.grad.clone())
    torch.save(res, os.path.join(out, f"rank{r}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    tmp: Path = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(str(tmp / "store"), str(tmp)), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]


def _assert_matches_single(per_rank, single_loss, inputs, sizes_per_input):
    losses = torch.stack([p[0] for p in per_rank])
    torch.testing.assert_close(losses.mean(), single_loss.detach(), rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(single_loss, inputs)
    for k, (g_single, sizes) in enumerate(zip(grads, sizes_per_input)):
        for r in range(WORLD):
            torch.testing.assert_close(per_rank[r][1 + k] / WORLD, g_single[_rows(sizes, r)], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", list(NT_SIZES))
def test_nt_xent_gathered_equals_single_process(ranks, name):
    sizes = NT_SIZES[name]
    z1 = _data(1, sum(sizes)).requires_grad_()
    z2 = _data(2, sum(sizes)).requires_grad_()
    single = nt_xent(z1, z2, TAU)
    _assert_matches_single([rk[f"nt_{name}"] for rk in ranks], single, (z1, z2), (sizes, sizes))


@pytest.mark.parametrize("name, ids", [("mp", MP_IDS), ("mp_no_local", MP_IDS_NO_LOCAL)])
def test_multi_positive_gathered_equals_single_process(ranks, name, ids):
    z = _data(3, sum(MP_SIZES)).requires_grad_()
    single = multi_positive_nt_xent(z, torch.tensor(ids), TAU)
    _assert_matches_single([rk[name] for rk in ranks], single, (z,), (MP_SIZES,))


def test_ddp_model_gradient_equals_single_process(ranks):
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 4).double()
    b = 3
    z1 = model(_data(4, WORLD * b, 6))
    z2 = model(_data(5, WORLD * b, 6))
    single = nt_xent(z1, z2, TAU)
    single.backward()
    losses = torch.stack([rk["ddp"][0] for rk in ranks])
    torch.testing.assert_close(losses.mean(), single.detach(), rtol=1e-12, atol=1e-12)
    for rk in ranks:
        torch.testing.assert_close(rk["ddp"][1], model.weight.grad, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(rk["ddp"][2], model.bias.grad, rtol=1e-10, atol=1e-12)
