"""The metric names each stage kind logs, so that a ``metric:`` no stage logs is refused before Ray starts.

Every stage reports, every epoch, what :func:`medcl.train.loop.fit` adds
(:data:`PER_EPOCH`) plus the ``train/<log>`` entries of its loss; a
fine-tuning stage adds, after its last epoch, its evaluation on ``test`` (and
``shifted``, when the dataset has a shifted site): :data:`EVALUATION`. The
names are declared here because ``config`` sits below ``train`` (imports point
down); ``tests/config/test_metrics.py`` runs every kind for one epoch and
checks that it logs exactly these names. ``{c}`` stands for a class index
(``test/dice_2d_class1``).
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["PER_EPOCH", "TRAIN_LOGS", "EVALUATION", "EVALUATION_PREFIXES", "StageMetrics", "stage_metrics",
           "is_evaluation_metric", "check_metric"]

#: Reported by every stage every epoch (``fit`` and ``_train_epoch`` of medcl/train/loop.py).
PER_EPOCH = ("epoch", "max_epochs", "train/loss", "train/steps", "train/epoch_time_s", "train/images_per_s",
             "train/lr")

#: Extra per-epoch ``train/<log>`` entries of a stage's loss: kind -> (setting, value, logs).
TRAIN_LOGS: dict[str, tuple[str, Any, tuple[str, ...]]] = {
    "local_pretrain": ("loss", "both", ("train/supervised_loss", "train/dense_loss")),
}

#: Evaluation of a fine-tuning stage after its last epoch, without the ``test/`` / ``shifted/`` prefix
#: (medcl/train/metrics: ``DiceAccumulator.compute``, ``classification_metrics``).
EVALUATION: dict[str, tuple[str, ...]] = {
    "seg_finetune": ("dice_2d", "dice_2d_class{c}", "dice_3d_mean", "dice_3d_std", "dice_3d_num_volumes",
                     "dice_3d_class{c}_mean", "dice_3d_class{c}_std"),
    "cls_finetune": ("accuracy", "auc", "auc_class{c}"),
}

#: ``test`` always; ``shifted`` when the dataset has a ``test_shifted`` split.
EVALUATION_PREFIXES = ("test", "shifted")


@dataclass(frozen=True)
class StageMetrics:
    """What one stage logs: name patterns (``{c}``: a class index).

    Attributes:
        per_epoch: Reported every epoch (what ASHA can compare).
        final: Reported once, after the last epoch.
    """

    per_epoch: tuple[str, ...]
    final: tuple[str, ...]

    def when(self, name: str) -> Literal["per_epoch", "final"] | None:
        """When the stage reports ``name``: every epoch, after the last one, or never (None)."""
        if any(_matches(p, name) for p in self.per_epoch):
            return "per_epoch"
        if any(_matches(p, name) for p in self.final):
            return "final"
        return None


def _matches(pattern: str, name: str) -> bool:
    return re.fullmatch(re.escape(pattern).replace(re.escape("{c}"), r"\d+"), name) is not None


def is_evaluation_metric(name: str) -> bool:
    """Whether some fine-tuning kind reports ``name`` after its last epoch (``test/dice_2d``, ``test/auc``)."""
    return any(_matches(f"{prefix}/{pattern}", name) for patterns in EVALUATION.values() for pattern in patterns
               for prefix in EVALUATION_PREFIXES)


def stage_metrics(cfg: Any) -> StageMetrics:
    """The metrics a stage with config ``cfg`` (a stage config: ``kind`` and its settings) logs."""
    per_epoch = PER_EPOCH
    if cfg.kind in TRAIN_LOGS:
        setting, value, logs = TRAIN_LOGS[cfg.kind]
        if getattr(cfg, setting) == value:
            per_epoch = per_epoch + logs
    final = tuple(f"{prefix}/{name}" for prefix in EVALUATION_PREFIXES for name in EVALUATION.get(cfg.kind, ()))
    return StageMetrics(per_epoch=per_epoch, final=final)


def check_metric(metric: str, stage: str, cfg: Any, ends: str, *, where: str = "metric") -> str | None:
    """Why ``metric`` is not logged by ``stage`` (the last stage of a method or sweep), or None when it is.

    Args:
        metric: The metric name.
        stage: The stage's name in the pipeline.
        cfg: Its typed config.
        ends: What the stage ends, for the message (``"method 'random'"``, ``"this sweep"``).
        where: Key path of the metric in the file.
    """
    logged = stage_metrics(cfg)
    if logged.when(metric) is not None:
        return None
    if is_evaluation_metric(metric) and not logged.final:
        return (f"{where}: {metric!r} is reported by fine-tuning stages after their last epoch, but {ends} ends "
                f"with stage {stage!r} ({cfg.kind}); use a per-epoch metric such as train/loss")
    close = difflib.get_close_matches(metric, logged.per_epoch + logged.final, n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    logs = f"it logs every epoch: {', '.join(logged.per_epoch)}"
    tests = [name for name in logged.final if name.startswith("test/")]
    if tests:
        logs += f"; after its last epoch: {', '.join(tests)} (and shifted/... on a dataset with a shifted site)"
    return f"{where}: stage {stage!r} ({cfg.kind}), which ends {ends}, does not log {metric!r}{hint}; {logs}"
