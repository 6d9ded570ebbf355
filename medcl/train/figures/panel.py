"""A panel of test slices: image, ground truth and prediction overlaid; the best and worst slice by Dice among them.

**Cases are slices.** A slice is what the network predicts and what a 2D panel can show;
its Dice is known as soon as its batch is, so the choice streams with a bounded memory
(:class:`PanelCases`) and does not depend on how a volume's slices are spread over
batches; and the same rule serves 2D datasets (one slice per image) and
``medcl predict``. A case id is ``"<volume_id>:<slice_index>"`` in the stage evaluation.

**Case Dice** (:func:`slice_dice`): per slice, ``2|P ∩ T| / (|P| + |T|)`` of each
foreground class present in the reference or the prediction, averaged over those
classes (pixels whose reference is ``ignore_index`` left out). A slice with an empty
mask *and* an empty prediction has nothing to score: NaN, the empty-empty rule of
:mod:`medcl.train.metrics.dice`. It is never the best or the worst case (a background
slice "right by predicting nothing" would otherwise be the best of nearly every run) but
can be a seeded one. A class in the mask and not predicted (or the reverse) scores 0.

**The choice** (:func:`choose_cases`) depends only on the case ids, their Dice and
``seed``, never on the order the cases arrive in. Each case has a key,
``blake2b(seed, case id)``. Best: highest Dice (ties: smallest key); worst: lowest Dice
(ties: largest key), both among the scored cases; the other ``k - 2``: the scored cases
with the smallest keys, then unscored ones when too few. With a fixed seed (the stage
evaluation uses 0) every run on a test set shows the same seeded slices wherever they
are not its best or worst, so methods, fractions and seeds compare side by side.

**Memory** (:class:`PanelCases`): the current best and worst, the ``k`` scored and the
``k - 2`` unscored cases with the smallest keys: at most ``2k`` slices (image, mask,
prediction), whatever the size of the test set. :func:`choose_cases` over what it kept
is :func:`choose_cases` over every case.
"""
from __future__ import annotations

import bisect
import hashlib
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medcl.data.schema import IGNORE_INDEX
from medcl.train.figures._png import new_figure, save_png

__all__ = ["PanelCases", "choose_cases", "draw_panel", "segmentation_panel", "slice_dice"]

#: Pixel sizes of the panel: one cell per slice and row (image, ground truth, prediction),
#: a band for the row names on the left, the titles on top and the legend below.
CELL_PX, LABEL_PX, TITLE_PX, LEGEND_PX, DPI = 160, 20, 40, 30, 100
_ROWS = ("image", "ground truth", "prediction")
_ALPHA = 0.5
_ID_CHARS = 26

Key = tuple[int, str]


def _key(case_id: str, seed: int) -> Key:
    digest = hashlib.blake2b(f"{seed}\x00{case_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big"), case_id


def slice_dice(predictions: Any, masks: Any, num_classes: int, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """Dice of each slice: mean over the foreground classes present in its mask or its prediction.

    Args:
        predictions: Predicted labels. Shape: (N, H, W), ints in [0, K).
        masks: Reference labels. Shape: (N, H, W), ints in [0, K) or ``ignore_index``.
        num_classes: K, background included (>= 2).
        ignore_index: Reference value whose pixels are left out.

    Returns:
        ``(N,)`` float64; NaN for a slice with no foreground class in mask or prediction.

    Raises:
        ValueError: Shapes differ or are not (N, H, W), labels out of range, ``num_classes`` < 2.
    """
    p, t = np.asarray(predictions), np.asarray(masks)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2 (background + a class), got {num_classes!r}")
    if p.ndim != 3 or p.shape != t.shape:
        raise ValueError(f"predictions and masks must both have shape (N, H, W), got {p.shape} and {t.shape}")
    valid = t != ignore_index
    pv, tv = p[valid].astype(np.int64), t[valid].astype(np.int64)
    if pv.size and (pv.min() < 0 or pv.max() >= num_classes or tv.min() < 0 or tv.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}) (masks: or be ignore_index={ignore_index}), got "
                         f"predictions in [{pv.min()}, {pv.max()}] and masks in [{tv.min()}, {tv.max()}]")
    n, k = p.shape[0], num_classes
    rows = np.broadcast_to(np.arange(n, dtype=np.int64)[:, None, None] * k, p.shape)[valid]
    hit = pv == tv
    inter = np.bincount(rows[hit] + tv[hit], minlength=n * k).reshape(n, k)[:, 1:]
    total = (np.bincount(rows + pv, minlength=n * k) + np.bincount(rows + tv, minlength=n * k)).reshape(n, k)[:, 1:]
    present = total > 0
    per_class = np.divide(2.0 * inter, total, out=np.zeros(total.shape), where=present)
    count = present.sum(axis=1)
    return np.divide(per_class.sum(axis=1), count, out=np.full(n, np.nan), where=count > 0)


