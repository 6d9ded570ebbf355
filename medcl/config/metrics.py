"""The metric names each stage kind logs, so that a ``metric:`` no stage logs is refused before Ray starts.

Every stage reports, every epoch, what :func:`medcl.train.loop.fit` adds
(:data:`PER_EPOCH`) plus the ``train/<log>`` entries of its loss; a
fine-tuning stage adds, after its last epoch, its evaluation on ``test`` (and
``shifted``, when the dataset has a shifted site): :data:`EVALUATION`.

Model selection (``val_every`` > 0, a dataset with validation patients): a
fine-tuning stage also reports its validation metrics :data:`VALIDATION_REPORTS`
(``val/dice_2d``; ``val/patient_auc`` and ``val/auc``) every ``val_every``
epochs and at the last one, keeps the weights of the epoch best by
:data:`VALIDATION` (the first of them) and, after the last epoch, reports that
epoch and its values (``best/epoch``, ``best/val/dice_2d``) and the whole test
evaluation of those weights under ``best/`` (``best/test/dice_2d``,
``best/shifted/dice_2d``): the last epoch's name, prefixed. Test and shifted
metrics (:func:`is_test_metric`) are for reporting, never for choosing
hyperparameters (``medcl.config.sweep`` refuses them).

Classification reports every metric twice: per image (``auc``) and per
patient (``patient_auc``: the mean of a patient's image probabilities scored
against its label, :func:`medcl.train.metrics.patient_metrics`). The labels
are per patient, so classification selects on ``val/patient_auc``; where
every patient has one image (MedMNIST) the two are equal.

The names are declared here because ``config`` sits below ``train`` (imports
point down); ``tests/config/test_logged_metrics.py`` runs every kind for one
epoch and checks that it logs exactly these names. ``{c}`` stands for a class
index (``test/dice_2d_class1``).
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["PER_EPOCH", "TRAIN_LOGS", "WEIGHT_CHANGE", "EVALUATION", "EVALUATION_PREFIXES", "StageMetrics", "stage_metrics",
           "is_evaluation_metric", "check_metric", "VALIDATION", "VALIDATION_REPORTS", "VALIDATION_PREFIX",
           "BEST_PREFIX", "validation_metric", "validation_metrics", "is_test_metric"]

#: Reported by every stage every epoch (``fit`` and ``_train_epoch`` of medcl/train/loop.py).
PER_EPOCH = ("epoch", "max_epochs", "train/loss", "train/steps", "train/skipped_steps", "train/epoch_time_s",
             "train/images_per_s", "train/lr")

#: Extra per-epoch ``train/<log>`` entries of a stage's loss: kind -> (setting, value, logs).
TRAIN_LOGS: dict[str, tuple[str, Any, tuple[str, ...]]] = {
    "local_pretrain": ("loss", "both", ("train/supervised_loss", "train/dense_loss")),
}

#: Parts whose relative weight change since the stage's start is logged every epoch (``train/weight_change/<part>``).
WEIGHT_CHANGE: dict[str, tuple[str, ...]] = {
    "global_pretrain": ("encoder",),
    "local_pretrain": ("encoder", "decoder"),
    "seg_finetune": ("encoder", "decoder"),
    "cls_pretrain": ("encoder",),
    "cls_finetune": ("encoder",),
}

#: Evaluation of a fine-tuning stage after its last epoch, without the ``test/`` / ``shifted/`` prefix
#: (medcl/train/metrics: ``DiceAccumulator.compute``, ``classification_metrics`` per image,
#: ``patient_metrics`` per patient).
EVALUATION: dict[str, tuple[str, ...]] = {
    "seg_finetune": ("dice_2d", "dice_2d_class{c}", "dice_3d_mean", "dice_3d_std", "dice_3d_num_volumes",
                     "dice_3d_class{c}_mean", "dice_3d_class{c}_std"),
    "cls_finetune": ("accuracy", "auc", "auc_class{c}", "patient_accuracy", "patient_auc", "patient_auc_class{c}"),
}

#: ``test`` always; ``shifted`` when the dataset has a ``test_shifted`` split.
EVALUATION_PREFIXES = ("test", "shifted")

#: What a fine-tuning kind reports of its validation evaluation, as ``val/<name>`` (and ``best/val/<name>``
#: for the best epoch): the cheap part of its evaluation. The first (:data:`VALIDATION`) picks the best epoch.
VALIDATION_REPORTS: dict[str, tuple[str, ...]] = {"seg_finetune": ("dice_2d",),
                                                  "cls_finetune": ("patient_auc", "auc")}

#: The validation metric of a fine-tuning kind (higher is better) that picks the best epoch, ``val/<name>``.
#: Classification: per patient (its labels are per patient; issue 15), not the per-image ``val/auc``.
VALIDATION: dict[str, str] = {kind: names[0] for kind, names in VALIDATION_REPORTS.items()}
VALIDATION_PREFIX = "val"

#: Prefix of what is reported for the best-validation epoch: ``best/epoch``, ``best/val/<name>`` and
#: ``best/<prefix>/<name>`` for every test (and shifted) metric of that epoch's weights.
BEST_PREFIX = "best"


@dataclass(frozen=True)
class StageMetrics:
    """What one stage logs: name patterns (``{c}``: a class index).

    Attributes:
        per_epoch: Reported every epoch (what ASHA can compare).
        final: Not reported every epoch: after the last epoch (and, for the validation
            metric of a stage with ``val_every`` > 1, every ``val_every`` epochs).
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


