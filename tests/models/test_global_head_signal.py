"""The U-Net's global head gets an image-level signal at init (issue 14, defect 2).

Every U-Net block ends conv -> InstanceNorm(affine) -> ReLU, so each bottleneck
channel has (nearly) the same spatial mean for every image: a global average
pool hands the projection head almost the same vector whatever the input
(mean pairwise cosine 0.996 on clearly different images), and SimCLR starts
with nothing to tell images apart. The head's input must keep what differs
between images: here, images whose bright disc sits in different places on
different smooth backgrounds.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medcl.models import UNet


def _different_images(n: int, size: int, seed: int) -> torch.Tensor:
    """``n`` clearly different images: a smooth random background plus a disc of random centre and radius."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    out = []
    for _ in range(n):
        background = 0.5 * F.interpolate(torch.rand(1, 1, 4, 4, generator=g), size=(size, size), mode="bilinear",
                                         align_corners=True)[0, 0]
        cx, cy = (torch.rand(2, generator=g) * 1.2 - 0.6).tolist()
        r = 0.15 + 0.4 * float(torch.rand(1, generator=g))
        disc = ((xx - cx) ** 2 + (yy - cy) ** 2 < r * r).float()
        out.append((background + 0.5 * disc).clamp(0, 1))
    return torch.stack(out).unsqueeze(1)


def _mean_pairwise_cosine(v: torch.Tensor) -> float:
    v = F.normalize(v.flatten(1), dim=1)
    sim = v @ v.T
    n = len(v)
    return float((sim.sum() - sim.diagonal().sum()) / (n * (n - 1)))


@pytest.mark.parametrize("seed", [0, 1])
def test_head_inputs_of_different_images_are_not_nearly_parallel_at_init(seed):
    torch.manual_seed(seed)
    net = UNet.cpu(in_channels=1, num_classes=3).eval()  # the CPU preset the stages use
    seen = {}
    net.global_head.mlp.register_forward_pre_hook(lambda module, args: seen.update(x=args[0]))
    with torch.no_grad():
        out = net.global_embedding(_different_images(24, 64, seed))
    head_input = seen["x"]
    assert head_input.shape[0] == 24
    # not nearly parallel: the globally pooled InstanceNorm bottleneck gives 0.996 here
    assert _mean_pairwise_cosine(head_input) < 0.9
    assert _mean_pairwise_cosine(out) < 0.9
