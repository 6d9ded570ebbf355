"""Local (pixel) contrastive losses vs. naive O(N^2) float64 references written from methods 2a/2b."""
from __future__ import annotations

import pytest
import torch

from medcl.losses import (
    DenseLocalContrastiveLoss,
    SupervisedLocalContrastiveLoss,
    dense_local_contrastive,
    supervised_local_contrastive,
)


def _flatten(features: torch.Tensor, labels: torch.Tensor):
    """(B, 2, C, H, W), labels (B[, 2], H, W) -> normalised (N, C) float64 and (N,) labels."""
    b, v, c, h, w = features.shape
    if labels.dim() == 3:
        labels = labels.unsqueeze(1).expand(b, v, h, w)
    f = features.double().permute(0, 1, 3, 4, 2).reshape(-1, c)
    f = f / f.norm(dim=1, keepdim=True)
    return f, labels.reshape(-1)


def ref_supervised(features, labels, tau, ignore_index=-1):
    """Methods 2b on the full similarity matrix, one anchor at a time. None if no anchor."""
    f, y = _flatten(features, labels)
    n = y.shape[0]
    sim = f @ f.T / tau
    idx = torch.arange(n)
    losses = []
    for i in range(n):
        if y[i] == 0 or y[i] == ignore_index:
            continue
        denom = (idx != i) & (y != ignore_index)
        pos = (idx != i) & (y == y[i])
        if not pos.any():
            continue
        log_den = torch.logsumexp(sim[i][denom], 0)
        losses.append(-(sim[i][pos] - log_den).mean())
    return torch.stack(losses).mean() if losses else None


def ref_block(features, labels, tau, b, ignore_index=-1):
    h, w = features.shape[-2:]
    if labels.dim() == 3:
        labels = labels.unsqueeze(1).expand(-1, 2, -1, -1)
    losses = []
    for i in range(0, h - b + 1, b):
        for j in range(0, w - b + 1, b):
            sub = ref_supervised(features[..., i:i + b, j:j + b], labels[..., i:i + b, j:j + b], tau, ignore_index)
            if sub is not None:
                losses.append(sub)
    return torch.stack(losses).mean()


def ref_dense(features, tau):
    """Methods 2a: positive of (b, v, i, j) is (b, 1-v, i, j)."""
    bsz, _, c, h, w = features.shape
    f = features.double() / features.double().norm(dim=2, keepdim=True)
    cells = [(bb, v, i, j) for bb in range(bsz) for v in range(2) for i in range(h) for j in range(w)]
    allf = torch.stack([f[bb, v, :, i, j] for bb, v, i, j in cells])
    losses = []
    for n, (bb, v, i, j) in enumerate(cells):
        s = allf @ allf[n] / tau
        others = torch.cat([s[:n], s[n + 1:]])
        losses.append(torch.logsumexp(others, 0) - f[bb, v][:, i, j] @ f[bb, 1 - v][:, i, j] / tau)
    return torch.stack(losses).mean()


