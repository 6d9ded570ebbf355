"""NT-Xent and multi-positive NT-Xent vs. slow float64 references written from methods 1a/1b."""
from __future__ import annotations

import math
from unittest import mock

import pytest
import torch

from medcl.losses import MultiPositiveNTXentLoss, NTXentLoss, multi_positive_nt_xent, nt_xent


def ref_nt_xent(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> torch.Tensor:
    """Per-anchor loop straight from the paper formula."""
    z = torch.cat([z1, z2]).double()
    z = z / z.norm(dim=1, keepdim=True)
    n, b = z.shape[0], z1.shape[0]
    losses = []
    for i in range(n):
        p = (i + b) % n
        num = torch.exp(z[i] @ z[p] / tau)
        den = sum(torch.exp(z[i] @ z[k] / tau) for k in range(n) if k != i)
        losses.append(-torch.log(num / den))
    return torch.stack(losses).mean()


def ref_multi_positive(z: torch.Tensor, ids: torch.Tensor, tau: float) -> torch.Tensor:
    z = z.double()
    z = z / z.norm(dim=1, keepdim=True)
    n = z.shape[0]
    losses = []
    for i in range(n):
        pos = [p for p in range(n) if p != i and ids[p] == ids[i]]
        if not pos:
            continue
        others = torch.stack([z[i] @ z[k] / tau for k in range(n) if k != i])
        log_den = torch.logsumexp(others, 0)
        losses.append(-torch.stack([z[i] @ z[p] / tau - log_den for p in pos]).mean())
    return torch.stack(losses).mean()


def _pair(b: int, d: int, dtype=torch.float64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(b, d, generator=g, dtype=dtype).requires_grad_()
    z2 = torch.randn(b, d, generator=g, dtype=dtype).requires_grad_()
    return z1, z2


class TestNTXent:
    @pytest.mark.parametrize("b", [1, 3, 6])
    @pytest.mark.parametrize("tau", [0.05, 0.1, 0.5, 0.01])
    @pytest.mark.parametrize("chunk_size", [None, 4])
    def test_value_and_grad_vs_reference(self, b, tau, chunk_size, lse_backward):
        z1, z2 = _pair(b, 5)
        loss = nt_xent(z1, z2, temperature=tau, chunk_size=chunk_size)
        ref = ref_nt_xent(z1, z2, tau)
        torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-10)
        g = torch.autograd.grad(loss, (z1, z2))
        g_ref = torch.autograd.grad(ref, (z1, z2))
        for a, r in zip(g, g_ref):
            torch.testing.assert_close(a, r, rtol=1e-8, atol=1e-10)

    @pytest.mark.parametrize("b", [2, 5, 16])
    def test_identical_embeddings_closed_form(self, b):
        z = torch.ones(b, 7)
        assert nt_xent(z, z.clone(), temperature=0.3).item() == pytest.approx(math.log(2 * b - 1), rel=1e-6)

    def test_symmetric_in_views(self):
        z1, z2 = _pair(6, 4)
        torch.testing.assert_close(nt_xent(z1, z2), nt_xent(z2, z1))

    def test_invariant_to_batch_order(self):
        z1, z2 = _pair(7, 4)
        perm = torch.randperm(7, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(nt_xent(z1[perm], z2[perm]), nt_xent(z1, z2))

    def test_float32_matches_float64_reference(self):
        z1, z2 = _pair(8, 16, dtype=torch.float32)
        loss = nt_xent(z1, z2, temperature=0.1)
        assert loss.dtype == torch.float32
        assert loss.item() == pytest.approx(ref_nt_xent(z1, z2, 0.1).item(), rel=1e-5)

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
    def test_low_precision_stable_at_tau_005(self, dtype, lse_backward):
        z1, z2 = _pair(64, 128, dtype=torch.float32, seed=3)
        z1l = (z1.detach() * 30).to(dtype).requires_grad_()  # large norms: raw logits would overflow fp16
        z2l = (z2.detach() * 30).to(dtype).requires_grad_()
        loss = nt_xent(z1l, z2l, temperature=0.05)
        loss.backward()
        assert torch.isfinite(loss)
        assert torch.isfinite(z1l.grad).all() and torch.isfinite(z2l.grad).all()
        assert z1l.grad.dtype == dtype
        ref = nt_xent(z1.detach(), z2.detach(), temperature=0.05)
        assert loss.item() == pytest.approx(ref.item(), rel=2e-2)

    def test_module_matches_functional(self):
        z1, z2 = _pair(4, 3)
        mod = NTXentLoss(temperature=0.2)
        torch.testing.assert_close(mod(z1, z2), nt_xent(z1, z2, temperature=0.2))
        assert "temperature=0.2" in repr(mod)

    @pytest.mark.parametrize("tau", [0.0, -0.1, float("nan"), float("inf")])
    def test_bad_temperature(self, tau):
        z1, z2 = _pair(2, 3)
        with pytest.raises(ValueError, match="temperature"):
            nt_xent(z1, z2, temperature=tau)
        with pytest.raises(ValueError, match="temperature"):
            NTXentLoss(temperature=tau)

    def test_bad_inputs(self):
        with pytest.raises(TypeError, match="temperature"):
            NTXentLoss(temperature="0.1")
        with pytest.raises(ValueError, match=r"z1 and z2 must have the same shape.*\(3, 4\).*\(2, 4\)"):
            nt_xent(torch.randn(3, 4), torch.randn(2, 4))
        with pytest.raises(ValueError, match=r"z1 must have shape \(N, D\).*\(3,\)"):
            nt_xent(torch.randn(3), torch.randn(3))
        with pytest.raises(TypeError, match="z2 must be a floating-point"):
            nt_xent(torch.randn(3, 2), torch.ones(3, 2, dtype=torch.long))

    def test_gather_without_torch_distributed(self):
        with mock.patch("torch.distributed.is_available", return_value=False):
            with pytest.raises(ValueError, match="gather_distributed=True but torch.distributed is unavailable"):
                NTXentLoss(gather_distributed=True)
            with pytest.raises(ValueError, match="gather_distributed=True"):
                nt_xent(*_pair(2, 3), gather_distributed=True)

    def test_gather_flag_is_noop_in_one_process(self):
        z1, z2 = _pair(5, 3)
        torch.testing.assert_close(nt_xent(z1, z2, gather_distributed=True), nt_xent(z1, z2))


class TestMultiPositive:
    @pytest.mark.parametrize("tau", [0.05, 0.1, 0.01])
    @pytest.mark.parametrize("chunk_size", [None, 3])
    def test_value_and_grad_vs_reference(self, tau, chunk_size, lse_backward):
        g = torch.Generator().manual_seed(2)
        z = torch.randn(11, 6, generator=g, dtype=torch.float64, requires_grad=True)
        ids = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3, 3, 3, 4])  # 2 and 4 have no positive
        loss = multi_positive_nt_xent(z, ids, temperature=tau, chunk_size=chunk_size)
        ref = ref_multi_positive(z, ids, tau)
        torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(torch.autograd.grad(loss, z)[0], torch.autograd.grad(ref, z)[0],
                                   rtol=1e-8, atol=1e-10)

    def test_group_id_equals_index_is_nt_xent(self):
        z1, z2 = _pair(6, 5)
        ids = torch.arange(6).repeat(2)
        a = multi_positive_nt_xent(torch.cat([z1, z2]), ids, temperature=0.1)
        b = nt_xent(z1, z2, temperature=0.1)
        torch.testing.assert_close(a, b)
        for ga, gb in zip(torch.autograd.grad(a, (z1, z2)), torch.autograd.grad(b, (z1, z2))):
            torch.testing.assert_close(ga, gb)

    def test_arbitrary_id_values(self):
        z = torch.randn(6, 3, dtype=torch.float64)
        a = multi_positive_nt_xent(z, torch.tensor([7, -3, 7, 100, -3, 100]))
        b = multi_positive_nt_xent(z, torch.tensor([0, 1, 0, 2, 1, 2]))
        torch.testing.assert_close(a, b)

    def test_no_positive_anywhere_gives_zero_with_grad_path(self):
        z = torch.randn(5, 3, requires_grad=True)
        loss = multi_positive_nt_xent(z, torch.arange(5))
        assert loss.item() == 0.0
        loss.backward()
        assert torch.equal(z.grad, torch.zeros_like(z))

    def test_bf16_finite(self):
        z = torch.randn(32, 128, generator=torch.Generator().manual_seed(0))
        ids = torch.arange(32) // 4
        zb = z.to(torch.bfloat16).requires_grad_()
        loss = multi_positive_nt_xent(zb, ids, temperature=0.05)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(zb.grad).all()
        assert loss.item() == pytest.approx(multi_positive_nt_xent(z, ids, temperature=0.05).item(), rel=2e-2)

    def test_bad_inputs(self):
        z = torch.randn(4, 3)
        with pytest.raises(TypeError, match="group_ids must be an integer"):
            multi_positive_nt_xent(z, torch.zeros(4))
        with pytest.raises(ValueError, match=r"group_ids must have shape \(N,\).*\(3,\).*\(4, 3\)"):
            multi_positive_nt_xent(z, torch.zeros(3, dtype=torch.long))
        with pytest.raises(ValueError, match="temperature"):
            MultiPositiveNTXentLoss(temperature=-1.0)

    def test_module_matches_functional(self):
        z = torch.randn(6, 3)
        ids = torch.tensor([0, 0, 1, 1, 2, 2])
        torch.testing.assert_close(MultiPositiveNTXentLoss(0.3)(z, ids), multi_positive_nt_xent(z, ids, 0.3))
