"""Cross-entropy + soft Dice vs. per-pixel float64 references."""
from __future__ import annotations

import math

import pytest
import torch

from medcl.losses import SegmentationLoss, segmentation_loss, soft_dice_loss


def ref_ce(logits, target, ignore):
    terms = []
    b, k, h, w = logits.shape
    for n in range(b):
        for i in range(h):
            for j in range(w):
                t = int(target[n, i, j])
                if t == ignore:
                    continue
                x = logits[n, :, i, j].double()
                terms.append(torch.log(torch.exp(x).sum()) - x[t])
    return torch.stack(terms).mean()


def ref_dice(logits, target, ignore, classes, smooth=1e-5):
    p = torch.softmax(logits.double(), dim=1)
    valid = target != ignore
    scores = []
    for c in classes:
        pc = p[:, c][valid]
        tc = (target[valid] == c).double()
        scores.append((2 * (pc * tc).sum() + smooth) / (pc.sum() + tc.sum() + smooth))
    return 1 - torch.stack(scores).mean()


def _inputs(b=2, k=3, h=4, w=5, ignore_frac=0.2, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, k, h, w, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, k, (b, h, w), generator=g)
    target[torch.rand(b, h, w, generator=g) < ignore_frac] = -1
    return logits, target


def _close_with_grad(a, b, x):
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(a, x)[0], torch.autograd.grad(b, x)[0], rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("include_background", [False, True])
def test_soft_dice_vs_reference(include_background):
    logits, target = _inputs()
    classes = range(3) if include_background else range(1, 3)
    _close_with_grad(soft_dice_loss(logits, target, include_background=include_background),
                     ref_dice(logits, target, -1, classes), logits)


@pytest.mark.parametrize("dice_weight", [0.0, 1.0, 0.3])
def test_segmentation_loss_vs_reference(dice_weight):
    logits, target = _inputs(seed=1)
    ref = ref_ce(logits, target, -1) + dice_weight * ref_dice(logits, target, -1, range(1, 3))
    _close_with_grad(segmentation_loss(logits, target, dice_weight=dice_weight), ref, logits)


def test_ignored_pixels_are_excluded():
    logits, target = _inputs(seed=2, ignore_frac=0.4)
    loss = segmentation_loss(logits, target)
    (grad,) = torch.autograd.grad(loss, logits)
    ign = (target == -1).unsqueeze(1).expand_as(logits)
    assert ign.any() and torch.all(grad[ign] == 0)
    other = logits.detach().clone()
    other[ign] = 50.0
    torch.testing.assert_close(segmentation_loss(other, target), loss.detach())


def test_all_ignored_is_zero_with_grad_path():
    logits, _ = _inputs()
    loss = segmentation_loss(logits, torch.full((2, 4, 5), -1))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_perfect_prediction_is_near_zero():
    target = torch.randint(0, 3, (2, 6, 6), generator=torch.Generator().manual_seed(3))
    logits = 40.0 * torch.nn.functional.one_hot(target, 3).permute(0, 3, 1, 2).double()
    assert segmentation_loss(logits, target).item() == pytest.approx(0.0, abs=1e-9)
    assert soft_dice_loss(-logits, target).item() > 0.99  # all probability on wrong classes


def test_uniform_logits_closed_form():
    target = torch.tensor([[[1, 2], [0, 1]]])
    loss = segmentation_loss(torch.zeros(1, 3, 2, 2), target, dice_weight=0.0)
    assert loss.item() == pytest.approx(math.log(3))


def test_bf16_logits():
    logits, target = _inputs(b=2, k=3, h=16, w=16, seed=4)
    lb = (logits.detach() * 20).to(torch.bfloat16).requires_grad_()
    loss = segmentation_loss(lb, target)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss) and torch.isfinite(lb.grad).all()
    assert loss.item() == pytest.approx(segmentation_loss(logits.detach() * 20, target).item(), rel=2e-2)


def test_module_matches_functional():
    logits, target = _inputs(seed=5)
    mod = SegmentationLoss(dice_weight=0.5, include_background=True)
    torch.testing.assert_close(mod(logits, target),
                               segmentation_loss(logits, target, dice_weight=0.5, include_background=True))


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"dice_weight": -1.0}, ValueError, "dice_weight must be a finite float >= 0, got -1.0"),
        ({"ignore_index": 0}, ValueError, "ignore_index must be negative"),
        ({"ignore_index": 1.5}, TypeError, "ignore_index must be an int"),
        ({"smooth": 0.0}, ValueError, "smooth must be a finite float > 0"),
    ],
)
def test_bad_settings(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        SegmentationLoss(**kwargs)
    logits, target = _inputs()
    with pytest.raises(exc, match=match):
        segmentation_loss(logits, target, **kwargs)


def test_bad_inputs():
    logits, target = _inputs()
    with pytest.raises(ValueError, match=r"got logits \(2, 3, 4, 5\) and target \(2, 4, 4\)"):
        segmentation_loss(logits, target[..., :4])
    with pytest.raises(ValueError, match=r"target values must be in \[0, 3\) or ignore_index=-1; found 3"):
        segmentation_loss(logits, torch.full((2, 4, 5), 3))
    with pytest.raises(TypeError, match="target must be an integer tensor"):
        soft_dice_loss(logits, target.double())
    with pytest.raises(ValueError, match="foreground Dice needs K >= 2"):
        soft_dice_loss(torch.randn(1, 1, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))