def _test_names(kind: str, best: str = "") -> tuple[str, ...]:
    return tuple(f"{best}{prefix}/{name}" for prefix in EVALUATION_PREFIXES for name in EVALUATION.get(kind, ()))


def _best_names(kind: str) -> tuple[str, ...]:
    return (f"{BEST_PREFIX}/epoch", *(f"{BEST_PREFIX}/{VALIDATION_PREFIX}/{name}" for name in VALIDATION_REPORTS[kind]))


def is_test_metric(name: str) -> bool:
    """Whether ``name`` is measured on a test split: ``test/...``, ``shifted/...`` or their ``best/`` forms."""
    return any(name.startswith(f"{best}{prefix}/") for best in ("", f"{BEST_PREFIX}/")
               for prefix in EVALUATION_PREFIXES)


def is_evaluation_metric(name: str) -> bool:
    """Whether some fine-tuning kind reports ``name`` after its last epoch (``test/dice_2d``, ``best/test/auc``)."""
    return any(_matches(pattern, name) for kind in EVALUATION
               for pattern in _test_names(kind) + _test_names(kind, f"{BEST_PREFIX}/") + _best_names(kind))


def validation_metric(cfg: Any) -> str | None:
    """``val/<name>`` that a stage with config ``cfg`` selects on, or None (not fine-tuning, or ``val_every: 0``)."""
    names = validation_metrics(cfg)
    return names[0] if names else None


def validation_metrics(cfg: Any) -> tuple[str, ...]:
    """Every ``val/<name>`` a stage with config ``cfg`` reports when it validates, the selection metric first.

    Empty when it never validates (not fine-tuning, or ``val_every: 0``).
    """
    if cfg.kind not in VALIDATION_REPORTS or getattr(cfg, "val_every", 0) <= 0:
        return ()
    return tuple(f"{VALIDATION_PREFIX}/{name}" for name in VALIDATION_REPORTS[cfg.kind])


def stage_metrics(cfg: Any) -> StageMetrics:
    """The metrics a stage with config ``cfg`` (a stage config: ``kind`` and its settings) logs."""
    per_epoch = PER_EPOCH + tuple(f"train/weight_change/{part}" for part in WEIGHT_CHANGE.get(cfg.kind, ()))
    if cfg.kind in TRAIN_LOGS:
        setting, value, logs = TRAIN_LOGS[cfg.kind]
        if getattr(cfg, setting) == value:
            per_epoch = per_epoch + logs
    final = _test_names(cfg.kind)
    val = validation_metrics(cfg)
    if val:  # val_every: 1 reports them every epoch (ASHA can compare them); > 1 not every epoch
        per_epoch, final = (per_epoch + val, final) if cfg.val_every == 1 else (per_epoch, val + final)
        final = final + _best_names(cfg.kind) + _test_names(cfg.kind, f"{BEST_PREFIX}/")
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
    validated = {f"{VALIDATION_PREFIX}/{name}" for names in VALIDATION_REPORTS.values() for name in names}
    selection = metric in validated or (metric.startswith(f"{BEST_PREFIX}/") and is_evaluation_metric(metric))
    if (is_evaluation_metric(metric) or selection) and cfg.kind not in VALIDATION:
        when = "when they validate" if metric.startswith(f"{VALIDATION_PREFIX}/") else "after their last epoch"
        return (f"{where}: {metric!r} is reported by fine-tuning stages {when}, but {ends} ends "
                f"with stage {stage!r} ({cfg.kind}); use a per-epoch metric such as train/loss")
    if selection and validation_metric(cfg) is None:
        return (f"{where}: {metric!r} needs validation, but stage {stage!r} ({cfg.kind}), which ends {ends}, sets "
                f"val_every: {cfg.val_every} (never validates); set val_every: 1")
    close = difflib.get_close_matches(metric, logged.per_epoch + logged.final, n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    logs = f"it logs every epoch: {', '.join(logged.per_epoch)}"
    tests = [name for name in logged.final if name.startswith("test/")]
    if tests:
        logs += f"; after its last epoch: {', '.join(tests)} (and shifted/... on a dataset with a shifted site)"
    return f"{where}: stage {stage!r} ({cfg.kind}), which ends {ends}, does not log {metric!r}{hint}; {logs}"
