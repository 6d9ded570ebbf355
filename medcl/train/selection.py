"""Model selection on the validation split: the best-validation epoch of a fine-tuning stage, and its test metrics.

A fine-tuning stage with ``val_every`` > 0 evaluates its validation metric
(:data:`medcl.config.metrics.VALIDATION`: pooled Dice ``val/dice_2d``,
patient-level AUC ``val/patient_auc``) on rank 0 every ``val_every`` epochs and
at the last epoch, reports it with the rest of
:data:`~medcl.config.metrics.VALIDATION_REPORTS` (the per-image ``val/auc``),
and keeps a CPU copy of the weights of the best epoch (the earliest, on ties).
After the last epoch it reports, next to the last epoch's ``test/*`` (and
``shifted/*``), the same evaluation of the best epoch's weights under
``best/`` (``best/test/dice_2d``), with ``best/epoch`` and that epoch's
validation values (``best/val/dice_2d``).

Checkpoints carry the selection (``selection.pt``: metric, epoch, value, the
best epoch's validation values, and the best weights unless they are the
checkpoint's own ``model.pt``), so a resumed run keeps its best-so-far. A
checkpoint without it (written with ``val_every: 0``) restarts the selection at
the resumed epoch, with a warning.
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from medcl.config.metrics import BEST_PREFIX, validation_metric, validation_metrics
from medcl.train.checkpoints import _atomic_torch_save  # temp name + os.replace, as for model.pt

if TYPE_CHECKING:
    from medcl.train.context import StageContext

logger = logging.getLogger(__name__)

__all__ = ["BestEpoch", "SELECTION_FILE"]

#: The selection state inside a checkpoint directory (loaded with ``weights_only=True``).
SELECTION_FILE = "selection.pt"

Metrics = dict[str, float]


def _cpu_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


class BestEpoch:
    """Rank 0's record of the best-validation epoch: its value, its epoch and a CPU copy of its weights.

    Args:
        validate: ``validate(model) -> metrics`` holding ``metric`` (the stage's evaluation of the val stream).
        metric: The validation metric, higher is better (``val/dice_2d``).
        every: Validate every that many epochs (``val_every`` >= 1), and always at the last one.
        max_epochs: The stage's epochs.
        also: Further names of ``validate``'s metrics to report with ``metric`` (``val/auc``).

    Example:
        >>> best = BestEpoch.for_stage(ctx, cfg, stage, inputs)  # doctest: +SKIP
        >>> if best.due(epoch): metrics.update(best.update(model, epoch))  # doctest: +SKIP
    """

    def __init__(self, validate: Callable[[nn.Module], Metrics], metric: str, every: int, max_epochs: int,
                 also: tuple[str, ...] = ()) -> None:
        if every < 1:
            raise ValueError(f"every (val_every) must be >= 1 to select a model, got {every}")
        self.validate, self.metric, self.every, self.max_epochs = validate, metric, every, max_epochs
        self.names = (metric, *(name for name in also if name != metric))
        self.epoch: int | None = None
        self.value: float | None = None
        self.values: Metrics = {}  # every reported validation value of the best epoch
        self.state: dict[str, torch.Tensor] | None = None

    @classmethod
    def for_stage(cls, ctx: StageContext, cfg: Any, stage: Any, inputs: Any) -> BestEpoch | None:
        """The selection of a stage run on this worker, or None: off rank 0, ``val_every: 0``, no ``"val"`` stream.

        ``stage`` is the kind's :class:`~medcl.train.stage.Stage`, ``inputs`` its
        :class:`~medcl.train.loop.StageInputs`. A dataset without validation slices
        (site A of split ``val``) skips the selection with a warning naming the dataset:
        the stage then reports what it did before (``test/*`` of the last epoch) and no
        ``val/*`` or ``best/*``.
        """
        metric = validation_metric(cfg)
        if metric is None or stage.evaluate is None or not ctx.is_rank_zero:
            return None
        if not ctx.has_dataset("val"):
            logger.warning("stage %s: dataset %s has no validation slices (split 'val', site A), so val_every=%d "
                           "selects nothing: %s and best/* are not reported, test/* is the last epoch's. Ingest "
                           "with a non-zero val split ratio, or set val_every: 0", cfg.kind, inputs.dataset_dir,
                           cfg.val_every, metric)
            return None
        prefix = metric.split("/", 1)[0]
        return cls(lambda model: stage.evaluate(model, ctx.dataset("val"), ctx.device, inputs, prefix), metric,
                   cfg.val_every, cfg.max_epochs, also=validation_metrics(cfg))

    def due(self, epoch: int) -> bool:
        """Whether epoch ``epoch`` (0-based) validates: every ``every`` epochs, and the last."""
        return (epoch + 1) % self.every == 0 or epoch == self.max_epochs - 1

    def update(self, model: nn.Module, epoch: int) -> Metrics:
        """Validate ``model`` (unwrapped) after epoch ``epoch``; keep its weights when it is the best so far.

        A NaN value (e.g. no foreground in the validation slices) never becomes the best.

        Returns:
            ``{metric: value}`` and the ``also`` values, for the epoch's report.
        """
        scores = self.validate(model)
        values = {name: float(scores[name]) for name in self.names}
        value = values[self.metric]
        if math.isfinite(value) and (self.value is None or value > self.value):
            self.epoch, self.value, self.values, self.state = epoch, value, values, _cpu_copy(model)
        return values

    def report(self, model: nn.Module, evaluate: Callable[[nn.Module], Metrics], last: Metrics,
               last_epoch: int) -> Metrics:
        """``best/epoch``, ``best/<metric>`` (and ``also``), ``best/<name>`` of every test metric of the best weights.

        Args:
            model: The unwrapped model holding the last epoch's weights (restored before returning).
            evaluate: The stage's test evaluation (``test/*``, ``shifted/*``).
            last: What ``evaluate`` gave for the last epoch's weights (reused when that epoch is the best).
            last_epoch: The last epoch (0-based).

        Returns:
            The ``best/`` metrics, or ``{}`` (with a warning) when no validation value was finite.
        """
        if self.epoch is None or self.state is None:
            logger.warning("no finite %s in any validated epoch: best/* is not reported", self.metric)
            return {}
        if self.epoch == last_epoch:
            tests = dict(last)  # the same weights
        else:
            current = _cpu_copy(model)
            model.load_state_dict(self.state)
            try:
                tests = evaluate(model)
            finally:
                model.load_state_dict(current)
        logger.info("best %s %.4f at epoch %d of %d", self.metric, self.value, self.epoch, self.max_epochs)
        values = {**self.values, self.metric: float(self.value)}
        return {f"{BEST_PREFIX}/epoch": float(self.epoch), **{f"{BEST_PREFIX}/{k}": v for k, v in values.items()},
                **{f"{BEST_PREFIX}/{k}": v for k, v in tests.items()}}

    def save(self, directory: str | os.PathLike, epoch: int) -> None:
        """Write ``selection.pt`` into a checkpoint directory of epoch ``epoch`` (before its ``meta.json``).

        The best weights are stored only when they are not the checkpoint's own ``model.pt``.
        """
        own = self.epoch == epoch
        data = {"metric": self.metric, "epoch": self.epoch, "value": self.value, "values": self.values,
                "state_dict": None if own or self.state is None else self.state}
        _atomic_torch_save(data, Path(directory) / SELECTION_FILE)

    def restore(self, directory: str | os.PathLike, epoch: int, model: nn.Module) -> None:
        """Take the best-so-far from a checkpoint of epoch ``epoch`` whose weights ``model`` now holds."""
        path = Path(directory) / SELECTION_FILE
        if not path.is_file():
            logger.warning("checkpoint %s has no %s (written with val_every: 0?): the best %s is chosen among "
                           "the epochs from %d on", directory, SELECTION_FILE, self.metric, epoch + 1)
            return
        data = torch.load(path, map_location="cpu", weights_only=True)
        if data["metric"] != self.metric or data["epoch"] is None:
            return
        state = data["state_dict"]
        if state is None and data["epoch"] == epoch:
            state = _cpu_copy(model)
        if state is None:  # not written by save(): never report weights we do not have
            logger.warning("%s of %s names best epoch %d without its weights; ignored", SELECTION_FILE, directory,
                           data["epoch"])
            return
        self.epoch, self.value, self.state = int(data["epoch"]), float(data["value"]), state
        # written before the also-values were kept: best/val/ then holds the selection metric only
        self.values = {str(k): float(v) for k, v in data.get("values", {}).items()}
