"""Segmentation Dice, pooled 2D and per-volume 3D, streamed and mergeable across ranks.

Dice is reported per foreground class (classes ``1 .. K-1``; class 0 is
background) in the two forms of methods.md §4:

* **pooled 2D** (the paper's form): per class, ``2 * sum(I) / (sum(P) + sum(T))``
  with the sums over every pixel of every test slice;
* **per-volume 3D**: per class and volume, the same ratio over the volume's
  slices stacked, then mean ± std over volumes.

Both come from per-class pixel counts, so :class:`DiceAccumulator` streams
batches and keeps only ``3 x K`` integers per volume (never the predictions),
and adding counts from several ranks is exact.

**Empty-empty rule.** When a class is absent from both the prediction and the
reference of a volume (or, pooled, of the whole test set), its Dice is 0/0:
it is recorded as NaN and *skipped* — excluded from means and stds, and not
counted in ``per_class_count`` — rather than counted as 1.0, which would
inflate scores on volumes that lack a structure. A class absent from the
reference but predicted scores 0.0 (a false positive is penalised).
Pixels whose reference is ``ignore_index`` are left out of every count.
"""
from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from medcl.train.metrics._arrays import nanmean, to_numpy

logger = logging.getLogger(__name__)

__all__ = ["PooledDice", "VolumeDice", "DiceAccumulator"]


def _dice(inter: np.ndarray, pred_sum: np.ndarray, target_sum: np.ndarray) -> np.ndarray:
    denom = (pred_sum + target_sum).astype(np.float64)
    out = np.full(denom.shape, np.nan)
    np.divide(2.0 * inter, denom, out=out, where=denom > 0)
    return out


@dataclass(frozen=True)
class PooledDice:
    """Dice pooled over all slices, per foreground class.

    Attributes:
        per_class: Foreground class -> Dice; NaN when the class is absent from
            both predictions and references everywhere.
        mean: Mean over the non-NaN foreground classes (NaN if none).
    """

    per_class: dict[int, float]
    mean: float

    def to_metrics(self, prefix: str = "dice_2d") -> dict[str, float]:
        """Flat dict for ``ray.train.report`` / MLflow: ``{prefix}`` (the mean) and ``{prefix}_class{c}``."""
        return {prefix: self.mean, **{f"{prefix}_class{c}": v for c, v in self.per_class.items()}}


@dataclass(frozen=True)
class VolumeDice:
    """Per-volume 3D Dice, per foreground class, summarised over volumes.

    Attributes:
        volume_ids: Volume ids in sorted order (rows of ``scores``).
        scores: Dice per volume and foreground class, shape (V, K-1); NaN
            where the class is absent from both prediction and reference.
        per_class_mean: Foreground class -> mean over volumes (NaN skipped).
        per_class_std: Foreground class -> population std (ddof=0) over volumes.
        per_class_count: Foreground class -> number of volumes that entered the mean.
        mean: Mean over foreground classes of ``per_class_mean``.
        std: Std (ddof=0) over volumes of each volume's mean over its foreground classes.
    """

    volume_ids: tuple[str, ...]
    scores: np.ndarray
    per_class_mean: dict[int, float]
    per_class_std: dict[int, float]
    per_class_count: dict[int, int]
    mean: float
    std: float

    def to_metrics(self, prefix: str = "dice_3d") -> dict[str, float]:
        """Flat dict: ``{prefix}_mean``, ``{prefix}_std``, ``{prefix}_num_volumes``, ``{prefix}_class{c}_mean/_std``."""
        out = {f"{prefix}_mean": self.mean, f"{prefix}_std": self.std}
        out[f"{prefix}_num_volumes"] = float(len(self.volume_ids))
        for c in self.per_class_mean:
            out[f"{prefix}_class{c}_mean"] = self.per_class_mean[c]
            out[f"{prefix}_class{c}_std"] = self.per_class_std[c]
        return out


