"""How far a stage moved the parts it hands over: ``||w - w0|| / ||w0||`` per part, every epoch.

A stage that cannot move the network (too few steps, too small a rate) leaves
these near 0 and its rows measure only fine-tuning noise; logging them makes that
visible (``train/weight_change/encoder``, ``train/weight_change/decoder``).
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["WeightChange"]


class WeightChange:
    """Relative change of named parts' parameters since construction (the stage's start).

    Args:
        model: The trainable module (unwrapped); ``parts`` are its top-level children.
        parts: Child names to track, e.g. ``("encoder", "decoder")``; absent ones are skipped.

    Shape:
        Every parameter of a part is flattened into one vector ``w`` (length = the part's
        parameter count); the value is ``||w - w0||_2 / ||w0||_2``.
    """

    def __init__(self, model: nn.Module, parts: tuple[str, ...]) -> None:
        self.start = {part: [p.detach().clone() for p in getattr(model, part).parameters()]
                      for part in parts if isinstance(getattr(model, part, None), nn.Module)}

    @torch.no_grad()
    def __call__(self, model: nn.Module) -> dict[str, float]:
        """``{"train/weight_change/<part>": relative change}`` of ``model`` against the start."""
        out = {}
        for part, start in self.start.items():
            now = list(getattr(model, part).parameters())
            moved = sum(float((a.float() - b.float()).pow(2).sum()) for a, b in zip(now, start))
            size = sum(float(b.float().pow(2).sum()) for b in start)
            out[f"train/weight_change/{part}"] = (moved / size) ** 0.5 if size > 0 else 0.0
        return out
