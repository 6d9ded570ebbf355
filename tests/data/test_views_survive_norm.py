"""Every intensity change the contrastive views make reaches the U-Net's features (issue 14, defect 6).

The U-Net's convolutions have no bias and each is followed by InstanceNorm, so a
global brightness factor ``x -> f*x`` is cancelled exactly by the first
normalisation (up to its ``eps``): a view pair that differs only by brightness
differs in nothing the network sees. The check: the last decoder map of a
random-init U-Net barely moves under ``x0.7``; each view the stages use, and
the local view's non-linear or spatially varying ops on their own (brightness
field, gamma, noise), move it at least ten times more (median over samples).
Contrast is affine: InstanceNorm cancels its scale, and its offset reaches the
features only through the zero padding at the borders, so it is not counted on.
Images stay below ``1/1.4`` so that no factor clips: clipping at 1 is an
accident that would make even brightness visible. The images are left-right
symmetric, so the medical view's random flip leaves them as they are and only
its intensity part acts.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medcl.data.augment import IntensityView, MedicalView, make_views
from medcl.models import UNet


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    size = 32
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    out = []
    for _ in range(16):
        background = 0.3 * F.interpolate(torch.rand(1, 1, 4, 4, generator=g), size=(size, size), mode="bilinear",
                                         align_corners=True)[0, 0]
        cy, r = float(torch.rand(1, generator=g)) - 0.5, 0.2 + 0.3 * float(torch.rand(1, generator=g))
        disc = (xx**2 + (yy - cy) ** 2 < r * r).float()
        out.append(background + 0.35 * disc)
    x = torch.stack(out).unsqueeze(1)
    return (x + x.flip(-1)) / 2  # symmetric, max 0.65 < 1/1.4


@pytest.fixture(scope="module")
def change(images):
    """``change(view_images)``: per-sample relative change of the last decoder map against ``images``."""
    torch.manual_seed(0)
    net = UNet.cpu(in_channels=1, num_classes=3).eval()  # the CPU preset the stages use

    @torch.no_grad()
    def decoder_map(x: torch.Tensor) -> torch.Tensor:
        return net.decode(*net.encode(x))

    reference = decoder_map(images)

    def run(after: torch.Tensor) -> torch.Tensor:
        return (decoder_map(after) - reference).flatten(1).norm(dim=1) / reference.flatten(1).norm(dim=1)

    return run


@pytest.fixture(scope="module")
def invisible(images, change) -> float:
    """Median change under a brightness factor 0.7: what the network cannot see."""
    return float(change(0.7 * images).median())


def test_brightness_alone_is_invisible(images, change, invisible):
    assert invisible < 0.02 and float(change(0.7 * images).max()) < 0.05


VIEWS = {
    "local stage (intensity)": lambda: make_views("intensity").view,
    "global stage (medical), intensity part": lambda: make_views("medical", scale=(1.0, 1.0), ratio=(1.0, 1.0),
                                                                 degrees=0.0, jitter_p=1.0).view,
    # each op of the local view on its own; the first is all that is left of the old view's brightness
    "intensity, contrast/gamma/noise off": lambda: IntensityView(contrast=0.0, gamma=(1.0, 1.0),
                                                                 noise_std=(0.0, 0.0)),
    "intensity, gamma only": lambda: IntensityView(contrast=0.0, bias_field=0.0, noise_std=(0.0, 0.0)),
    "intensity, noise only": lambda: IntensityView(contrast=0.0, gamma=(1.0, 1.0), bias_field=0.0),
}


@pytest.mark.parametrize("name", list(VIEWS))
def test_each_view_changes_what_the_network_sees(name, images, change, invisible):
    seen = float(change(VIEWS[name]()(images, torch.Generator().manual_seed(2))).median())
    assert seen > 10 * max(invisible, 1e-3), (name, seen, invisible)


def test_medical_view_of_symmetric_images_is_intensity_only(images):
    """The premise of the medical-view case: geometry off, a flip leaves these images unchanged."""
    view = MedicalView(scale=(1.0, 1.0), ratio=(1.0, 1.0), degrees=0.0, jitter_p=0.0)
    torch.testing.assert_close(view(images, torch.Generator().manual_seed(2)), images, atol=1e-5, rtol=0)