class DiceAccumulator:
    """Streaming Dice counts, pooled and per volume, mergeable across ranks.

    Keeps, per foreground *and* background class, the totals of intersection,
    predicted pixels and reference pixels: once pooled and once per volume
    (3D Dice of a volume = ``2 * sum_slices I / (sum_slices P + sum_slices T)``).
    With ``slice_index`` it also remembers which ``(volume, slice)`` pairs were
    counted and refuses a pair seen twice — e.g. the padding duplicates of a
    ``DistributedSampler`` — since that would bias every count.

    Args:
        num_classes: K, number of classes including background 0 (>= 2).
        ignore_index: Reference value whose pixels are left out of all counts.
        per_volume: Whether to keep per-volume counts (then ``volume_ids`` is
            required by :meth:`update`); False keeps only pooled counts.

    Example:
        >>> acc = DiceAccumulator(num_classes=3)
        >>> for batch in loader:  # doctest: +SKIP
        ...     acc.update(logits.argmax(1), batch["mask"], batch["volume_id"], batch["slice_index"])
        >>> acc.reduce()  # doctest: +SKIP  (sum over ranks when torch.distributed is initialised)
        >>> metrics = acc.compute()  # doctest: +SKIP  {"dice_2d": ..., "dice_3d_mean": ..., ...}
    """

    def __init__(self, num_classes: int, ignore_index: int = -1, per_volume: bool = True) -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int):
            raise TypeError(f"num_classes must be an int, got {type(num_classes).__name__} {num_classes!r}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 (background + at least one class), got {num_classes}")
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__} {ignore_index!r}")
        if 0 <= ignore_index < num_classes:
            raise ValueError(f"ignore_index must not be a class in [0, {num_classes}), got {ignore_index}")
        if not isinstance(per_volume, bool):
            raise TypeError(f"per_volume must be a bool, got {type(per_volume).__name__} {per_volume!r}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.per_volume = per_volume
        self._pooled = np.zeros((3, num_classes), dtype=np.int64)  # rows: inter, pred, target
        self._volumes: dict[str, np.ndarray] = {}
        self._seen: set[tuple[str, int]] = set()

    def update(
        self,
        pred: np.ndarray | torch.Tensor,
        target: np.ndarray | torch.Tensor,
        volume_ids: Sequence[str] | np.ndarray | None = None,
        slice_index: Sequence[int] | np.ndarray | torch.Tensor | None = None,
    ) -> None:
        """Add a batch of slices.

        Args:
            pred: Predicted labels (argmax of the logits). Shape: (B, H, W), ints in [0, K).
            target: Reference labels. Shape: (B, H, W), ints in [0, K) or ``ignore_index``.
            volume_ids: Volume id of each slice, length B (required when ``per_volume``).
            slice_index: Index of each slice in its volume, length B (optional;
                enables the duplicate check, needs ``volume_ids``).

        Raises:
            ValueError: On shape mismatches, labels out of range, a missing
                ``volume_ids``, or a ``(volume, slice)`` pair already counted.
        """
        p = to_numpy("pred", pred)
        t = to_numpy("target", target)
        if p.ndim != 3 or t.shape != p.shape:
            raise ValueError(
                f"pred and target must both have shape (B, H, W), got pred {tuple(p.shape)} and "
                f"target {tuple(t.shape)}; pass logits.argmax(1) as pred"
            )
        if not (np.issubdtype(p.dtype, np.integer) and np.issubdtype(t.dtype, np.integer)):
            raise ValueError(f"pred and target must hold integer labels, got dtypes {p.dtype} and {t.dtype}")
        b, k = p.shape[0], self.num_classes
        if p.size and (p.min() < 0 or p.max() >= k):
            raise ValueError(f"pred labels must lie in [0, {k}), got range [{p.min()}, {p.max()}]")
        valid = t != self.ignore_index
        if np.any(valid) and (t[valid].min() < 0 or t[valid].max() >= k):
            raise ValueError(
                f"target labels must lie in [0, {k}) or equal ignore_index={self.ignore_index}, "
                f"got range [{t[valid].min()}, {t[valid].max()}]"
            )
        ids = self._check_ids(volume_ids, slice_index, b)
        # Per-slice per-class counts with one bincount each: bin = slice * K + class.
        rows = np.broadcast_to(np.arange(b, dtype=np.int64)[:, None, None] * k, p.shape)[valid]
        pv, tv = p[valid].astype(np.int64), t[valid].astype(np.int64)
        counts = np.stack(
            [
                np.bincount(rows[pv == tv] + tv[pv == tv], minlength=b * k),
                np.bincount(rows + pv, minlength=b * k),
                np.bincount(rows + tv, minlength=b * k),
            ]
        ).reshape(3, b, k)
        self._pooled += counts.sum(axis=1)
        if ids is not None and self.per_volume:
            for i, vid in enumerate(ids):
                acc = self._volumes.get(vid)
                self._volumes[vid] = counts[:, i] if acc is None else acc + counts[:, i]

    def _check_ids(self, volume_ids: Any, slice_index: Any, b: int) -> list[str] | None:
        if volume_ids is None:
            if self.per_volume:
                raise ValueError("volume_ids is required when per_volume=True (one id per slice)")
            if slice_index is not None:
                raise ValueError("slice_index needs volume_ids to identify slices")
            return None
        ids = [str(v) for v in (volume_ids.tolist() if isinstance(volume_ids, np.ndarray) else volume_ids)]
        if len(ids) != b:
            raise ValueError(f"volume_ids must have one id per slice ({b}), got {len(ids)}")
        if slice_index is not None:
            idx = to_numpy("slice_index", slice_index).reshape(-1).astype(np.int64).tolist()
            if len(idx) != b:
                raise ValueError(f"slice_index must have one entry per slice ({b}), got {len(idx)}")
            batch: set[tuple[str, int]] = set()
            for key in zip(ids, idx):
                if key in self._seen or key in batch:
                    raise ValueError(
                        f"(volume_id, slice_index) {key} was already counted; duplicated slices (e.g. "
                        "DistributedSampler padding) would bias Dice - evaluate each slice exactly once"
                    )
                batch.add(key)
            self._seen |= batch
        return ids

    def pooled(self) -> PooledDice:
        """Dice pooled over every slice seen so far (the paper's form)."""
        dice = _dice(*self._pooled)[1:]
        if np.all(np.isnan(dice)):
            warnings.warn("no foreground class present in predictions or references; pooled Dice is NaN", stacklevel=2)
        return PooledDice(per_class={c: float(d) for c, d in enumerate(dice, start=1)}, mean=nanmean(dice))

    def volumes(self) -> VolumeDice:
        """Per-volume 3D Dice summarised over volumes (see the empty-empty rule in the module doc)."""
        if not self.per_volume:
            raise ValueError("per-volume Dice needs DiceAccumulator(per_volume=True)")
        if not self._volumes:
            raise ValueError("no slices were added; call update() before volumes()")
        vids = tuple(sorted(self._volumes))
        counts = np.stack([self._volumes[v] for v in vids], axis=1)  # (3, V, K)
        scores = _dice(*counts)[:, 1:]
        classes = range(1, self.num_classes)
        col = {c: scores[:, c - 1][~np.isnan(scores[:, c - 1])] for c in classes}
        per_mean = {c: float(col[c].mean()) if col[c].size else math.nan for c in classes}
        per_std = {c: float(col[c].std()) if col[c].size else math.nan for c in classes}
        vol_means = np.array([nanmean(row) for row in scores])
        vol_means = vol_means[~np.isnan(vol_means)]
        return VolumeDice(
            volume_ids=vids,
            scores=scores,
            per_class_mean=per_mean,
            per_class_std=per_std,
            per_class_count={c: int(col[c].size) for c in classes},
            mean=nanmean(np.array(list(per_mean.values()))),
            std=float(vol_means.std()) if vol_means.size else math.nan,
        )

    def compute(self) -> dict[str, float]:
        """All Dice metrics as one flat dict: ``pooled().to_metrics()`` plus, with
        ``per_volume``, ``volumes().to_metrics()`` (keys ``dice_2d``, ``dice_2d_class{c}``,
        ``dice_3d_mean``, ``dice_3d_std``, ``dice_3d_class{c}_mean`` ...). Call :meth:`reduce` first on N ranks."""
        out = self.pooled().to_metrics()
        if self.per_volume:
            out.update(self.volumes().to_metrics())
        return out

    def state_dict(self) -> dict[str, Any]:
        """Plain-Python snapshot (ints, strings, lists) for sending between processes."""
        return {
            "num_classes": self.num_classes,
            "ignore_index": self.ignore_index,
            "per_volume": self.per_volume,
            "pooled": self._pooled.tolist(),
            "volumes": {v: c.tolist() for v, c in self._volumes.items()},
            "seen": sorted(self._seen),
        }

    def merge(self, other: DiceAccumulator | dict[str, Any]) -> DiceAccumulator:
        """Add another accumulator's counts (or its ``state_dict()``) into this one; returns self.

        Raises:
            ValueError: If the settings differ or both counted the same ``(volume, slice)``.
        """
        state = other.state_dict() if isinstance(other, DiceAccumulator) else other
        for key in ("num_classes", "ignore_index", "per_volume"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"cannot merge accumulators with different {key}: {state[key]} vs {getattr(self, key)}"
                )
        seen = {(str(v), int(i)) for v, i in state["seen"]}
        overlap = self._seen & seen
        if overlap:
            raise ValueError(
                f"both accumulators counted (volume_id, slice_index) {min(overlap)}; "
                "each slice must be evaluated once"
            )
        self._pooled += np.asarray(state["pooled"], dtype=np.int64)
        for vid, c in state["volumes"].items():
            arr = np.asarray(c, dtype=np.int64)
            self._volumes[vid] = self._volumes[vid] + arr if vid in self._volumes else arr
        self._seen |= seen
        return self

    def reduce(self) -> DiceAccumulator:
        """Sum the counts of every rank in place (``all_gather_object``); no-op without a process group.

        Every rank must call it (it is a collective); afterwards each rank holds the global counts.
        """
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return self
        world = torch.distributed.get_world_size()
        if world == 1:
            return self
        states: list[Any] = [None] * world
        torch.distributed.all_gather_object(states, self.state_dict())
        merged = DiceAccumulator(self.num_classes, self.ignore_index, self.per_volume)
        for state in states:
            merged.merge(state)
        self._pooled, self._volumes, self._seen = merged._pooled, merged._volumes, merged._seen
        return self
