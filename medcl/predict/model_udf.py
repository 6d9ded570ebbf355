"""The model as a Ray Data class-based UDF: built once per actor from an export directory, called per batch."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from medcl.model_card import load_model

__all__ = ["ExportedModel"]


class ExportedModel:
    """Segmentation labels or class probabilities of batches of model-input rows.

    Args:
        model_dir: The export directory (:func:`medcl.model_card.load_model`).
        device: "cpu" or "cuda".
        threads: torch intra-op threads of this actor (default: torch's).
        keep_images: Pass the ``image`` column through (for the panel of ``--labels``).
    """

    def __init__(self, model_dir: str, device: str = "cpu", threads: int | None = None,
                 keep_images: bool = False) -> None:
        if threads:
            torch.set_num_threads(int(threads))
        self.device, self.keep_images = torch.device(device), keep_images
        self.net, self.card = load_model(model_dir, map_location=self.device)

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, Any]:
        """``index``, ``slice``, ``error`` passed through, plus ``pred`` (B, H, W) uint8/int16 or ``probs`` (B, K)."""
        x = torch.from_numpy(np.ascontiguousarray(batch["image"], dtype=np.float32)).to(self.device)
        out: dict[str, Any] = {k: batch[k] for k in ("index", "slice", "error")}
        with torch.inference_mode():
            if self.card.task == "segmentation":
                dtype = np.uint8 if self.card.num_classes <= 256 else np.int16
                out["pred"] = self.net(x).argmax(1).cpu().numpy().astype(dtype)
            else:
                out["probs"] = self.net.predict_proba(x).float().cpu().numpy()
        if self.keep_images:
            out["image"] = batch["image"]
        return out
