"""Evaluation figures, as small PNGs a user looks at instead of reading numbers.

- :mod:`.panel`: test slices (image, ground truth, prediction overlaid) of a segmentation
  model, a fixed seeded choice that always holds the best and worst slice by Dice;
  :class:`PanelCases` collects that choice while an evaluation streams (``O(k)`` slices kept).
- :mod:`.roc`: ROC curves of a classifier (binary, multi-class one-vs-rest, multi-label per
  target), per image and, given patient ids, per patient; titled with the AUC values.

Plain functions over numpy arrays: the stage evaluation
(:mod:`medcl.train.evaluate`) and ``medcl predict --labels`` call the same code.
Matplotlib (Agg canvas, never pyplot) is imported only when a figure is drawn.

Example:
    >>> segmentation_panel(images, masks, preds, slice_dice(preds, masks, 3), ids, "panel.png")  # doctest: +SKIP
    >>> roc_figure(probs, labels, "roc.png", patient_ids=patients)  # doctest: +SKIP
"""
from __future__ import annotations

from medcl.train.figures.panel import PanelCases, choose_cases, draw_panel, segmentation_panel, slice_dice
from medcl.train.figures.roc import RocCurve, draw_roc, roc_curves, roc_figure, roc_points

__all__ = ["PanelCases", "RocCurve", "choose_cases", "draw_panel", "draw_roc", "roc_curves", "roc_figure",
           "roc_points", "segmentation_panel", "slice_dice"]
