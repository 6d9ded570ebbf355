"""Stage tags: which stage of a chain trial a Tune checkpoint belongs to, so that a restored trial resumes there.

Every Tune checkpoint of a sweep trial carries a tag file (``medcl_stage.json``:
stage index and name, epoch, whether the stage is complete, where its model is
when it ran on a ``TorchTrainer``, its last metrics). A trial that is restored
(``--resume``, or a retry after a failure) reads the tag of its latest
checkpoint (:func:`medcl.runner.trial.run_trial`): stages before the tagged one
are complete and skipped; a complete tagged stage hands its checkpoint to the
next stage as ``init_from``; an incomplete one resumes from that checkpoint
(which holds all of the stage's weights, so it needs no ``init_from``). Inside a
stage the loop only accepts checkpoints of its own stage index
(:class:`ChainStageContext`), so a stage never mistakes the previous stage's
final checkpoint — which ``tune.get_checkpoint()`` returns once it is
reported — for its own.

Example:
    >>> tag = read_tag(tune.get_checkpoint())  # doctest: +SKIP
    >>> tag["stage_index"], tag["complete"]  # doctest: +SKIP
    (1, False)
"""
from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Any, Iterator

from medcl.storage import atomic_path
from medcl.train.context import TuneTrialContext

__all__ = ["STAGE_TAG_FILE", "ChainStageContext", "numeric", "read_tag", "write_tag"]

STAGE_TAG_FILE = "medcl_stage.json"


def numeric(metrics: dict[str, Any]) -> dict[str, float]:
    """The finite real-number entries of a metrics dict (a Ray result also holds strings and flags), as floats."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)):
            out[k] = float(v)
    return out


def write_tag(directory: str | Path, tag: dict[str, Any]) -> None:
    """Write ``tag`` as the stage tag file of the checkpoint directory ``directory`` (atomically)."""
    with atomic_path(Path(directory) / STAGE_TAG_FILE) as tmp:
        tmp.write_text(json.dumps(tag, sort_keys=True))


def read_tag(checkpoint: Any) -> dict[str, Any] | None:
    """The stage tag of a ``tune.Checkpoint`` (read through its filesystem, no download), or None."""
    try:
        with checkpoint.filesystem.open_input_file(f"{checkpoint.path}/{STAGE_TAG_FILE}") as fh:
            return json.loads(fh.readall().decode())
    except (FileNotFoundError, OSError):
        return None


class ChainStageContext(TuneTrialContext):
    """``TuneTrialContext`` for stage ``stage_index`` of a chain: tags its checkpoints, accepts only its own.

    Its reports carry the metric ``stage_index`` as well.

    Args:
        datasets: Ray Datasets by name.
        stage_index: Position of the stage in the trial's chain.
        stage: Name of the stage.
        max_epochs: The stage's epochs (a checkpoint of the last one is tagged complete).
        use_gpu: Put the model on the trial's GPU.
    """

    def __init__(self, datasets: dict[str, Any], *, stage_index: int, stage: str, max_epochs: int,
                 use_gpu: bool = False) -> None:
        super().__init__(datasets, use_gpu=use_gpu)
        self.stage_index = stage_index
        self.stage = stage
        self.max_epochs = max_epochs

    def report(self, metrics: dict[str, float], checkpoint_dir: str | None = None) -> None:
        metrics = {**metrics, "stage_index": self.stage_index}
        if checkpoint_dir is not None:
            epoch = int(metrics["epoch"])
            write_tag(checkpoint_dir, {"stage_index": self.stage_index, "stage": self.stage, "epoch": epoch,
                                       "complete": epoch + 1 >= self.max_epochs, "model_dir": None,
                                       "metrics": numeric(metrics)})
        super().report(metrics, checkpoint_dir)

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        from ray import tune

        checkpoint = tune.get_checkpoint()
        tag = read_tag(checkpoint) if checkpoint is not None else None
        if tag is None or tag["stage_index"] != self.stage_index:
            yield None
            return
        with super().latest_checkpoint() as path:
            yield path
