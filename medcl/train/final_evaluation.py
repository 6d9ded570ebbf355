"""The test evaluation after a stage's last epoch, and its figures logged to the stage's MLflow run (rank 0).

:func:`final_evaluation` builds what :func:`medcl.train.loop.fit` calls after the last
epoch: the stage's evaluation of ``"test"`` (prefix ``test``) and, when the dataset has
a shifted site, ``"test_shifted"`` (prefix ``shifted``). Given a run logger (rank 0 of a
tracked run) and a stage that draws a figure (:attr:`medcl.train.stage.Stage.figure`),
each evaluation also draws its figure, from the same pass over the stream, into a
temporary directory and logs it to the run under ``figures/``:

* segmentation fine-tuning: ``figures/test_panel.png`` (and ``figures/shifted_panel.png``),
  6 test slices with the best and worst by Dice (:func:`medcl.train.figures.segmentation_panel`);
* classification fine-tuning: ``figures/roc_test.png`` (and ``figures/roc_shifted.png``),
  per image and per patient (:func:`medcl.train.figures.roc_figure`).

``figures/`` shows the weights of the run's result: the last epoch's, which are its
checkpoint and its ``test/*``. With model selection (``val_every`` > 0), when the best
validation epoch is not the last, the evaluation of the best epoch's weights
(``best/test/*``) logs its figures under ``figures/best/``; when it is the last, the
two are the same weights and ``figures/`` serves both.

A figure that cannot be logged (e.g. an artifact store the worker cannot reach) is a
warning: the metrics of the run are not lost to it.
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from torch import nn

    from medcl.train.context import StageContext

__all__ = ["FIGURES", "BEST_FIGURES", "final_evaluation"]

logger = logging.getLogger(__name__)

#: Artifact folder of the last epoch's figures, and of the best validation epoch's.
FIGURES = "figures"
BEST_FIGURES = "figures/best"

#: Evaluation streams and the prefix of their metrics and figures.
_STREAMS = (("test", "test"), ("test_shifted", "shifted"))


def final_evaluation(stage: Any, ctx: StageContext, inputs: Any, run_logger: Any = None,
                     artifact_path: str = FIGURES) -> Callable[[nn.Module], dict[str, float]]:
    """``evaluate(model) -> metrics`` over the test streams, logging the stage's figures under ``artifact_path``.

    Args:
        stage: The stage kind's :class:`~medcl.train.stage.Stage` (its ``evaluate`` is not None).
        ctx: Where the loop runs; evaluation streams come from ``ctx.dataset``.
        inputs: The loop's :class:`~medcl.train.loop.StageInputs`.
        run_logger: Rank 0's :class:`~medcl.tracking.RunLogger`, or None: no figure is drawn.
        artifact_path: The run's artifact folder of the figures.
    """
    draw = run_logger is not None and stage.figure is not None

    def evaluate(model: nn.Module) -> dict[str, float]:
        metrics: dict[str, float] = {}
        with tempfile.TemporaryDirectory(prefix="medcl-figures-") as tmp:
            for name, prefix in _STREAMS:
                if name != "test" and not ctx.has_dataset(name):
                    continue
                figure = Path(tmp) / stage.figure.format(prefix=prefix) if draw else None
                metrics.update(stage.evaluate(model, ctx.dataset(name), ctx.device, inputs, prefix, figure=figure))
                if figure is not None and figure.is_file():
                    _log(run_logger, figure, artifact_path)
        return metrics

    return evaluate


def _log(run_logger: Any, path: Path, artifact_path: str) -> None:
    try:
        run_logger.log_artifact(path, artifact_path)
    except Exception:  # a figure is a view of the metrics: never lose the run to it
        logger.warning("could not log %s to MLflow run %s under %s", path.name, getattr(run_logger, "run_id", "?"),
                       artifact_path, exc_info=True)
