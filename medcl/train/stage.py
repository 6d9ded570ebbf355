"""What one stage kind adds to the shared loop: a :class:`Stage` object per kind.

A stage names the streams it reads, builds its network, says which parts an
``init_from`` checkpoint replaces, and supplies its loss, the collation of its
training batches and (fine-tuning only) its evaluation.
:func:`medcl.train.loop.run_loop` does everything else, the same for every
kind and in this order, which fixes every random draw of a run:

    seed_everything -> build -> load init_from parts -> prepare (head prior) -> trainable part -> device / DDP
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

#: ``evaluate(model, stream, device, inputs, prefix, figure=None) -> {f"{prefix}/...": value}``; with ``figure``
#: (a path) it also writes its figure there from the same pass (:mod:`medcl.train.figures`).
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
        figure: File name of the figure ``evaluate`` draws, ``{prefix}`` standing for the
            stream's prefix (``"{prefix}_panel.png"``), or None. Logged to the stage's
            MLflow run under ``figures/`` (:mod:`medcl.train.final_evaluation`).
    """

    kind: str
    init_parts: tuple[str, ...]
    evaluate: Evaluate | None
    figure: str | None

    def datasets(self, cfg: Any, dataset_dir: str) -> dict[str, StreamSpec]:
        """The streams this stage reads, by name (driver side); ``"train"`` is split across workers."""

    def build(self, cfg: Any, inputs: StageInputs) -> nn.Module:
        """The network with fresh random weights (seeded before; the construction order is the draw order)."""

    def load_init(self, network: nn.Module, weights: dict[str, torch.Tensor]) -> None:
        """Copy ``init_parts`` of a previous stage's ``state_dict`` into ``network``."""

    def prepare(self, network: nn.Module, ctx: StageContext, cfg: Any, inputs: StageInputs) -> None:
        """After ``load_init``, before device placement: set up ``network`` from the training data.

        Fine-tuning sets its head to the labelled set's class prior; other kinds do nothing.
        """

    def trainable(self, network: nn.Module, cfg: Any) -> nn.Module:
        """The part of ``network`` the optimiser trains and the checkpoints hold."""

    def loss(self, ctx: StageContext, cfg: Any, inputs: StageInputs, net: nn.Module,
             generator: torch.Generator) -> LossFn:
        """``loss_fn(batch) -> (scalar loss, logs)`` over ``net`` (device-placed, maybe DDP-wrapped).

        ``generator`` is the run's seeded generator for augmentation; a log
        ``batch_images`` counts images for throughput.
        """

    def collate(self, ctx: StageContext, cfg: Any, epoch: int) -> Any | None:
        """The ``collate_fn`` of pass ``epoch`` over the training stream (None: plain tensors).

        The loop calls it once per pass (:func:`medcl.train.batches.epoch_batches`), which
        is the epoch when an epoch is one pass.
        """


class _StageDefaults:
    evaluate: Evaluate | None = None
    figure: str | None = None

    def collate(self, ctx: StageContext, cfg: Any, epoch: int) -> Any | None:
        return None

    def prepare(self, network: nn.Module, ctx: StageContext, cfg: Any, inputs: StageInputs) -> None:
        """After ``load_init``, before device placement: set up ``network`` from the training data (default: nothing)."""
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
        """Load every ``init_parts`` part the checkpoint holds, each one whole; the encoder must be there.

        A global checkpoint holds the encoder (and its head, dropped); a local one the
        encoder and decoder. A part the checkpoint holds only some keys of, or an
        encoder it lacks, is a ``ValueError`` naming the missing keys: a silently
        half-loaded network would train on, and its rows would measure nothing.
        """
        held = [part for part in self.init_parts if any(k.split(".", 1)[0] == part for k in _strip(weights))]
        if "encoder" not in held:
            raise ValueError(f"init_from checkpoint of stage {self.kind} has no encoder weights (encoder.*); "
                             f"its keys start with {sorted({k.split('.', 1)[0] for k in weights})}")
        try:  # strict: every key of the held parts is loaded, none is left over
            network.load_stage_weights(weights, keep=tuple(held), strict=True)
        except ValueError as exc:
            raise ValueError(f"init_from checkpoint does not fit stage {self.kind} (loading {'+'.join(held)}): "
                             f"{exc}") from None

    def trainable(self, network: UNet, cfg: Any) -> nn.Module:
        return UNetPart(network, self.output)


def _strip(weights: dict[str, torch.Tensor]) -> list[str]:
    """Keys without a leading ``module.`` / ``_orig_mod.`` (DDP, ``torch.compile``)."""
    from medcl.models.weights import strip_key_prefixes

    return list(strip_key_prefixes(weights, ("module.", "_orig_mod.")))


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
        """Load the whole ResNet backbone; a missing backbone key is a ``ValueError`` naming it."""
        try:
            network.encoder.load_weights(weights, strict=True)
        except ValueError as exc:
            raise ValueError(f"init_from checkpoint does not fit stage {self.kind} (loading the ResNet backbone): "
                             f"{exc}") from None

    def trainable(self, network: nn.Module, cfg: Any) -> nn.Module:
        return network


def evaluation_streams(dataset_dir: str, *, validation: bool) -> dict[str, StreamSpec]:
    """The evaluation streams of a fine-tuning stage.

    ``"test"``: site A's test slices; ``"test_shifted"``: site B's, when the dataset has
    them; ``"val"`` (with ``validation``, the stage's ``val_every`` > 0): site A's
    validation slices, when the dataset has any (without, the loop skips the selection
    with a warning: :meth:`medcl.train.selection.BestEpoch.for_stage`).
    """
    from medcl.data.streams import has_shifted_site

    streams = {"test": StreamSpec.of("eval_slices", dataset_dir, split="test", site="A")}
    if has_shifted_site(dataset_dir):
        streams["test_shifted"] = StreamSpec.of("eval_slices", dataset_dir, split="test", site="B")
    if validation and has_shifted_site(dataset_dir, split="val", site="A"):  # any site-A rows in split val
        streams["val"] = StreamSpec.of("eval_slices", dataset_dir, split="val", site="A")
    return streams
