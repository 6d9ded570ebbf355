"""Tests of medcl.data.augment: per-sample randomness, seeding, views and the joint transform."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from medcl.data.augment import (
    IntensityView,
    JointTransform,
    MedicalView,
    SimCLRView,
    ViewPair,
    make_views,
)
from medcl.data import augment as aug_module

KINDS = ["simclr", "medical", "intensity"]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _smooth_images(b: int, h: int = 32, w: int = 32, seed: int = 0) -> torch.Tensor:
    """Smooth random images in [0, 1]: upsampled low-resolution noise."""
    g = _gen(seed)
    low = torch.rand(b, 1, 6, 6, generator=g)
    x = F.interpolate(low, size=(h, w), mode="bicubic", align_corners=False)
    x = x - x.amin(dim=(2, 3), keepdim=True)
    return x / x.amax(dim=(2, 3), keepdim=True)


class TestRegistry:
    @pytest.mark.parametrize("kind,cls", [("simclr", SimCLRView), ("medical", MedicalView),
                                          ("intensity", IntensityView)])
    def test_make_views_kinds(self, kind, cls):
        pair = make_views(kind)
        assert isinstance(pair, ViewPair) and isinstance(pair.view, cls)

    def test_unknown_kind(self):
        with pytest.raises(ValueError, match=r"unknown view kind 'simclrr'.*intensity"):
            make_views("simclrr")

    def test_kwargs_forwarded_and_validated(self):
        with pytest.raises(ValueError, match=r"degrees must be in \[0, 180\], got 270"):
            make_views("medical", degrees=270)
        with pytest.raises(ValueError, match=r"scale=\(0.5, 2.0\)"):
            make_views("simclr", scale=(0.5, 2.0))
        with pytest.raises(ValueError, match=r"jitter_p must be a probability"):
            MedicalView(jitter_p=1.5)

    def test_bad_inputs(self):
        with pytest.raises(TypeError, match="floating tensor"):
            MedicalView()(torch.zeros(2, 1, 8, 8, dtype=torch.int64))
        with pytest.raises(ValueError, match=r"\(B, C, H, W\) or \(C, H, W\), got \(8, 8\)"):
            MedicalView()(torch.zeros(8, 8))
        with pytest.raises(TypeError, match="view must be callable"):
            ViewPair(3)


class TestViewsCommon:
    @pytest.mark.parametrize("kind", KINDS)
    @pytest.mark.parametrize("channels", [1, 3])
    def test_shape_range_and_per_sample_randomness(self, kind, channels):
        x = _smooth_images(1).expand(6, channels, 32, 32).contiguous()  # 6 copies of one image
        a, b = make_views(kind)(x, _gen(1))
        assert a.shape == b.shape == x.shape and a.dtype == torch.float32
        assert a.min() >= 0 and a.max() <= 1
        # Every sample got its own random draw: no two views of identical inputs coincide.
        flat = a.reshape(6, -1)
        assert torch.cdist(flat, flat)[~torch.eye(6, dtype=torch.bool)].min() > 1e-3
        assert not torch.allclose(a, b)

    @pytest.mark.parametrize("kind", KINDS)
    def test_seeded_reproducible(self, kind):
        x = _smooth_images(4)
        pair = make_views(kind)
        a1, b1 = pair(x, _gen(7))
        a2, b2 = pair(x, _gen(7))
        a3, _ = pair(x, _gen(8))
        assert torch.equal(a1, a2) and torch.equal(b1, b2)
        assert not torch.allclose(a1, a3)
        torch.manual_seed(3)
        c1 = pair.view(x)
        torch.manual_seed(3)
        assert torch.equal(c1, pair.view(x))

    @pytest.mark.parametrize("kind", KINDS)
    def test_unbatched(self, kind):
        x = _smooth_images(1)[0]
        a, b = make_views(kind)(x, _gen(0))
        assert a.shape == b.shape == (1, 32, 32)

    @pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
    @pytest.mark.parametrize("kind", KINDS)
    def test_cuda_matches_cpu_with_cpu_generator(self, kind):
        x = _smooth_images(4).expand(4, 3, 32, 32).contiguous()
        view = make_views(kind).view
        cpu = view(x, _gen(5))
        gpu = view(x.cuda(), _gen(5))
        assert gpu.is_cuda
        torch.testing.assert_close(gpu.cpu(), cpu, atol=2e-4, rtol=1e-4)


class TestMedicalView:
    def test_geometry_only_identity_or_flip_no_blur(self):
        """Crop off, rotation off, jitter off: each view is exactly x or its mirror (no blur)."""
        x = torch.rand(16, 1, 24, 24, generator=_gen(0))
        view = MedicalView(scale=(1.0, 1.0), ratio=(1.0, 1.0), degrees=0.0, jitter_p=0.0)
        v = view(x, _gen(1))
        flipped = torch.flip(x, dims=[-1])
        n_flip = 0
        for i in range(16):
            if torch.allclose(v[i], x[i], atol=1e-5):
                continue
            torch.testing.assert_close(v[i], flipped[i], atol=1e-5, rtol=0)
            n_flip += 1
        assert 2 <= n_flip <= 14  # p = 0.5 per sample

    def test_rotation_bounded_by_45_degrees(self):
        """Constant image: the zero corners brought in by a rotation of |a| <= 45 deg cover
        at most 1 - 2(sqrt 2 - 1) = 17.2% of the image."""
        x = torch.ones(32, 1, 64, 64)
        v = MedicalView(scale=(1.0, 1.0), ratio=(1.0, 1.0), degrees=45.0, jitter_p=0.0)(x, _gen(2))
        outside = (v[:, 0] < 0.5).float().mean(dim=(1, 2))
        assert outside.max() <= 1 - 2 * (math.sqrt(2) - 1) + 0.01
        assert (outside > 0.03).sum() >= 16  # most samples are visibly rotated

    def test_intensity_jitter_strength_half(self):
        """Strength 0.5: brightness factor f in [0.6, 1.4] times a field within [1/1.4, 1.4], then contrast.

        A constant 0.5 image: contrast keeps each sample's mean, so every pixel stays within
        0.5 * [0.6/1.4, 1.4*1.4]; the means spread like f; the field is visible (samples are no
        longer constant) and smooth.
        """
        x = torch.full((200, 1, 32, 32), 0.5)
        v = MedicalView(scale=(1.0, 1.0), ratio=(1.0, 1.0), degrees=0.0, jitter_p=1.0)(x, _gen(3))
        assert v.min() >= 0.5 * 0.6 / 1.4 - 1e-6 and v.max() <= 0.5 * 1.4 * 1.4 + 1e-6
        means = v.mean(dim=(1, 2, 3))
        assert means.min() < 0.35 and means.max() > 0.65
        spread = v.amax(dim=(1, 2, 3)) - v.amin(dim=(1, 2, 3))
        assert (spread > 0.02).float().mean() > 0.8  # not one factor per image
        assert v.diff(dim=-1).abs().max() < 0.05  # smooth: no noise, no texture


class TestSimCLRView:
    def test_grey(self):
        x = torch.rand(4, 3, 16, 16, generator=_gen(0))
        v = SimCLRView(scale=(1.0, 1.0), ratio=(1.0, 1.0), jitter_p=0.0, grey_p=1.0, blur_p=0.0)(x, _gen(1))
        luma = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
        for i in range(4):
            assert torch.allclose(v[i, 0], v[i, 1]) and torch.allclose(v[i, 1], v[i, 2])
            ok = torch.allclose(v[i, 0], luma[i], atol=1e-5) or torch.allclose(v[i, 0], luma[i].flip(-1), atol=1e-5)
            assert ok

    def test_blur_spreads_a_delta_and_keeps_constants(self):
        view = SimCLRView(scale=(1.0, 1.0), ratio=(1.0, 1.0), jitter_p=0.0, grey_p=0.0, blur_p=1.0)
        delta = torch.zeros(8, 1, 40, 40)
        delta[:, :, 20, 20] = 1.0
        v = view(delta, _gen(0))
        assert torch.allclose(v.sum(dim=(1, 2, 3)), torch.ones(8), atol=1e-4)  # mass kept (interior)
        # Each output is a separable Gaussian: recover sigma from a neighbour ratio, rebuild it by hand.
        k = 5  # odd kernel ~10% of 40 pixels
        t = torch.arange(k, dtype=torch.float64) - 2
        blurred = 0
        for i in range(8):
            col = int(v[i, 0, 20].argmax())  # 20, or 19 after a horizontal flip
            assert col in (19, 20)
            ratio = (v[i, 0, 20, col + 1] / v[i, 0, 20, col]).double()
            if ratio < 1e-6:  # sigma ~0.1-0.25: numerically a delta
                assert v[i, 0, 20, col] > 0.999
                continue
            sigma = torch.sqrt(-1 / (2 * torch.log(ratio)))
            assert 0.1 <= sigma <= 2.0 + 1e-3
            g = torch.exp(-t**2 / (2 * sigma**2))
            g = g / g.sum()
            ref = torch.zeros(40, 40, dtype=torch.float64)
            ref[18:23, col - 2:col + 3] = torch.outer(g, g)
            torch.testing.assert_close(v[i, 0].double(), ref, atol=1e-5, rtol=0)
            blurred += 1
        assert blurred >= 4
        const = view(torch.full((4, 1, 40, 40), 0.3), _gen(0))
        assert torch.allclose(const, torch.full_like(const, 0.3), atol=1e-6)

    @pytest.mark.parametrize("shift", [0.0, 0.1, -0.25, 0.5])
    def test_hue_matches_torchvision(self, shift):
        x = torch.rand(3, 3, 8, 8, generator=_gen(0))
        ref = torch.stack([TF.adjust_hue(img, shift) for img in x])
        out = aug_module._hue(x, torch.full((3,), shift))
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


class TestIntensityView:
    def test_single_bright_pixel_keeps_its_location(self):
        x = torch.zeros(64, 1, 16, 16)
        rows = torch.randint(0, 16, (64,), generator=_gen(0))
        cols = torch.randint(0, 16, (64,), generator=_gen(1))
        x[torch.arange(64), 0, rows, cols] = 1.0
        a, b = make_views("intensity")(x, _gen(2))
        for v in (a, b):
            idx = v.view(64, -1).argmax(dim=1)
            assert torch.equal(idx, rows * 16 + cols)

    def test_noise_free_view_is_monotone_in_the_input(self):
        """Without noise and bias field each view is an increasing function of the input (pixel order kept)."""
        x = torch.rand(8, 1, 12, 12, generator=_gen(0)) * 0.6 + 0.2
        v = IntensityView(noise_std=(0.0, 0.0), bias_field=0.0)(x, _gen(1))
        for i in range(8):
            order = x[i].flatten().argsort()
            assert (v[i].flatten()[order].diff() >= -1e-7).all()
        assert not torch.allclose(v, x)

    def test_gamma_only_matches_power(self):
        x = torch.rand(4, 1, 6, 6, generator=_gen(0))
        v = IntensityView(contrast=0.0, gamma=(0.5, 2.0), bias_field=0.0, noise_std=(0.0, 0.0))(x, _gen(1))
        # Recover each sample's exponent from one pixel and check it explains all pixels.
        for i in range(4):
            p = x[i].flatten()
            q = v[i].flatten()
            g = torch.log(q[0]) / torch.log(p[0])
            assert 0.5 - 1e-4 <= g <= 2.0 + 1e-4
            torch.testing.assert_close(q, p ** g, atol=1e-5, rtol=1e-4)


def test_bias_field_is_smooth_and_bounded_by_its_strength():
    """x * exp(a u) with max |u| = 1: the log-ratio to the input peaks at exactly a, and varies smoothly."""
    x = torch.full((6, 1, 40, 40), 0.5)
    a = torch.tensor([0.0, 0.05, 0.1, 0.2, 0.3, 0.5])
    y = aug_module._bias_field(x, a, _gen(0))
    log_ratio = torch.log(y / x)
    torch.testing.assert_close(log_ratio.abs().amax(dim=(1, 2, 3)), a, atol=1e-5, rtol=1e-5)
    # smooth: neighbouring pixels differ by a small fraction of the range (a 3x3 control grid over 40 px)
    assert (log_ratio.diff(dim=-1).abs().amax(dim=(1, 2, 3)) <= 0.2 * a + 1e-7).all()


class TestJointTransform:
    def test_flip_only_is_exact(self):
        x = torch.rand(3, 2, 10, 12, generator=_gen(0))
        m = torch.randint(-1, 3, (3, 10, 12), generator=_gen(1))
        xi, mi = JointTransform(scale=(1.0, 1.0), ratio=(1.0, 1.0), degrees=0.0, hflip_p=1.0)(x, m, _gen(2))
        torch.testing.assert_close(xi, x.flip(-1), atol=1e-5, rtol=0)
        assert torch.equal(mi, m.flip(-1)) and mi.dtype == torch.int64

    def test_mask_follows_thresholded_image(self):
        """mask = (image > 0.5) before; after the joint warp the mask still matches the warped image."""
        x = _smooth_images(16, 48, 48, seed=3)
        m = (x[:, 0] > 0.5).long()
        xi, mi = JointTransform(scale=(0.5, 1.0), degrees=40.0, hflip_p=0.5, vflip_p=0.5)(x, m, _gen(4))
        valid = mi != -1
        agree = ((xi[:, 0] > 0.5).long() == mi)[valid].float().mean()
        assert agree > 0.97
        assert set(mi.unique().tolist()) <= {-1, 0, 1}
        # Per-sample: the same transform hit image and mask, different transforms across samples.
        assert not torch.equal(mi[0], mi[1])

    def test_ignore_fills_only_pixels_from_outside(self):
        """Constant image 1 with a full mask: -1 exactly where the (bilinear) image fell below 1/2
        in x or y; nearest/bilinear consistency gives: mask -1 => image < 0.5, mask valid => image >= 0.25."""
        x = torch.ones(16, 1, 32, 32)
        m = torch.full((16, 32, 32), 2)
        xi, mi = JointTransform(scale=(0.6, 1.0), degrees=45.0)(x, m, _gen(5))
        ign = mi == -1
        assert ign.any()
        assert (xi[:, 0][ign] < 0.5 + 1e-5).all()
        assert (xi[:, 0][~ign] >= 0.25 - 1e-5).all()
        assert set(mi.unique().tolist()) == {-1, 2}

    def test_existing_ignore_kept_and_unbatched(self):
        x = torch.rand(1, 8, 8, generator=_gen(0))
        m = torch.zeros(8, 8, dtype=torch.int64)
        m[2:4, 2:4] = -1
        xi, mi = JointTransform(scale=(1.0, 1.0), ratio=(1.0, 1.0), degrees=0.0, hflip_p=0.0)(x, m, _gen(1))
        assert xi.shape == (1, 8, 8) and torch.equal(mi, m)

    def test_validation(self):
        jt = JointTransform()
        with pytest.raises(ValueError, match=r"mask shape \(2, 8, 9\) does not match image shape \(2, 1, 8, 8\)"):
            jt(torch.zeros(2, 1, 8, 8), torch.zeros(2, 8, 9, dtype=torch.int64))
        with pytest.raises(TypeError, match="mask must be a torch.Tensor"):
            jt(torch.zeros(2, 1, 8, 8), [[0]])
        with pytest.raises(ValueError, match="hflip_p must be a probability"):
            JointTransform(hflip_p=-0.1)