def _check_k(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise ValueError(f"k must be an int >= 2 (the best and the worst case at least), got {k!r}")
    return k


def _order(scores: np.ndarray, keys: Sequence[Key], k: int) -> tuple[list[int], list[str]]:
    """Indices of the chosen cases in display order (best, seeded by Dice, worst) and their roles."""
    n = len(keys)
    scored = [i for i in range(n) if math.isfinite(scores[i])]
    rank = sorted(scored, key=lambda i: (-scores[i], keys[i]))  # best first; the last is the worst
    ends = rank[:1] + rank[-1:] if len(rank) >= 2 else rank
    rest = sorted((i for i in range(n) if i not in ends), key=lambda i: (not math.isfinite(scores[i]), keys[i]))
    middle = sorted(rest[: k - len(ends)], key=lambda i: (not math.isfinite(scores[i]), -np.nan_to_num(scores[i]),
                                                           keys[i]))
    if not ends:
        return middle, ["" for _ in middle]
    if len(ends) == 1:
        return ends + middle, ["best"] + ["" for _ in middle]
    return [ends[0], *middle, ends[1]], ["best", *("" for _ in middle), "worst"]


def _ids(case_ids: Any, n: int) -> list[str]:
    ids = [str(c) for c in (case_ids.tolist() if isinstance(case_ids, np.ndarray) else case_ids)]
    if len(ids) != n:
        raise ValueError(f"case_ids must have one id per case ({n}), got {len(ids)}")
    if len(set(ids)) != n:
        seen: set[str] = set()
        dup = next(c for c in ids if c in seen or seen.add(c))
        raise ValueError(f"case_ids must be unique, got {dup!r} more than once")
    return ids


def choose_cases(scores: Any, case_ids: Any, k: int = 6, seed: int = 0) -> list[int]:
    """The ``k`` cases a panel shows, in display order: best, the seeded ones (by Dice), worst.

    See the module doc for the rule. Fewer than ``k`` cases: all of them.

    Args:
        scores: Dice of each case, NaN when unscored. Shape: (N,).
        case_ids: Unique id of each case. Shape: (N,).
        k: How many cases (>= 2).
        seed: Seed of the keys that pick the middle cases.

    Returns:
        Indices into ``scores``; the first is the best and the last the worst case when at least
        two cases are scored.

    Raises:
        ValueError: ``k`` < 2, lengths differ, or an id repeats.
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    ids = _ids(case_ids, s.size)
    return _order(s, [_key(c, seed) for c in ids], _check_k(k))[0]


def _class_name(class_names: Mapping[int, str] | Sequence[str] | None, c: int) -> str:
    if isinstance(class_names, Mapping):
        return str(class_names.get(c, f"class {c}"))
    if class_names is not None and c < len(class_names):
        return str(class_names[c])
    return f"class {c}"


def _grey(image: np.ndarray) -> np.ndarray:
    """The first channel of a (C, H, W) or (H, W) image scaled to [0, 1] (a constant image: 0)."""
    x = np.asarray(image, dtype=np.float32)
    x = x[0] if x.ndim == 3 else x
    lo, hi = float(np.min(x)), float(np.max(x))
    return (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)


def _overlay(labels: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """RGBA (H, W, 4): each foreground class in its colour at ``_ALPHA``; background and ignore pixels clear."""
    out = np.zeros((*labels.shape, 4), dtype=np.float32)
    fg = (labels > 0) & (labels < len(colours) + 1)
    out[fg, :3] = colours[labels[fg] - 1]
    out[fg, 3] = _ALPHA
    return out


def draw_panel(images: Any, masks: Any, predictions: Any, scores: Any, case_ids: Sequence[str], *,
               roles: Sequence[str] | None = None, num_classes: int | None = None,
               class_names: Mapping[int, str] | Sequence[str] | None = None) -> Any:
    """A figure with one column per case (all of them, in order): image, ground truth, prediction overlaid.

    Args:
        images: Shape: (M, C, H, W) (the first channel is shown, min-max scaled) or (M, H, W).
        masks: Reference labels. Shape: (M, H, W).
        predictions: Predicted labels. Shape: (M, H, W).
        scores: Dice of each case (NaN: nothing to score). Shape: (M,).
        case_ids: Case names for the titles. Shape: (M,).
        roles: ``"best"`` / ``"worst"`` / ``""`` per case, appended to its Dice.
        num_classes: K (default: the largest label + 1, at least 2); class ``c`` has colour ``tab10[c-1]``.
        class_names: Legend names, ``{index: name}`` or a list by index (default ``class c``).

    Returns:
        A ``matplotlib.figure.Figure`` of ``LABEL_PX + M * CELL_PX`` by ``TITLE_PX + 3 * CELL_PX + LEGEND_PX``
        pixels at ``DPI`` (980 x 550 for 6 cases).
    """
    from matplotlib import colormaps
    from matplotlib.patches import Patch

    masks, predictions = np.asarray(masks), np.asarray(predictions)
    m = len(case_ids)
    if m == 0 or not (len(images) == len(masks) == len(predictions) == len(scores) == m):
        raise ValueError(f"images, masks, predictions, scores and case_ids must have the same length > 0, got "
                         f"{len(images)}, {len(masks)}, {len(predictions)}, {len(scores)}, {m}")
    if num_classes is None:
        num_classes = max(2, int(max(masks.max(), predictions.max())) + 1)
    colours = np.array([colormaps["tab10"](i % 10)[:3] for i in range(num_classes - 1)], dtype=np.float32)
    width, height = LABEL_PX + m * CELL_PX, TITLE_PX + len(_ROWS) * CELL_PX + LEGEND_PX
    fig = new_figure(width / DPI, height / DPI, DPI)
    pad = 3
    for col in range(m):
        grey = _grey(images[col])
        for row, labels in enumerate((None, masks[col], predictions[col])):
            left = LABEL_PX + col * CELL_PX + pad
            bottom = LEGEND_PX + (len(_ROWS) - 1 - row) * CELL_PX + pad
            ax = fig.add_axes((left / width, bottom / height, (CELL_PX - 2 * pad) / width,
                               (CELL_PX - 2 * pad) / height))
            ax.imshow(grey, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
            if labels is not None:
                ax.imshow(_overlay(np.asarray(labels).astype(np.int64), colours), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if col == 0:
                ax.set_ylabel(_ROWS[row], fontsize=7, labelpad=2)
            if row == 0:
                score = float(scores[col])
                role = roles[col] if roles is not None else ""
                dice = f"Dice {score:.3f}" if math.isfinite(score) else "Dice n/a (empty)"
                name = str(case_ids[col])
                name = name if len(name) <= _ID_CHARS else "…" + name[-_ID_CHARS + 1:]
                ax.set_title(f"{name}\n{dice}{f' ({role})' if role else ''}", fontsize=7, pad=2)
    handles = [Patch(facecolor=(*colours[c - 1], _ALPHA), edgecolor="none", label=_class_name(class_names, c))
               for c in range(1, num_classes)]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 8), fontsize=7, frameon=False,
               handlelength=1.2, borderaxespad=0.2)
    return fig


def segmentation_panel(images: Any, masks: Any, predictions: Any, scores: Any, case_ids: Any,
                       path: str | os.PathLike[str], k: int = 6, seed: int = 0, *, num_classes: int | None = None,
                       class_names: Mapping[int, str] | Sequence[str] | None = None) -> Path:
    """Choose ``k`` cases (:func:`choose_cases`) and write their panel (:func:`draw_panel`) as a PNG, atomically.

    Args:
        images, masks, predictions: Every scored case. Shapes: (N, C, H, W) or (N, H, W); (N, H, W); (N, H, W).
        scores: Dice of each case (:func:`slice_dice`). Shape: (N,).
        case_ids: Unique id of each case. Shape: (N,).
        path: Output ``.png`` file.
        k, seed: See :func:`choose_cases`.
        num_classes, class_names: See :func:`draw_panel`.

    Returns:
        ``path`` (about 100-200 KB for 6 cases of 64 x 64).

    Raises:
        ValueError: Lengths differ, an id repeats, ``k`` < 2, or ``path`` is not a ``.png``.

    Example:
        >>> segmentation_panel(img, mask, pred, slice_dice(pred, mask, 3), ids, "panel.png")  # doctest: +SKIP
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    ids = _ids(case_ids, s.size)
    if not (len(images) == len(masks) == len(predictions) == s.size):
        raise ValueError(f"images, masks, predictions and scores must have the same length, got {len(images)}, "
                         f"{len(masks)}, {len(predictions)} and {s.size}")
    chosen, roles = _order(s, [_key(c, seed) for c in ids], _check_k(k))
    fig = draw_panel(np.asarray(images)[chosen], np.asarray(masks)[chosen], np.asarray(predictions)[chosen],
                     s[chosen], [ids[i] for i in chosen], roles=roles, num_classes=num_classes,
                     class_names=class_names)
    return save_png(fig, path)


@dataclass
class _Case:
    key: Key
    score: float
    image: np.ndarray
    mask: np.ndarray
    prediction: np.ndarray


def _offer(keys: list[Key], key: Key, cap: int) -> bool:
    """Insert ``key`` into the sorted ``keys`` kept to the ``cap`` smallest; whether it stays."""
    if cap <= 0:
        return False
    if key not in keys:
        bisect.insort(keys, key)
        del keys[cap:]
    return key in keys


class PanelCases:
    """The cases a panel needs, collected batch by batch while an evaluation streams (at most ``2k`` slices).

    Args:
        num_classes: K, background included.
        k: Cases in the panel (>= 2).
        seed: Seed of the choice (:func:`choose_cases`).
        ignore_index: Mask value left out of the Dice.

    Example:
        >>> cases = PanelCases(num_classes=3)
        >>> for batch in batches:  # doctest: +SKIP
        ...     cases.update(batch["image"], batch["mask"], pred, ids)
        >>> cases.panel("test_panel.png")  # doctest: +SKIP
    """

    def __init__(self, num_classes: int, k: int = 6, seed: int = 0, ignore_index: int = IGNORE_INDEX) -> None:
        self.num_classes, self.k, self.seed, self.ignore_index = num_classes, _check_k(k), seed, ignore_index
        self.seen = 0
        self._cases: dict[str, _Case] = {}
        self._scored: list[Key] = []  # the k smallest keys of scored cases
        self._unscored: list[Key] = []  # the k - 2 smallest keys of unscored ones
        self._best: tuple[float, Key] | None = None  # (-Dice, key): the smallest is the best
        self._worst: tuple[float, Key] | None = None  # the largest is the worst

    def update(self, images: Any, masks: Any, predictions: Any, case_ids: Any) -> np.ndarray:
        """Score a batch (:func:`slice_dice`) and keep copies of the slices that may be chosen.

        Args:
            images: Shape: (B, C, H, W) or (B, H, W). masks, predictions: Shape: (B, H, W).
            case_ids: Unique id of each slice. Shape: (B,).

        Returns:
            The batch's slice Dice ``(B,)``.
        """
        scores = slice_dice(predictions, masks, self.num_classes, self.ignore_index)
        ids = _ids(case_ids, scores.size)
        for i, case in enumerate(ids):
            key, score = _key(case, self.seed), float(scores[i])
            if math.isfinite(score):
                rank = (-score, key)
                keep = _offer(self._scored, key, self.k)
                if self._best is None or rank < self._best:
                    self._best, keep = rank, True
                if self._worst is None or rank > self._worst:
                    self._worst, keep = rank, True
            else:
                keep = _offer(self._unscored, key, self.k - 2)
            if keep:
                self._cases[case] = _Case(key, score, np.array(images[i]), np.array(masks[i]),
                                          np.array(predictions[i]))
        self.seen += len(ids)
        wanted = {key[1] for key in (*self._scored, *self._unscored)}
        wanted |= {rank[1][1] for rank in (self._best, self._worst) if rank is not None}
        for case in [c for c in self._cases if c not in wanted]:
            del self._cases[case]
        return scores

    def __len__(self) -> int:
        """Slices held now (at most ``2k``)."""
        return len(self._cases)

    def panel(self, path: str | os.PathLike[str],
              class_names: Mapping[int, str] | Sequence[str] | None = None) -> Path | None:
        """Write the panel of the chosen cases (:func:`segmentation_panel`); None when no case was seen."""
        if not self._cases:
            return None
        cases = list(self._cases.items())
        return segmentation_panel(np.stack([c.image for _, c in cases]), np.stack([c.mask for _, c in cases]),
                                  np.stack([c.prediction for _, c in cases]), [c.score for _, c in cases],
                                  [i for i, _ in cases], path, k=self.k, seed=self.seed,
                                  num_classes=self.num_classes, class_names=class_names)
