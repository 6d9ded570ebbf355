"""The chunked segment log-sum-exp core vs. a per-anchor float64 loop."""
from __future__ import annotations

import pytest
import torch

from medcl.losses import _lse

# keys 0:6 | 6:6 (empty) | 6:12 | 12:17 ; anchors grouped by segment
KEY_PTR = [0, 6, 6, 12, 17]
ANCHORS = torch.tensor([0, 2, 3, 7, 8, 9, 15, 16])
ANCHOR_PTR = [0, 3, 3, 6, 8]


def ref_lse(k, anchors, scale):
    out = []
    for a in anchors.tolist():
        s = next(i for i in range(len(KEY_PTR) - 1) if KEY_PTR[i] <= a < KEY_PTR[i + 1])
        others = [k[a] @ k[j] * scale for j in range(KEY_PTR[s], KEY_PTR[s + 1]) if j != a]
        out.append(torch.logsumexp(torch.stack(others), 0))
    return torch.stack(out)


@pytest.mark.parametrize("scale", [10.0, 100.0])  # fixed shift / row-max path
@pytest.mark.parametrize("chunk_size", [None, 1, 2])
@pytest.mark.parametrize("cache_bytes", [0, 2**20])
def test_segments_value_and_grad(scale, chunk_size, cache_bytes):
    g = torch.Generator().manual_seed(0)
    k = torch.nn.functional.normalize(torch.randn(17, 5, generator=g, dtype=torch.float64), dim=1)
    k.requires_grad_()
    q = k[ANCHORS]
    lse = _lse.segment_logsumexp(q, k, ANCHORS, scale, KEY_PTR, ANCHOR_PTR, chunk_size, cache_bytes)
    assert (lse.grad_fn.denom is not None) == (cache_bytes > 0)  # the chunks were kept or not
    ref = ref_lse(k, ANCHORS, scale)
    torch.testing.assert_close(lse, ref, rtol=1e-12, atol=1e-12)
    w = torch.randn(len(ANCHORS), generator=g, dtype=torch.float64)
    torch.testing.assert_close(torch.autograd.grad((lse * w).sum(), k)[0], torch.autograd.grad((ref * w).sum(), k)[0],
                               rtol=1e-9, atol=1e-12)


def test_cache_budget_is_respected():
    k = torch.randn(64, 4, requires_grad=True)
    idx = torch.arange(64)
    small = _lse.segment_logsumexp(k, k, idx, 1.0, cache_bytes=64 * 64 * 4 - 1)
    exact = _lse.segment_logsumexp(k, k, idx, 1.0, cache_bytes=64 * 64 * 4)
    assert small.grad_fn.denom is None and exact.grad_fn.denom is not None


def test_far_apart_keys_do_not_underflow():
    """Row-max path: logits all around -1/tau would underflow a fixed shift of +1/tau."""
    q = torch.tensor([[1.0, 0.0]])
    k = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [-0.999, 0.0447]])  # self, then two near-opposite keys
    lse = _lse.segment_logsumexp(q, k, torch.tensor([0]), 1 / 0.005)
    ref = torch.logsumexp((q @ k[1:].T).double() / 0.005, 1)
    torch.testing.assert_close(lse.double(), ref, rtol=1e-6, atol=1e-3)
    assert torch.isfinite(lse).all()
