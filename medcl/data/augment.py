"""Batched augmentations with per-sample randomness: contrastive views and joint image+mask transforms.

torchvision's ``transforms.v2`` draws ONE set of random parameters per call, so applied to a
batch tensor every image gets the same crop/flip/jitter. Looping v2 over the samples of a
batch gives per-sample randomness but costs one Python dispatch chain per image. This module
draws the parameters of every sample at once and applies them with batched tensor ops
(``affine_grid``/``grid_sample`` for all geometry, broadcast factors for intensity, grouped
convolution for blur): the same results per sample, several times faster than the v2 loop on
64x64 batches (``benchmarks/data_stream.py --augment-only`` prints the comparison), and the
same code on CPU and CUDA.

Randomness: every transform takes an optional ``generator`` (``torch.Generator``). Parameters
are drawn on the generator's device and moved to the images' device, so a CPU generator
reproduces the same augmentation for CPU and CUDA images. Without a generator the global
torch RNG is used (``torch.manual_seed`` discipline).

Shapes: images ``(B, C, H, W)`` float (values in [0, 1], C = 1 or 3); a single image
``(C, H, W)`` is accepted and returned unbatched. Masks ``(B, H, W)`` int64 class indices with
``-1`` = ignore. For data not scaled to [0, 1] (a "zscore" ingest) pass ``clamp=None`` and,
for ``IntensityView``, ``gamma=(1, 1)`` (gamma acts on values clipped at 0).

Performance note: on a CPU shared with other processes, torch intra-op threads make each
of the many small batched ops wait for a free core; run augmentation with
``torch.set_num_threads(1)`` per process (Ray tasks already do).

Size (~510 lines, over the ~400 guideline): the batched ops are private to the three views and
:class:`JointTransform` that compose them, and splitting them out would make them a public API
with no other user.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from medcl.data.schema import IGNORE_INDEX

__all__ = [
    "SimCLRView",
    "MedicalView",
    "IntensityView",
    "ViewPair",
    "JointTransform",
    "VIEW_KINDS",
    "make_views",
]

_Range = tuple[float, float]


# --------------------------------------------------------------------------- random draws
def _draw(shape: tuple[int, ...], device: torch.device, generator: torch.Generator | None,
          normal: bool = False) -> torch.Tensor:
    """U(0,1) (or N(0,1)) numbers drawn on the generator's device, returned on ``device``."""
    gen_device = generator.device if generator is not None else device
    fn = torch.randn if normal else torch.rand
    return fn(shape, generator=generator, device=gen_device).to(device)


