"""2D U-Net with segmentation, global and local contrastive heads (methods.md section 3).

Ronneberger et al., "U-Net", MICCAI 2015; heads as in Chaitanya et al., NeurIPS 2020
and Hu et al., "Semi-supervised contrastive learning for label-efficient medical
image segmentation", MICCAI 2021.

State_dict keys are grouped by stage so that hand-overs keep or drop by prefix::

    encoder.conv0.*, encoder.down1.* ... encoder.down{depth}.*   (bottleneck = last down)
    decoder.up{depth}.* ... decoder.up1.*
    seg_head.*, global_head.*, local_head.*

Input sizes are not padded: ``H`` and ``W`` must be divisible by ``2**depth``
(``depth = len(features) - 1``); :meth:`UNet.encode` raises a ``ValueError`` otherwise.

The global head flattens the bottleneck pooled to ``4 × 4`` (not a global pool, which
an InstanceNorm bottleneck makes nearly constant across images; :class:`GlobalHead`).
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from medcl.models.heads import GlobalHead, LocalHead, init_to_prior_
from medcl.models.weights import LoadReport, WeightSource, copy_matching_weights, read_state_dict, strip_key_prefixes

__all__ = ["ConvBlock", "Down", "Up", "UNetEncoder", "UNetDecoder", "UNet", "NORMS", "STAGE_PREFIXES"]

logger = logging.getLogger(__name__)

NORMS = ("instance", "batch")
#: Top-level state_dict prefixes of :class:`UNet`, the units a stage hand-over keeps or drops.
STAGE_PREFIXES = ("encoder", "decoder", "seg_head", "global_head", "local_head")
PAPER_FEATURES = (64, 128, 256, 512, 1024)
CPU_FEATURES = (16, 32, 64, 128, 256)
GLOBAL_GRID = 4  # side of the map the global head pools the bottleneck to, then flattens


def _norm_layer(norm: str, channels: int) -> nn.Module:
    if norm == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    return nn.BatchNorm2d(channels)


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


class ConvBlock(nn.Sequential):
    """Two (3×3 conv → norm → ReLU) layers, with optional 2D dropout between them.

    Convs have no bias (the norm's affine shift replaces it).

    Args:
        in_channels: input channels C_in.
        out_channels: output channels C_out.
        norm: ``"instance"`` (affine InstanceNorm2d) or ``"batch"`` (BatchNorm2d).
        dropout: channel dropout probability after the first ReLU (0 = none).

    Shape:
        ``(B, C_in, H, W)`` → ``(B, C_out, H, W)``.
    """

    def __init__(self, in_channels: int, out_channels: int, norm: str = "instance", dropout: float = 0.0) -> None:
        layers: OrderedDict[str, nn.Module] = OrderedDict(
            conv1=nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            norm1=_norm_layer(norm, out_channels),
            act1=nn.ReLU(inplace=True),
        )
        if dropout > 0:
            layers["drop"] = nn.Dropout2d(dropout)
        layers["conv2"] = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        layers["norm2"] = _norm_layer(norm, out_channels)
        layers["act2"] = nn.ReLU(inplace=True)
        super().__init__(layers)


class Down(nn.Module):
    """2×2 max-pool then :class:`ConvBlock`.

    Shape:
        ``(B, C_in, H, W)`` → ``(B, C_out, H/2, W/2)``.
    """

    def __init__(self, in_channels: int, out_channels: int, norm: str = "instance", dropout: float = 0.0) -> None:
        super().__init__()
        self.pool = nn.MaxPool2d(2)
        self.conv = ConvBlock(in_channels, out_channels, norm, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.pool(x))


class Up(nn.Module):
    """2×2 transposed conv (stride 2), concatenate the skip, then :class:`ConvBlock`.

    Shape:
        ``x: (B, C_in, h, w)``, ``skip: (B, C_out, 2h, 2w)`` → ``(B, C_out, 2h, 2w)``.
    """

    def __init__(self, in_channels: int, out_channels: int, norm: str = "instance", dropout: float = 0.0) -> None:
        super().__init__()
        self.upsample = nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2)
        self.conv = ConvBlock(2 * out_channels, out_channels, norm, dropout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([skip, self.upsample(x)], dim=1))


class UNetEncoder(nn.Module):
    """Contracting path: ``conv0`` at full resolution then ``down1 … down{depth}``.

    Shape:
        ``(B, C, H, W)`` → skips ``[(B, F0, H, W), …, (B, F{d-1}, H/2**(d-1), W/2**(d-1))]``
        and bottleneck ``(B, Fd, H/2**d, W/2**d)``.
    """

    def __init__(self, in_channels: int, features: Sequence[int], norm: str, dropout: float) -> None:
        super().__init__()
        self.depth = len(features) - 1
        self.conv0 = ConvBlock(in_channels, features[0], norm, dropout)
        for i in range(1, self.depth + 1):
            self.add_module(f"down{i}", Down(features[i - 1], features[i], norm, dropout))

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        skips = []
        x = self.conv0(x)
        for i in range(1, self.depth + 1):
            skips.append(x)
            x = getattr(self, f"down{i}")(x)
        return skips, x


class UNetDecoder(nn.Module):
    """Expanding path: ``up{depth} … up1``, each consuming the skip of its level.

    Shape:
        skips as produced by :class:`UNetEncoder` and bottleneck ``(B, Fd, h, w)``
        → ``(B, F0, H, W)``.
    """

    def __init__(self, features: Sequence[int], norm: str, dropout: float) -> None:
        super().__init__()
        self.depth = len(features) - 1
        for i in range(self.depth, 0, -1):
            self.add_module(f"up{i}", Up(features[i], features[i - 1], norm, dropout))

    def forward(self, skips: Sequence[torch.Tensor], bottleneck: torch.Tensor) -> torch.Tensor:
        x = bottleneck
        for i in range(self.depth, 0, -1):
            x = getattr(self, f"up{i}")(x, skips[i - 1])
        return x


class UNet(nn.Module):
    """2D U-Net with a segmentation head and global/local contrastive projection heads.

    Encoder: ``depth = len(features) - 1`` max-pool downsamplings, widths
    ``features`` (the last is the bottleneck). Decoder: transposed-conv upsampling
    with skip concatenation back to ``features[0]`` channels at full resolution.
    Heads: ``seg_head`` (1×1 conv → K logits), ``global_head`` (bottleneck
    average-pooled to ``global_grid × global_grid`` and flattened → Linear → ReLU
    → Linear → D), ``local_head`` (1×1 conv → ReLU → 1×1 conv → D on the last
    decoder map, L2-normalised per pixel).

    Inputs are never padded: H and W must be divisible by ``2**depth``
    (16 for the presets). Batch size 1 in training mode needs ``norm="instance"``
    or a bottleneck larger than 1×1 (BatchNorm needs more than one value per channel).

    Args:
        in_channels: image channels C.
        num_classes: segmentation classes K (background included).
        features: encoder widths including the bottleneck, length >= 2.
            Paper: ``(64, 128, 256, 512, 1024)``; CPU preset ``(16, 32, 64, 128, 256)``.
        norm: ``"instance"`` (affine InstanceNorm2d) or ``"batch"`` (BatchNorm2d); case-insensitive.
        dropout: ``Dropout2d`` probability inside every conv block, in ``[0, 1)``.
        embed_dim: size D of the global and local embeddings. Default 128.
        global_hidden_dim: hidden width of the global head; ``None`` uses the bottleneck width.
        local_hidden_dim: hidden channels of the local head; ``None`` uses ``features[0]``.
        global_grid: the global head average-pools the bottleneck to this side and flattens it;
            1 is methods §3's global average pool. Default :data:`GLOBAL_GRID` (4: all of a
            64×64 input's bottleneck at depth 4).

    Raises:
        TypeError: a size is not an int.
        ValueError: a size < 1, ``len(features) < 2``, unknown ``norm``, or ``dropout`` outside ``[0, 1)``.

    Example:
        >>> net = UNet.cpu(in_channels=1, num_classes=3).eval()
        >>> x = torch.zeros(2, 1, 64, 64)
        >>> net(x).shape, net.global_embedding(x).shape, net.local_embedding(x).shape
        (torch.Size([2, 3, 64, 64]), torch.Size([2, 128]), torch.Size([2, 128, 64, 64]))
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 2,
        features: Sequence[int] = CPU_FEATURES,
        norm: str = "instance",
        dropout: float = 0.0,
        embed_dim: int = 128,
        global_hidden_dim: int | None = None,
        local_hidden_dim: int | None = None,
        global_grid: int = GLOBAL_GRID,
    ) -> None:
        super().__init__()
        self.in_channels = _positive_int("in_channels", in_channels)
        self.num_classes = _positive_int("num_classes", num_classes)
        if isinstance(features, (str, bytes)) or not isinstance(features, Iterable):
            raise TypeError(f"features must be a sequence of ints, got {features!r}")
        features = tuple(features)
        if len(features) < 2:
            raise ValueError(
                f"len(features)={len(features)} must be >= 2 (encoder widths including the bottleneck), "
                f"got features={features}"
            )
        for i, f in enumerate(features):
            _positive_int(f"features[{i}]", f)
        self.features = features
        if not isinstance(norm, str) or norm.lower() not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        self.norm = norm.lower()
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)):
            raise TypeError(f"dropout must be a float, got {type(dropout).__name__} {dropout!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.dropout = float(dropout)
        self.embed_dim = _positive_int("embed_dim", embed_dim)
        self.global_grid = _positive_int("global_grid", global_grid)
        global_hidden = features[-1] if global_hidden_dim is None else _positive_int("global_hidden_dim", global_hidden_dim)
        local_hidden = features[0] if local_hidden_dim is None else _positive_int("local_hidden_dim", local_hidden_dim)

        self.encoder = UNetEncoder(self.in_channels, features, self.norm, self.dropout)
        self.decoder = UNetDecoder(features, self.norm, self.dropout)
        self.seg_head = nn.Conv2d(features[0], self.num_classes, kernel_size=1)
        self.global_head = GlobalHead(features[-1], global_hidden, self.embed_dim, grid=self.global_grid)
        self.local_head = LocalHead(features[0], local_hidden, self.embed_dim)

    # ----------------------------------------------------------------- presets
    @classmethod
    def paper(cls, in_channels: int = 1, num_classes: int = 2, **kwargs) -> UNet:
        """The published configuration: widths 64-128-256-512, bottleneck 1024 (~31 M U-Net parameters)."""
        return cls(in_channels, num_classes, features=PAPER_FEATURES, **kwargs)

    @classmethod
    def cpu(cls, in_channels: int = 1, num_classes: int = 2, **kwargs) -> UNet:
        """A CPU-sized configuration: widths 16-32-64-128, bottleneck 256 (1/16 of the paper's parameters)."""
        return cls(in_channels, num_classes, features=CPU_FEATURES, **kwargs)

    # --------------------------------------------------------------- geometry
    @property
    def depth(self) -> int:
        """Number of downsamplings, ``len(features) - 1``."""
        return len(self.features) - 1

    @property
    def size_divisor(self) -> int:
        """H and W must be multiples of this (``2**depth``)."""
        return 2**self.depth

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"x must have shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}"
            )
        h, w = x.shape[-2:]
        d = self.size_divisor
        if h % d or w % d:
            raise ValueError(
                f"x has spatial size {h}x{w} (shape {tuple(x.shape)}); H and W must be divisible by "
                f"2**depth={d} for depth={self.depth}; resize, crop or pad the input first"
            )

    # --------------------------------------------------------------- forward
    def encode(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Run the encoder.

        Args:
            x: images, shape ``(B, C, H, W)``, H and W divisible by ``2**depth``.

        Returns:
            ``(skips, bottleneck)``: ``skips[i]`` has shape ``(B, features[i], H/2**i, W/2**i)``
            for ``i < depth``; bottleneck ``(B, features[-1], H/2**depth, W/2**depth)``.

        Raises:
            ValueError: wrong rank, channel count, or H/W not divisible by ``2**depth``.
        """
        self._check_input(x)
        return self.encoder(x)

    def decode(self, skips: Sequence[torch.Tensor], bottleneck: torch.Tensor) -> torch.Tensor:
        """Run the decoder on the outputs of :meth:`encode`.

        Returns:
            The last decoder feature map, shape ``(B, features[0], H, W)``.

        Raises:
            ValueError: ``len(skips) != depth``.
        """
        if len(skips) != self.depth:
            raise ValueError(f"len(skips)={len(skips)} must equal depth={self.depth}")
        return self.decoder(skips, bottleneck)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Segment.

        Args:
            x: images, shape ``(B, C, H, W)``, H and W divisible by ``2**depth``.

        Returns:
            Raw logits (no softmax), shape ``(B, K, H, W)``.
        """
        return self.seg_head(self.decode(*self.encode(x)))

    def global_embedding(self, x: torch.Tensor) -> torch.Tensor:
        """Image-level embedding from the bottleneck (encoder only; decoder unused).

        Returns:
            Shape ``(B, D)``, not normalised (the NT-Xent loss normalises).
        """
        _, bottleneck = self.encode(x)
        return self.global_head(bottleneck)

    def local_embedding(self, x: torch.Tensor) -> torch.Tensor:
        """Pixel-level embedding from the last decoder map.

        Returns:
            Shape ``(B, D, H, W)``, unit L2 norm along D at every pixel.
        """
        return self.local_head(self.decode(*self.encode(x)))

    def logits_and_local_embedding(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Segmentation logits and local embeddings from one encoder/decoder pass.

        Returns:
            ``(logits (B, K, H, W), local embedding (B, D, H, W) L2-normalised along D)``.
        """
        features = self.decode(*self.encode(x))
        return self.seg_head(features), self.local_head(features)

    def init_seg_head(self, class_frequencies: Sequence[float] | torch.Tensor, weight_std: float | None = None,
                      generator: torch.Generator | None = None) -> None:
        """Start ``seg_head`` at a class prior: bias ``log p_k``, weights kept (or ``N(0, weight_std²)``).

        See :func:`medcl.models.heads.init_to_prior_` (why the weights are kept by default).
        """
        init_to_prior_(self.seg_head, class_frequencies, weight_std, generator)

    # ------------------------------------------------------------ hand-over
    def load_stage_weights(
        self,
        source: WeightSource,
        keep: Sequence[str] | str = ("encoder",),
        strict: bool = True,
    ) -> LoadReport:
        """Copy the ``keep`` parts of a previous stage's weights; everything else stays as is.

        Global → local pretraining keeps ``("encoder",)``; local → fine-tuning keeps
        ``("encoder", "decoder")``. Heads of the source are dropped (reported as
        ``skipped``); this model's heads keep their current values. A leading
        ``"module."`` (DDP) or ``"_orig_mod."`` (``torch.compile``) is removed from
        source keys.

        Args:
            source: a state_dict, or a path to a file holding one (``torch.load``
                with ``weights_only=True``; a checkpoint dict with the state_dict
                under ``model_state_dict``/``state_dict``/``model`` is unwrapped).
            keep: prefixes out of :data:`STAGE_PREFIXES` to copy.
            strict: raise when a kept key is missing from the source or the source
                has extra keys under a kept prefix. Shape mismatches always raise.

        Returns:
            A :class:`~medcl.models.weights.LoadReport` (loaded / missing / unexpected / skipped keys).

        Raises:
            ValueError: an unknown prefix in ``keep``, a shape mismatch (naming the key and
                both shapes), nothing matched, or a strict load with missing/unexpected keys.
            FileNotFoundError: ``source`` is a path that does not exist.
        """
        keep_t = (keep,) if isinstance(keep, str) else tuple(keep)
        if not keep_t:
            raise ValueError(f"keep must name at least one of {STAGE_PREFIXES}, got {keep!r}")
        bad = [k for k in keep_t if k not in STAGE_PREFIXES]
        if bad:
            raise ValueError(f"keep has unknown prefixes {bad}; choose from {STAGE_PREFIXES}")
        state_dict = strip_key_prefixes(read_state_dict(source), ("module.", "_orig_mod."))
        return copy_matching_weights(self, state_dict, scope=keep_t, strict=strict)
