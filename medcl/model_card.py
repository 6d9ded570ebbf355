"""The model card of an export (``model.json``) and loading an export back: :func:`load_model`.

:mod:`medcl.export` writes the directory; this module reads it, with nothing else than the
directory: the card says which network to build (architecture, its settings, channels,
classes), the weights come from ``model.safetensors`` (tensors only, no pickle) and are
checked against the card's sha256.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["CARD_FILE", "WEIGHTS_FILE", "FORMAT_VERSION", "ModelCard", "build_network", "load_model", "load_strict"]

CARD_FILE = "model.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class ModelCard:
    """The contents of ``model.json`` (:func:`load_model` returns it with the network).

    Attributes:
        task: "segmentation" (``(B, C, H, W) -> (B, K, H, W)`` logits) or "classification" (``-> (B, K)``).
        stage_kind: The stage that trained it ("seg_finetune", "cls_finetune").
        architecture: "unet" (encoder, decoder, segmentation head) or "resnet_classifier".
        model_spec: The architecture's settings (``UNetSpec`` / ``ResNetSpec`` fields).
        in_channels: Image channels C.
        num_classes: Output channels K.
        label_map: Mask classes ``{index: name}`` (segmentation; background included).
        class_names: Class names in output order (classification; also set when the dataset has them).
        multilabel: Classification outputs are independent sigmoids, not one softmax.
        preprocessing: How the ingest made the images the model saw: ``source_kind``,
            ``size`` (H, W), ``channels``, ``normalisation`` (in words), ``ingest_options``, and
            for volumes ``axis`` / ``axis_name`` / ``orientation`` / ``modalities``.
        dataset: ``path``, ``fingerprint``, ``manifest_sha256``, ``task`` of the training dataset.
        metrics: The evaluation of the exported weights (``test/*``, ``shifted/*``, ``val/*``).
        stage_metrics: Everything the stage reported after its last epoch (``best/*`` included).
        weights: ``which`` ("best" or "last"), ``epoch``, ``requested``, ``sha256`` of the weights file.
        job: The pipeline job key, when known.
        format_version, medcl_version, created: What wrote the card, and when (UTC, ISO 8601).
        source: ``checkpoint`` (where the weights came from) and the stage ``config``.
    """

    task: str
    stage_kind: str
    architecture: str
    model_spec: dict[str, Any]
    in_channels: int
    num_classes: int
    label_map: dict[int, str]
    class_names: tuple[str, ...]
    multilabel: bool
    preprocessing: dict[str, Any]
    dataset: dict[str, Any]
    metrics: dict[str, Any]
    stage_metrics: dict[str, Any]
    weights: dict[str, Any]
    job: str | None
    format_version: int
    medcl_version: str
    created: str
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of the images the model was trained on."""
        return tuple(self.preprocessing["size"])

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (label map keys as strings)."""
        out = {name: getattr(self, name) for name in self.__dataclass_fields__}
        out["label_map"] = {str(k): v for k, v in self.label_map.items()}
        out["class_names"] = list(self.class_names)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = CARD_FILE) -> ModelCard:
        """Inverse of :meth:`to_dict`.

        Raises:
            ValueError: a field is missing, or a newer medcl wrote the card (names ``where``).
        """
        missing = [name for name in cls.__dataclass_fields__ if name not in data and name != "source"]
        if missing:
            raise ValueError(f"{where}: lacks field(s) {missing}; it is not a medcl model card")
        if not isinstance(data["format_version"], int) or data["format_version"] > FORMAT_VERSION:
            raise ValueError(f"{where}: format_version={data['format_version']!r} is newer than this medcl's "
                             f"({FORMAT_VERSION}); upgrade medcl")
        kw = {name: data[name] for name in cls.__dataclass_fields__ if name in data}
        kw["label_map"] = {int(k): str(v) for k, v in data["label_map"].items()}
        kw["class_names"] = tuple(data["class_names"])
        return cls(**kw)


# ----------------------------------------------------------------------------- networks
def build_network(task: str, spec: Mapping[str, Any], in_channels: int, num_classes: int,
                  multilabel: bool = False) -> nn.Module:
    """The fine-tuned network of ``task`` with fresh weights, as its stage trains it (its checkpoint's keys).

    Segmentation: the U-Net's encoder, decoder and segmentation head (:class:`medcl.train.nets.UNetPart`,
    output "logits"); classification: :class:`medcl.models.ResNetClassifier`.

    Raises:
        ValueError: an unknown ``task``, or ``spec`` is not a valid ``UNetSpec`` / ``ResNetSpec``.
    """
    from medcl.config.binder import build
    from medcl.config.stages import ResNetSpec, UNetSpec

    if task not in ("segmentation", "classification"):
        raise ValueError(f"task must be 'segmentation' or 'classification', got {task!r}")
    if task == "segmentation":
        from medcl.train.nets import UNetPart, build_unet

        return UNetPart(build_unet(build(UNetSpec, dict(spec), path="model"), in_channels, num_classes), "logits")
    from medcl.models import ResNetClassifier, ResNetEncoder

    resnet = build(ResNetSpec, dict(spec), path="model")  # weights_path is not read: every weight is exported
    encoder = ResNetEncoder(resnet.arch, in_channels=in_channels, small_input=resnet.small_input)
    return ResNetClassifier(encoder, num_classes, multilabel=multilabel)


def load_strict(network: nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    """``network.load_state_dict(state, strict=True)``; a mismatch is a ``ValueError`` naming ``what``."""
    try:
        network.load_state_dict(dict(state), strict=True)
    except RuntimeError as exc:
        detail = " ".join(line.strip() for line in str(exc).splitlines()[1:])
        raise ValueError(f"{what}: the weights do not fit the network ({detail[:400]})") from None


def load_model(export_dir: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[nn.Module, ModelCard]:
    """The exported network, in eval mode, and its card; needs nothing but ``export_dir``.

    Returns:
        ``(network, card)``: segmentation ``(B, C, H, W) -> (B, K, H, W)`` logits (H, W divisible by
        ``2**(len(features) - 1)``), classification ``-> (B, K)`` logits (``network.predict_proba``).

    Raises:
        FileNotFoundError: ``model.json`` or ``model.safetensors`` is missing.
        ValueError: The card is malformed or newer than this medcl, the weights file's sha256 differs
            from the card's, or the weights do not fit the network.

    Example:
        >>> net, card = load_model("models/hippo-seg")  # doctest: +SKIP
        >>> x = torch.zeros(1, card.in_channels, *card.image_size)  # as card.preprocessing says  # doctest: +SKIP
        >>> labels = net(x).argmax(1)  # (1, H, W), indices of card.label_map  # doctest: +SKIP
    """
    from safetensors.torch import load_file

    root = Path(export_dir)
    card_path, weights_path = root / CARD_FILE, root / WEIGHTS_FILE
    for path in (card_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: {root} is not a medcl model export (medcl export)")
    card = ModelCard.from_dict(json.loads(card_path.read_text(encoding="utf-8")), str(card_path))
    expected = card.weights.get("sha256")
    if expected and hashlib.sha256(weights_path.read_bytes()).hexdigest() != expected:
        raise ValueError(f"{weights_path}: sha256 differs from {card_path} (file changed or corrupt); export again")
    network = build_network(card.task, card.model_spec, card.in_channels, card.num_classes, card.multilabel)
    load_strict(network, load_file(str(weights_path)), str(weights_path))
    return network.to(map_location).eval(), card
