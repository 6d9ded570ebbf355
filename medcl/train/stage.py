"""What one stage kind adds to the shared loop: a :class:`Stage` object per kind.

A stage names the streams it reads, builds its network, says which parts an
``init_from`` checkpoint replaces, and supplies its loss, the collation of its
training batches and (fine-tuning only) its evaluation.
:func:`medcl.train.loop.run_loop` does everything else, the same for every
kind and in this order, which fixes every random draw of a run:

    seed_everything -> build -> load init_from parts -> trainable part -> device / DDP
    -> optimiser + schedule -> loss (builds the views) -> batches -> rank-0 logger -> fit
    (-> evaluation on rank 0 after the last epoch)

The two families share their network handling through :class:`UNetStage`
(global / local pretraining, segmentation fine-tuning) and :class:`ResNetStage`
(classification pretraining and fine-tuning).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Protocol

import torch
from torch import nn

from medcl.data.streams import StreamSpec
from medcl.models import ResNetEncoder, UNet
from medcl.train.nets import UNetPart, build_unet

if TYPE_CHECKING:
    from medcl.train.context import StageContext
    from medcl.train.loop import LossFn, StageInputs

__all__ = ["Stage", "UNetStage", "ResNetStage", "build_encoder", "evaluation_streams"]

#: ``evaluate(model, stream, device, inputs, prefix) -> {f"{prefix}/...": value}``
Evaluate = Callable[[nn.Module, Any, torch.device, "StageInputs", str], "dict[str, float]"]


class Stage(Protocol):
    """One stage kind, as :func:`medcl.train.loop.run_loop` and the driver use it.

    Attributes:
        kind: The stage config's ``kind``.
        init_parts: What an ``init_from`` checkpoint replaces: U-Net prefixes
            (``("encoder",)``, ``("encoder", "decoder")``) or ``("encoder",)``,
            the ResNet backbone. Heads always start fresh.
        evaluate: Evaluation of one stream after the last epoch (rank 0, unwrapped
            model), or None for a stage that does not evaluate. The loop runs it on
            ``"test"`` (prefix ``test``) and, when present, ``"test_shifted"``
            (prefix ``shifted``).
    """

    kind: str
    init_parts: tuple[str, ...]
    evaluate: Evaluate | None

    def datasets(self, cfg: Any, dataset_dir: str) -> dict[str, StreamSpec]:
        """The streams this stage reads, by name (driver side); ``"train"`` is split across workers."""

    def build(self, cfg: Any, inputs: StageInputs) -> nn.Module:
        """The network with fresh random weights (seeded before; the construction order is the draw order)."""

    def load_init(self, network: nn.Module, weights: dict[str, torch.Tensor]) -> None:
        """Copy ``init_parts`` of a previous stage's ``state_dict`` into ``network``."""

    def trainable(self, network: nn.Module, cfg: Any) -> nn.Module:
        """The part of ``network`` the optimiser trains and the checkpoints hold."""

    def loss(self, ctx: StageContext, cfg: Any, inputs: StageInputs, net: nn.Module,
             generator: torch.Generator) -> LossFn:
        """``loss_fn(batch) -> (scalar loss, logs)`` over ``net`` (device-placed, maybe DDP-wrapped).

        ``generator`` is the run's seeded generator for augmentation; a log
        ``batch_images`` counts images for throughput.
        """

    def collate(self, ctx: StageContext, cfg: Any, epoch: int) -> Any | None:
        """The ``collate_fn`` of epoch ``epoch``'s training batches (None: plain tensors)."""


class _StageDefaults:
    evaluate: Evaluate | None = None

    def collate(self, ctx: StageContext, cfg: Any, epoch: int) -> Any | None:
        return None

class UNetStage(_StageDefaults):
    """A stage that trains part of a U-Net (``cfg.model`` is a ``UNetSpec``).

    Subclasses set ``kind``, ``output`` (the :class:`~medcl.train.nets.UNetPart`
    they train: ``"global"``, ``"local"`` or ``"logits"``) and, when they keep
    more than the encoder, ``init_parts``.
    """

    output: str
    init_parts: tuple[str, ...] = ("encoder",)

    def build(self, cfg: Any, inputs: StageInputs) -> UNet:
        return build_unet(cfg.model, inputs.in_channels, inputs.num_classes)

    def load_init(self, network: UNet, weights: dict[str, torch.Tensor]) -> None:
        network.load_stage_weights(weights, keep=self.init_parts, strict=False)

    def trainable(self, network: UNet, cfg: Any) -> nn.Module:
        return UNetPart(network, self.output)


def build_encoder(spec: Any, in_channels: int) -> ResNetEncoder:
    """A ResNet encoder from a :class:`medcl.config.ResNetSpec`."""
    weights = str(spec.weights_path) if spec.weights_path is not None else None
    return ResNetEncoder(spec.arch, in_channels=in_channels, small_input=spec.small_input, weights_path=weights)


class ResNetStage(_StageDefaults):
    """A stage that trains a network with a ResNet ``encoder`` (``cfg.model`` is a ``ResNetSpec``).

    ``init_from`` replaces the backbone (``ResNetEncoder.load_weights``); the
    whole network is trained.
    """

    init_parts: tuple[str, ...] = ("encoder",)

    def load_init(self, network: nn.Module, weights: dict[str, torch.Tensor]) -> None:
        network.encoder.load_weights(weights, strict=False)

    def trainable(self, network: nn.Module, cfg: Any) -> nn.Module:
        return network


def evaluation_streams(dataset_dir: str) -> dict[str, StreamSpec]:
    """The test streams of a fine-tuning stage: site A's test slices, and site B's when the dataset has one."""
    from medcl.data.streams import has_shifted_site

    streams = {"test": StreamSpec.of("eval_slices", dataset_dir, split="test", site="A")}
    if has_shifted_site(dataset_dir):
        streams["test_shifted"] = StreamSpec.of("eval_slices", dataset_dir, split="test", site="B")
    return streams