def _inputs(b=2, c=4, h=4, w=4, classes=3, ignore_frac=0.15, per_view=False, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(b, 2, c, h, w, generator=g, dtype=dtype).requires_grad_()
    shape = (b, 2, h, w) if per_view else (b, h, w)
    y = torch.randint(0, classes, shape, generator=g)
    y[torch.rand(shape, generator=g) < ignore_frac] = -1
    return f, y


def _check(loss, ref, f, rtol=1e-9, atol=1e-10, grad_rtol=1e-7, grad_atol=1e-10):
    torch.testing.assert_close(loss, ref, rtol=rtol, atol=atol)
    torch.testing.assert_close(torch.autograd.grad(loss, f, retain_graph=True)[0],
                               torch.autograd.grad(ref, f)[0], rtol=grad_rtol, atol=grad_atol)


class TestSupervisedExact:
    @pytest.mark.parametrize("tau", [0.05, 0.1, 0.01])
    @pytest.mark.parametrize("chunk_size", [None, 1, 7])
    @pytest.mark.parametrize("per_view", [False, True])
    def test_value_and_grad_vs_reference(self, tau, chunk_size, per_view):
        f, y = _inputs(per_view=per_view, seed=int(tau * 100))
        loss = supervised_local_contrastive(f, y, temperature=tau, mode="exact", chunk_size=chunk_size)
        _check(loss, ref_supervised(f, y, tau), f)

    def test_one_class_everywhere(self):
        f, _ = _inputs()
        y = torch.ones(2, 4, 4, dtype=torch.long)
        _check(supervised_local_contrastive(f, y, 0.1), ref_supervised(f, y, 0.1), f)

    def test_labels_differ_between_views(self):
        f, y = _inputs(per_view=True, classes=4, ignore_frac=0.0, seed=5)
        assert not torch.equal(y[:, 0], y[:, 1])
        _check(supervised_local_contrastive(f, y, 0.1), ref_supervised(f, y, 0.1), f)

    def test_ignored_pixels_take_part_in_nothing(self):
        f, y = _inputs(ignore_frac=0.3, seed=4)
        loss = supervised_local_contrastive(f, y, 0.1)
        grad = torch.autograd.grad(loss, f)[0]
        ign = (y == -1).unsqueeze(1).unsqueeze(2).expand_as(f)
        assert ign.any()
        assert torch.all(grad[ign] == 0)
        f2 = f.detach().clone()
        f2[ign] = torch.randn(int(ign.sum()), dtype=f2.dtype)  # changing ignored pixels changes nothing
        torch.testing.assert_close(supervised_local_contrastive(f2, y, 0.1), loss.detach())

    @pytest.mark.parametrize("fill", [0, -1])
    def test_no_anchor_gives_zero_with_grad_path(self, fill):
        f, _ = _inputs()
        y = torch.full((2, 2, 4, 4), fill)
        y[0, 0, 0, 0] = 2  # a single foreground pixel (one view only): no positive, not an anchor
        y[1, 1, 1, 1] = 0
        for mode in ("exact", "stride", "block"):
            loss = supervised_local_contrastive(f, y, 0.1, mode=mode, stride=2, block_size=2)
            assert loss.item() == 0.0
            (grad,) = torch.autograd.grad(loss, f)
            assert torch.equal(grad, torch.zeros_like(f))

    def test_single_pixel_has_positive_in_other_view(self):
        f, _ = _inputs()
        y = torch.zeros(2, 4, 4, dtype=torch.long)
        y[1, 2, 3] = 1  # shared labels: the pixel's positive is itself in the other view
        _check(supervised_local_contrastive(f, y, 0.1), ref_supervised(f, y, 0.1), f)

    def test_invariant_to_batch_order(self):
        f, y = _inputs(b=3, seed=7)
        perm = torch.tensor([2, 0, 1])
        torch.testing.assert_close(supervised_local_contrastive(f[perm], y[perm], 0.1),
                                   supervised_local_contrastive(f, y, 0.1))

    def test_label_values_are_arbitrary_ids(self):
        f, y = _inputs(ignore_frac=0.0, seed=8)
        y2 = y.clone()
        y2[y == 2] = 57  # renaming a foreground class changes nothing
        torch.testing.assert_close(supervised_local_contrastive(f, y2, 0.1), supervised_local_contrastive(f, y, 0.1))

    def test_many_chunks_float32(self):
        f, y = _inputs(b=2, c=8, h=6, w=6, classes=3, seed=9, dtype=torch.float32)
        loss = supervised_local_contrastive(f, y, 0.1, chunk_size=40)
        _check(loss, ref_supervised(f, y, 0.1).float(), f, rtol=1e-5, atol=1e-6, grad_rtol=1e-4, grad_atol=1e-7)

    def test_custom_ignore_index(self):
        f, y = _inputs(seed=10)
        y[y == -1] = -100
        _check(supervised_local_contrastive(f, y, 0.1, ignore_index=-100), ref_supervised(f, y, 0.1, -100), f)

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
    @pytest.mark.parametrize("mode", ["exact", "block"])
    def test_low_precision_stable_at_tau_005(self, dtype, mode):
        f, y = _inputs(b=2, c=128, h=8, w=8, seed=11, dtype=torch.float32)
        fl = (f.detach() * 20).to(dtype).requires_grad_()
        loss = supervised_local_contrastive(fl, y, 0.05, mode=mode, block_size=4)
        loss.backward()
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        assert torch.isfinite(fl.grad).all()
        ref = supervised_local_contrastive(f.detach(), y, 0.05, mode=mode, block_size=4)
        assert loss.item() == pytest.approx(ref.item(), rel=2e-2)


class TestStrideAndBlock:
    def test_stride_one_equals_exact(self):
        f, y = _inputs(seed=12)
        torch.testing.assert_close(supervised_local_contrastive(f, y, 0.1, mode="stride", stride=1),
                                   supervised_local_contrastive(f, y, 0.1, mode="exact"))

    @pytest.mark.parametrize("stride", [2, 3])
    def test_stride_vs_reference(self, stride):
        f, y = _inputs(h=6, w=5, seed=13, per_view=True, ignore_frac=0.1)
        loss = supervised_local_contrastive(f, y, 0.1, mode="stride", stride=stride)
        ref = ref_supervised(f[..., ::stride, ::stride], y[..., ::stride, ::stride], 0.1)
        _check(loss, ref, f)

    def test_block_size_h_equals_exact(self):
        f, y = _inputs(h=4, w=4, seed=14)
        torch.testing.assert_close(supervised_local_contrastive(f, y, 0.1, mode="block", block_size=4),
                                   supervised_local_contrastive(f, y, 0.1, mode="exact"))

    @pytest.mark.parametrize("chunk_size", [None, 3])
    def test_block_vs_reference_with_border_and_empty_block(self, chunk_size):
        f, y = _inputs(h=5, w=7, seed=15, per_view=True)
        y[:, :, :2, :2] = 0  # block (0, 0): background only -> skipped
        loss = supervised_local_contrastive(f, y, 0.1, mode="block", block_size=2, chunk_size=chunk_size)
        _check(loss, ref_block(f, y, 0.1, 2), f)
        (grad,) = torch.autograd.grad(supervised_local_contrastive(f, y, 0.1, mode="block", block_size=2), f)
        assert torch.all(grad[..., 4, :] == 0) and torch.all(grad[..., :, 6] == 0)  # dropped borders

    def test_block_is_unweighted_mean_of_blocks(self):
        f, _ = _inputs(h=4, w=4, seed=16)
        y = torch.zeros(2, 4, 4, dtype=torch.long)
        y[:, :2, :2] = 1  # block (0,0): 8 anchors per view
        y[0, 2, 2] = 2  # block (1,1): 1 pixel -> 2 anchors (both views)
        first = ref_supervised(f[..., :2, :2], y[..., :2, :2], 0.1)
        last = ref_supervised(f[..., 2:, 2:], y[..., 2:, 2:], 0.1)
        loss = supervised_local_contrastive(f, y, 0.1, mode="block", block_size=2)
        torch.testing.assert_close(loss, (first + last) / 2)  # not weighted by the 16 vs 2 anchors

    def test_block_larger_than_image(self):
        f, y = _inputs(h=4, w=6)
        with pytest.raises(ValueError, match=r"block_size=5 exceeds the feature map H x W = 4 x 6"):
            supervised_local_contrastive(f, y, mode="block", block_size=5)


class TestDense:
    @pytest.mark.parametrize("tau", [0.1, 0.05, 0.01])
    @pytest.mark.parametrize("chunk_size", [None, 5])
    def test_value_and_grad_vs_reference(self, tau, chunk_size):
        f, _ = _inputs(b=2, c=3, h=3, w=2, seed=20)
        _check(dense_local_contrastive(f, tau, chunk_size=chunk_size), ref_dense(f, tau), f)

    def test_bf16(self):
        f, _ = _inputs(b=2, c=64, h=6, w=6, seed=21, dtype=torch.float32)
        fb = f.detach().to(torch.bfloat16).requires_grad_()
        loss = dense_local_contrastive(fb, 0.05)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(fb.grad).all()
        assert loss.item() == pytest.approx(dense_local_contrastive(f.detach(), 0.05).item(), rel=2e-2)

    def test_module(self):
        f, _ = _inputs(seed=22)
        torch.testing.assert_close(DenseLocalContrastiveLoss(0.2)(f), dense_local_contrastive(f, 0.2))
        with pytest.raises(ValueError, match="temperature"):
            DenseLocalContrastiveLoss(temperature=0)
        f, _ = _inputs(h=4, w=6, seed=23)
        mod = DenseLocalContrastiveLoss(0.2, mode="block", block_size=2)
        torch.testing.assert_close(mod(f), dense_local_contrastive(f, 0.2, mode="block", block_size=2))
        assert "mode='block'" in repr(mod) and "block_size=2" in repr(mod)

    @pytest.mark.parametrize("stride", [2, 3])
    def test_stride_vs_hand_written_reference(self, stride):
        f, _ = _inputs(b=2, c=3, h=5, w=7, seed=24)
        rows, cols = list(range(0, 5, stride)), list(range(0, 7, stride))
        kept = f[:, :, :, rows][..., cols]  # every stride-th pixel, picked by index
        assert kept.shape[-2:] == (len(rows), len(cols))
        _check(dense_local_contrastive(f, 0.1, mode="stride", stride=stride), ref_dense(kept, 0.1), f)

    def test_stride_one_and_whole_map_block_equal_exact(self):
        f, _ = _inputs(b=2, c=3, h=4, w=4, seed=25)
        exact = dense_local_contrastive(f, 0.1)
        assert torch.equal(dense_local_contrastive(f, 0.1, mode="stride", stride=1), exact)
        assert torch.equal(dense_local_contrastive(f, 0.1, mode="block", block_size=4), exact)
        _check(exact, ref_dense(f, 0.1), f)

    def test_block_is_mean_of_block_losses_and_drops_the_border(self):
        f, _ = _inputs(b=2, c=3, h=5, w=6, seed=26)  # 2 x 3 blocks of 2 x 2; row 4 dropped
        blocks = [f[..., i:i + 2, j:j + 2] for i in (0, 2) for j in (0, 2, 4)]
        ref = torch.stack([ref_dense(blk, 0.1) for blk in blocks]).mean()
        loss = dense_local_contrastive(f, 0.1, mode="block", block_size=2, chunk_size=3)
        _check(loss, ref, f)
        grad = torch.autograd.grad(loss, f)[0]
        assert torch.count_nonzero(grad[..., 4, :]) == 0 and torch.count_nonzero(grad[..., :4, :]) > 0  # border unused

    @pytest.mark.parametrize(
        "kwargs, match",
        [
            ({"mode": "fast"}, r"mode must be one of \('exact', 'stride', 'block'\), got 'fast'"),
            ({"stride": 0}, "stride must be an int >= 1, got 0"),
            ({"block_size": 0}, "block_size must be an int >= 1, got 0"),
            ({"chunk_size": 0}, "chunk_size must be None or an int >= 1, got 0"),
        ],
    )
    def test_settings(self, kwargs, match):
        with pytest.raises(ValueError, match=match):
            DenseLocalContrastiveLoss(**kwargs)
        with pytest.raises(ValueError, match=match):
            dense_local_contrastive(_inputs()[0], **kwargs)

    def test_block_larger_than_image(self):
        f, _ = _inputs(h=4, w=6)
        with pytest.raises(ValueError, match=r"block_size=5 exceeds the feature map H x W = 4 x 6"):
            dense_local_contrastive(f, mode="block", block_size=5)


class TestValidation:
    @pytest.mark.parametrize(
        "kwargs, exc, match",
        [
            ({"temperature": 0.0}, ValueError, "temperature must be a finite float > 0, got 0.0"),
            ({"temperature": "hot"}, TypeError, "temperature"),
            ({"mode": "fast"}, ValueError, r"mode must be one of \('exact', 'stride', 'block'\), got 'fast'"),
            ({"stride": 0}, ValueError, "stride must be an int >= 1, got 0"),
            ({"block_size": 0}, ValueError, "block_size must be an int >= 1, got 0"),
            ({"block_size": 2.5}, ValueError, "block_size must be an int >= 1, got 2.5"),
            ({"ignore_index": 0}, ValueError, "ignore_index=0 collides with the background"),
            ({"chunk_size": 0}, ValueError, "chunk_size must be None or an int >= 1, got 0"),
        ],
    )
    def test_settings(self, kwargs, exc, match):
        with pytest.raises(exc, match=match):
            SupervisedLocalContrastiveLoss(**kwargs)
        f, y = _inputs()
        with pytest.raises(exc, match=match):
            supervised_local_contrastive(f, y, **kwargs)

    def test_shapes_and_dtypes(self):
        f, y = _inputs()
        with pytest.raises(ValueError, match=r"features must have shape \(B, 2, C, H, W\), got \(2, 3, 4, 4, 4\)"):
            supervised_local_contrastive(torch.randn(2, 3, 4, 4, 4), y)
        with pytest.raises(ValueError, match=r"got labels \(2, 4, 5\) and features \(2, 2, 4, 4, 4\)"):
            supervised_local_contrastive(f, torch.zeros(2, 4, 5, dtype=torch.long))
        with pytest.raises(TypeError, match="labels must be an integer tensor, got dtype torch.float32"):
            supervised_local_contrastive(f, y.float())
        with pytest.raises(TypeError, match="features must be a floating-point tensor"):
            supervised_local_contrastive(f.long(), y)
        with pytest.raises(ValueError, match=r"features must have shape \(B, 2, C, H, W\)"):
            dense_local_contrastive(torch.randn(2, 2, 4, 4))

    def test_module_matches_functional(self):
        f, y = _inputs(seed=30, h=4, w=4)
        mod = SupervisedLocalContrastiveLoss(temperature=0.2, mode="block", block_size=2)
        torch.testing.assert_close(mod(f, y), supervised_local_contrastive(f, y, 0.2, mode="block", block_size=2))
        assert "mode='block'" in repr(mod)