def _uniform(n: int, bounds: _Range, device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
    low, high = bounds
    return low + (high - low) * _draw((n,), device, generator)


def _coin(n: int, p: float, device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
    """Boolean ``(n,)``: True with probability ``p`` (always drawn so the RNG stream is stable)."""
    return _draw((n,), device, generator) < p


# --------------------------------------------------------------------------- validation
def _check_range(name: str, value: _Range, low: float = -math.inf, high: float = math.inf) -> _Range:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"{name} must be a (min, max) pair, got {value!r}")
    lo, hi = float(value[0]), float(value[1])
    if not (low <= lo <= hi <= high):
        raise ValueError(f"{name}={value!r} must satisfy {low} <= min <= max <= {high}")
    return lo, hi


def _check_prob(name: str, p: float) -> float:
    if not 0.0 <= float(p) <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {p!r}")
    return float(p)


def _jitter_range(name: str, strength: float) -> _Range:
    """ColorJitter convention: strength s -> factors in [max(0, 1-s), 1+s]."""
    if strength < 0:
        raise ValueError(f"{name} must be >= 0, got {strength!r}")
    return max(0.0, 1.0 - strength), 1.0 + strength


def _as_batch(images: torch.Tensor) -> tuple[torch.Tensor, bool]:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if not images.is_floating_point():
        raise TypeError(f"images must be a floating tensor, got dtype {images.dtype}")
    if images.ndim == 3:
        return images.unsqueeze(0), True
    if images.ndim != 4:
        raise ValueError(f"images must have shape (B, C, H, W) or (C, H, W), got {tuple(images.shape)}")
    return images, False


# --------------------------------------------------------------------------- geometry
def _affine_theta(
    n: int,
    height: int,
    width: int,
    device: torch.device,
    generator: torch.Generator | None,
    *,
    scale: _Range,
    ratio: _Range,
    degrees: float,
    hflip_p: float,
    vflip_p: float,
) -> torch.Tensor:
    """Per-sample affine matrices ``(n, 2, 3)`` for ``affine_grid`` (output -> input coordinates).

    Composition on output coordinates u (normalised to [-1, 1]): flip, then rotation about the
    centre (in pixel units, so non-square images are not sheared), then the random resized crop
    (area fraction in ``scale``, aspect ratio log-uniform in ``ratio`` relative to the image's own
    aspect, clipped to the image;
    torchvision retries out-of-image crops instead of clipping).
    """
    area = _uniform(n, scale, device, generator)
    log_r = _uniform(n, (math.log(ratio[0]), math.log(ratio[1])), device, generator)
    aspect = torch.exp(log_r)
    crop_w = torch.sqrt(area * aspect).clamp(max=1.0)  # fraction of the width
    crop_h = torch.sqrt(area / aspect).clamp(max=1.0)
    cx = (2 * _draw((n,), device, generator) - 1) * (1 - crop_w)
    cy = (2 * _draw((n,), device, generator) - 1) * (1 - crop_h)
    angle = _uniform(n, (-degrees, degrees), device, generator) * (math.pi / 180.0)
    fx = torch.where(_coin(n, hflip_p, device, generator), -1.0, 1.0)
    fy = torch.where(_coin(n, vflip_p, device, generator), -1.0, 1.0)

    cos, sin = torch.cos(angle), torch.sin(angle)
    aspect_hw = height / width  # A^-1 R A with A = diag(W, H)
    r00, r01 = cos, -sin * aspect_hw
    r10, r11 = sin / aspect_hw, cos
    theta = torch.zeros(n, 2, 3, device=device)
    theta[:, 0, 0] = crop_w * r00 * fx
    theta[:, 0, 1] = crop_w * r01 * fy
    theta[:, 1, 0] = crop_h * r10 * fx
    theta[:, 1, 1] = crop_h * r11 * fy
    theta[:, 0, 2] = cx
    theta[:, 1, 2] = cy
    return theta


def _warp(x: torch.Tensor, theta: torch.Tensor, mode: str) -> torch.Tensor:
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)


# --------------------------------------------------------------------------- intensity
def _grey(x: torch.Tensor) -> torch.Tensor:
    """Luma ``(B, 1, H, W)`` (ITU-R 601 weights for RGB, identity for 1 channel)."""
    if x.shape[1] == 3:
        w = torch.tensor([0.299, 0.587, 0.114], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return (x * w).sum(dim=1, keepdim=True)
    return x.mean(dim=1, keepdim=True)


def _brightness(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return x * f.view(-1, 1, 1, 1)


def _bias_field(x: torch.Tensor, strength: torch.Tensor, generator: torch.Generator | None,
                grid: int = 3) -> torch.Tensor:
    """Multiply each sample by a smooth random field ``exp(a * u)``, ``a = strength[i]``.

    ``u``: a bicubic upsampling of a ``grid × grid`` map of N(0, 1) draws, scaled per sample to
    ``max |u| = 1``, so local brightness varies smoothly by factors within ``[e^-a, e^a]`` (an MR
    bias field; its mean part is a brightness change). Unlike a constant factor, which a bias-free
    conv followed by InstanceNorm cancels exactly, a spatially varying factor reaches the features.
    """
    n, _, h, w = x.shape
    coarse = _draw((n, 1, grid, grid), x.device, generator, normal=True).to(torch.float32)
    u = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=True)
    u = u / u.abs().amax(dim=(2, 3), keepdim=True).clamp(min=1e-12)
    return x * torch.exp(strength.view(n, 1, 1, 1).to(u) * u).to(x.dtype)


def _contrast(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    mean = _grey(x).mean(dim=(1, 2, 3), keepdim=True)
    f = f.view(-1, 1, 1, 1)
    return f * x + (1 - f) * mean


def _saturation(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    f = f.view(-1, 1, 1, 1)
    return f * x + (1 - f) * _grey(x)


def _hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue of RGB images by ``shift`` (fraction of a turn, per sample) via HSV.

    HSV -> RGB uses the branch-free form ``c_n = v - v*s*clip(min(k, 4-k), 0, 1)`` with
    ``k = (n + 6h) mod 6`` for n = 5, 3, 1 (R, G, B).
    """
    r, g, b = x.clamp(0, 1).unbind(dim=1)
    maxc = torch.maximum(torch.maximum(r, g), b)  # elementwise: much faster than a dim=1 reduction
    minc = torch.minimum(torch.minimum(r, g), b)
    delta = maxc - minc
    s = delta / maxc.clamp(min=1e-12)
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    h = torch.where(maxc == r, (g - b) / safe, torch.where(maxc == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe))
    h6 = (h + 6.0 * shift.view(-1, 1, 1).to(x.dtype)) % 6.0  # hue in sextants, shifted
    n = torch.tensor([5.0, 3.0, 1.0], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    k = n + h6.unsqueeze(1)
    k = torch.where(k >= 6.0, k - 6.0, k)
    ramp = torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)
    v = maxc.unsqueeze(1)
    return v - v * s.unsqueeze(1) * ramp


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, apply: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with a per-sample sigma (samples with ``apply`` False unchanged)."""
    b, c, h, w = x.shape
    k = max(3, int(0.1 * min(h, w)) // 2 * 2 + 1)  # odd kernel ~10% of the side (SimCLR)
    t = torch.arange(k, device=x.device, dtype=x.dtype) - (k - 1) / 2
    kern = torch.exp(-(t.view(1, k) ** 2) / (2 * sigma.view(b, 1).to(x.dtype) ** 2))
    kern = kern / kern.sum(dim=1, keepdim=True)
    delta = torch.zeros_like(kern)
    delta[:, k // 2] = 1.0
    kern = torch.where(apply.view(b, 1), kern, delta)
    weight = kern.repeat_interleave(c, dim=0)  # (B*C, k)
    y = x.reshape(1, b * c, h, w)
    pad = k // 2
    y = F.conv2d(F.pad(y, (pad, pad, 0, 0), mode="reflect"), weight.view(b * c, 1, 1, k), groups=b * c)
    y = F.conv2d(F.pad(y, (0, 0, pad, pad), mode="reflect"), weight.view(b * c, 1, k, 1), groups=b * c)
    return y.view(b, c, h, w)


def _clamp(x: torch.Tensor, clamp: _Range | None) -> torch.Tensor:
    return x if clamp is None else x.clamp(clamp[0], clamp[1])


# --------------------------------------------------------------------------- views
class _View:
    """Base: validates the input, runs ``_apply`` on a batch, restores an unbatched input."""

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        x, single = _as_batch(images)
        out = self._apply(x, generator)
        return out[0] if single else out

    def _apply(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        raise NotImplementedError


class SimCLRView(_View):
    """SimCLR view for photographs (Chen et al. 2020, appendix A).

    Random resized crop, horizontal flip, colour jitter (p=0.8; brightness, contrast, saturation
    0.8*s, hue 0.2*s, applied in one random order per batch), random grey (p=0.2), Gaussian blur
    (p=0.5, sigma in [0.1, 2], kernel ~10% of the side). Saturation, hue and grey only act on
    3-channel images.

    Args:
        scale: crop area fraction range.
        ratio: crop aspect ratio range (log-uniform).
        strength: colour jitter strength s.
        jitter_p: probability of colour jitter per sample.
        grey_p: probability of converting to grey per sample.
        blur_p: probability of blurring per sample.
        clamp: clip values to this range after each intensity op (None: no clipping).

    Example:
        >>> v = SimCLRView()
        >>> v(torch.rand(8, 3, 64, 64), generator=torch.Generator().manual_seed(0)).shape
        torch.Size([8, 3, 64, 64])
    """

    def __init__(self, scale: _Range = (0.08, 1.0), ratio: _Range = (3 / 4, 4 / 3), strength: float = 1.0,
                 jitter_p: float = 0.8, grey_p: float = 0.2, blur_p: float = 0.5,
                 clamp: _Range | None = (0.0, 1.0)) -> None:
        self.scale = _check_range("scale", scale, 1e-6, 1.0)
        self.ratio = _check_range("ratio", ratio, 1e-6)
        if strength < 0:
            raise ValueError(f"strength must be >= 0, got {strength!r}")
        self.strength = float(strength)
        self.jitter_p, self.grey_p, self.blur_p = (_check_prob("jitter_p", jitter_p),
                                                   _check_prob("grey_p", grey_p), _check_prob("blur_p", blur_p))
        self.clamp = None if clamp is None else _check_range("clamp", clamp)

    def _apply(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        n, c, h, w = x.shape
        dev = x.device
        theta = _affine_theta(n, h, w, dev, generator, scale=self.scale, ratio=self.ratio, degrees=0.0,
                              hflip_p=0.5, vflip_p=0.0)
        x = _warp(x, theta, "bilinear")
        s = self.strength
        jit = _coin(n, self.jitter_p, dev, generator)
        one = torch.ones(n, device=dev)
        factors = {
            "brightness": torch.where(jit, _uniform(n, _jitter_range("brightness", 0.8 * s), dev, generator), one),
            "contrast": torch.where(jit, _uniform(n, _jitter_range("contrast", 0.8 * s), dev, generator), one),
            "saturation": torch.where(jit, _uniform(n, _jitter_range("saturation", 0.8 * s), dev, generator), one),
            "hue": torch.where(jit, _uniform(n, (-min(0.2 * s, 0.5), min(0.2 * s, 0.5)), dev, generator), 0 * one),
        }
        ops = {"brightness": _brightness, "contrast": _contrast, "saturation": _saturation, "hue": _hue}
        order = _draw((4,), torch.device("cpu"), generator).argsort().tolist()  # one order per batch
        names = list(ops)
        for k in order:
            name = names[k]
            if c != 3 and name in ("saturation", "hue"):
                continue
            x = _clamp(ops[name](x, factors[name]), self.clamp)
        grey = _coin(n, self.grey_p, dev, generator)
        if c == 3:
            x = torch.where(grey.view(n, 1, 1, 1), _grey(x).expand_as(x), x)
        sigma = _uniform(n, (0.1, 2.0), dev, generator)
        blur = _coin(n, self.blur_p, dev, generator)
        return _gaussian_blur(x, sigma, blur)


class MedicalView(_View):
    """Medical-image view of MICLe (Azizi et al. 2021) for X-ray/CT/MR.

    Random resized crop, rotation uniform in [-degrees, degrees], horizontal flip (p=0.5),
    intensity jitter of strength s (p=0.8; a brightness factor in [1-0.8s, 1+0.8s] times a smooth
    brightness field with local factors within ``[1/(1+0.8s), 1+0.8s]``, then a contrast factor in
    [1-0.8s, 1+0.8s]), and deliberately **no** Gaussian blur. Pixels rotated in from outside the
    image are 0.

    MICLe's brightness is one factor per image. Networks that normalise each image (the U-Net:
    a bias-free conv followed by InstanceNorm in every block) cancel such a factor exactly, so
    the field (:func:`_bias_field`, ``a ~ U(0, log(1+0.8s))``) makes the brightness jitter vary
    smoothly across the image, which survives the normalisation; the per-image factor stays for
    networks that do see it (the ResNets' BatchNorm). ``benchmarks/recipe_checks.py`` measures both.

    Args:
        scale: crop area fraction range.
        ratio: crop aspect ratio range (log-uniform).
        degrees: maximum absolute rotation in degrees.
        strength: intensity jitter strength s (0.5 in the paper).
        jitter_p: probability of intensity jitter per sample.
        clamp: clip values to this range after each intensity op (None: no clipping).
    """

    def __init__(self, scale: _Range = (0.2, 1.0), ratio: _Range = (3 / 4, 4 / 3), degrees: float = 45.0,
                 strength: float = 0.5, jitter_p: float = 0.8, clamp: _Range | None = (0.0, 1.0)) -> None:
        self.scale = _check_range("scale", scale, 1e-6, 1.0)
        self.ratio = _check_range("ratio", ratio, 1e-6)
        if not 0 <= degrees <= 180:
            raise ValueError(f"degrees must be in [0, 180], got {degrees!r}")
        self.degrees = float(degrees)
        self.brightness = _jitter_range("strength", 0.8 * strength)
        self.contrast = self.brightness
        self.bias_field = math.log1p(0.8 * strength)
        self.jitter_p = _check_prob("jitter_p", jitter_p)
        self.clamp = None if clamp is None else _check_range("clamp", clamp)

    def _apply(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        n, _, h, w = x.shape
        dev = x.device
        theta = _affine_theta(n, h, w, dev, generator, scale=self.scale, ratio=self.ratio, degrees=self.degrees,
                              hflip_p=0.5, vflip_p=0.0)
        x = _warp(x, theta, "bilinear")
        jit = _coin(n, self.jitter_p, dev, generator)
        one = torch.ones(n, device=dev)
        fb = torch.where(jit, _uniform(n, self.brightness, dev, generator), one)
        fc = torch.where(jit, _uniform(n, self.contrast, dev, generator), one)
        field = torch.where(jit, _uniform(n, (0.0, self.bias_field), dev, generator), 0 * one)
        x = _clamp(_bias_field(_brightness(x, fb), field, generator), self.clamp)
        return _clamp(_contrast(x, fc), self.clamp)


class IntensityView(_View):
    """Intensity-only view: keeps pixel correspondence (for local, pixel-level losses).

    Per sample: a smooth multiplicative brightness field (:func:`_bias_field`, log-amplitude
    ``a ~ U(0, bias_field)``), a contrast factor (blend with the image mean), gamma ``x -> x**g``
    (on values clipped at 0), additive Gaussian noise with a per-sample std. No geometric change:
    pixel (i, j) of the view is pixel (i, j) of the input; without noise and bias field the view
    is a strictly increasing function of the input (when factors > 0 and no clipping).

    There is no constant brightness factor: the U-Net's bias-free convs followed by InstanceNorm
    cancel it exactly (the last decoder map moves 0.2 % under ×0.7), so it would only pretend
    to make the two views differ. Every op here changes what the network sees.

    Args:
        contrast: contrast jitter strength (factors in [1-c, 1+c]).
        gamma: range of the gamma exponent (log-uniform); (1, 1) disables it.
        bias_field: largest log-amplitude of the brightness field (local factors within
            ``[e^-a, e^a]``); 0 disables it.
        noise_std: range of the per-sample noise standard deviation; (0, 0) disables noise.
        clamp: clip values to this range at the end (None: no clipping).
    """

    def __init__(self, contrast: float = 0.4, gamma: _Range = (0.7, 1.5), bias_field: float = 0.3,
                 noise_std: _Range = (0.0, 0.03), clamp: _Range | None = (0.0, 1.0)) -> None:
        self.contrast = _jitter_range("contrast", contrast)
        self.gamma = _check_range("gamma", gamma, 1e-6)
        if bias_field < 0:
            raise ValueError(f"bias_field must be >= 0, got {bias_field!r}")
        self.bias_field = float(bias_field)
        self.noise_std = _check_range("noise_std", noise_std, 0.0)
        self.clamp = None if clamp is None else _check_range("clamp", clamp)

    def _apply(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        n = x.shape[0]
        dev = x.device
        fb = _uniform(n, (0.0, self.bias_field), dev, generator)
        fc = _uniform(n, self.contrast, dev, generator)
        g = torch.exp(_uniform(n, (math.log(self.gamma[0]), math.log(self.gamma[1])), dev, generator))
        std = _uniform(n, self.noise_std, dev, generator)
        if self.bias_field > 0:
            x = _bias_field(x, fb, generator)
        x = _contrast(x, fc)
        x = x.clamp(min=0.0) ** g.view(n, 1, 1, 1).to(x.dtype)
        if self.noise_std[1] > 0:
            x = x + std.view(n, 1, 1, 1).to(x.dtype) * _draw(tuple(x.shape), dev, generator, normal=True).to(x.dtype)
        return _clamp(x, self.clamp)


VIEW_KINDS: dict[str, type[_View]] = {"simclr": SimCLRView, "medical": MedicalView, "intensity": IntensityView}


class ViewPair:
    """Two independent random views of the same images: ``(B, C, H, W) -> ((B, C, H, W), (B, C, H, W))``.

    Args:
        view: a view transform (``SimCLRView``, ``MedicalView``, ``IntensityView`` or any
            callable ``(images, generator) -> images``).
    """

    def __init__(self, view: Callable[..., torch.Tensor]) -> None:
        if not callable(view):
            raise TypeError(f"view must be callable, got {type(view).__name__}")
        self.view = view

    def __call__(self, images: torch.Tensor,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.view(images, generator), self.view(images, generator)

    def __repr__(self) -> str:
        return f"ViewPair({type(self.view).__name__})"


def make_views(kind: str, **kwargs) -> ViewPair:
    """Build a ``ViewPair`` of the named kind.

    Args:
        kind: ``"simclr"`` (photographs), ``"medical"`` (X-ray/CT/MR, no blur) or
            ``"intensity"`` (no geometric change; for local losses).
        **kwargs: options of the view class (``SimCLRView``, ``MedicalView``, ``IntensityView``).

    Raises:
        ValueError: unknown ``kind``.
    """
    if kind not in VIEW_KINDS:
        raise ValueError(f"unknown view kind {kind!r}; expected one of {sorted(VIEW_KINDS)}")
    return ViewPair(VIEW_KINDS[kind](**kwargs))


class JointTransform:
    """The same random geometric transform applied to images and their masks (fine-tuning).

    Per sample: random resized crop, rotation in [-degrees, degrees], horizontal/vertical flips,
    as one affine warp. Images are resampled bilinearly (0 outside the source), masks with
    nearest neighbour; mask pixels whose source lies outside the image become ``ignore_index``.

    Args:
        scale: crop area fraction range ((1, 1) disables cropping).
        ratio: crop aspect ratio range (log-uniform).
        degrees: maximum absolute rotation in degrees.
        hflip_p: probability of a horizontal flip.
        vflip_p: probability of a vertical flip.
        ignore_index: mask value for pixels brought in from outside the image.

    Call:
        ``(image (B, C, H, W) float, mask (B, H, W) int) -> (image, mask int64)``; unbatched
        ``(C, H, W)`` / ``(H, W)`` also accepted.
    """

    def __init__(self, scale: _Range = (0.7, 1.0), ratio: _Range = (3 / 4, 4 / 3), degrees: float = 15.0,
                 hflip_p: float = 0.5, vflip_p: float = 0.0, ignore_index: int = IGNORE_INDEX) -> None:
        self.scale = _check_range("scale", scale, 1e-6, 1.0)
        self.ratio = _check_range("ratio", ratio, 1e-6)
        if not 0 <= degrees <= 180:
            raise ValueError(f"degrees must be in [0, 180], got {degrees!r}")
        self.degrees = float(degrees)
        self.hflip_p, self.vflip_p = _check_prob("hflip_p", hflip_p), _check_prob("vflip_p", vflip_p)
        self.ignore_index = int(ignore_index)

    def __call__(self, image: torch.Tensor, mask: torch.Tensor,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x, single = _as_batch(image)
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
        m = mask.unsqueeze(0) if single else mask
        if m.ndim != 3 or m.shape[0] != x.shape[0] or m.shape[1:] != x.shape[2:]:
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match image shape {tuple(image.shape)}; "
                             "expected (B, H, W) for images (B, C, H, W)")
        n, _, h, w = x.shape
        theta = _affine_theta(n, h, w, x.device, generator, scale=self.scale, ratio=self.ratio,
                              degrees=self.degrees, hflip_p=self.hflip_p, vflip_p=self.vflip_p)
        x = _warp(x, theta, "bilinear")
        # Shift so that "outside" (0 after zero padding) maps back to ignore_index.
        shifted = (m.to(torch.float32) - (self.ignore_index - 1)).unsqueeze(1)
        warped = _warp(shifted, theta.to(torch.float32), "nearest").squeeze(1)
        out_mask = torch.where(warped == 0, torch.full_like(warped, self.ignore_index),
                               warped + (self.ignore_index - 1)).round().to(torch.int64)
        return (x[0], out_mask[0]) if single else (x, out_mask)
