"""How much disk a pipeline run's checkpoints take, checked against the free space of its storage before it starts.

A checkpoint (:mod:`medcl.train.checkpoints`) holds the trained network's
float32 state (``model.pt``) and AdamW's two moment estimates per trainable
parameter (``optimizer.pt``), so one checkpoint of a stage is about::

    4 bytes x (state numel + 2 x trainable numel)      (~ parameters x 4 x 3)

and a run keeps, per job, its latest checkpoint (pipeline waves:
``CheckpointConfig(num_to_keep=1)``) or, for stages on a ``TorchTrainer``, the
Train run's latest two. While a job writes its next checkpoint the previous one
still exists, so each job running at once adds one more::

    total = sum over jobs (kept x checkpoint) + max_concurrent_trials x largest checkpoint

Bytes already under the run's directory (a resumed run) count as written. The
dataset is ingested before the check and is not counted. Remote storage
(``s3://...``) is not checked. ``MEDCL_SKIP_DISK_CHECK=1`` turns the refusal
into a warning.

Example:
    >>> estimate = estimate_pipeline_disk(cfg, plan_jobs(cfg))  # the quickstart  # doctest: +SKIP
    >>> estimate.describe()  # doctest: +SKIP
    'checkpoints: ~40.0 MB for 26 jobs (1 kept per job, 1.0 MB-1.5 MB each + 2 in flight); 66.2 GB free at ...'
"""
from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from medcl.runner.plan import Job, run_root
from medcl.storage import is_uri

if TYPE_CHECKING:
    from medcl.config.pipeline import PipelineConfig
    from medcl.config.stages import StageConfig

logger = logging.getLogger(__name__)

__all__ = ["DiskEstimate", "DiskSpaceError", "SKIP_ENV", "check_pipeline_disk", "checkpoint_bytes",
           "estimate_pipeline_disk", "format_bytes", "refuse_if_short"]

SKIP_ENV = "MEDCL_SKIP_DISK_CHECK"
#: Checkpoints a pipeline job keeps: Tune's (the stage loop's own, inline) or Ray Train's (on a TorchTrainer).
KEPT_INLINE, KEPT_TRAINER = 1, 2


class DiskSpaceError(RuntimeError):
    """A run's checkpoints would not fit on its storage's disk."""


@dataclass(frozen=True)
class DiskEstimate:
    """What a run's checkpoints will take and what its storage has.

    Attributes:
        storage: The run's directory (``<storage_path>/<name>``) or URI.
        per_checkpoint: Bytes of one checkpoint, per job key.
        kept: Checkpoints each job keeps.
        in_flight: Jobs that may write their next checkpoint at the same time.
        existing: Bytes already under ``storage`` (a resumed run).
        free: Free bytes on the disk of ``storage``; None for remote storage.
    """

    storage: str
    per_checkpoint: dict[str, int]
    kept: int
    in_flight: int
    existing: int
    free: int | None

    @property
    def total(self) -> int:
        """Bytes of checkpoints the whole run keeps, plus those being written at once."""
        largest = max(self.per_checkpoint.values(), default=0)
        return self.kept * sum(self.per_checkpoint.values()) + self.in_flight * largest

    @property
    def needed(self) -> int:
        """Bytes still to be written (``total`` less what is already there)."""
        return max(0, self.total - self.existing)

    @property
    def fits(self) -> bool:
        return self.free is None or self.needed <= self.free

    def describe(self) -> str:
        sizes = sorted(set(self.per_checkpoint.values()))
        each = format_bytes(sizes[0]) if len(sizes) == 1 else f"{format_bytes(sizes[0])}-{format_bytes(sizes[-1])}"
        text = (f"checkpoints: ~{format_bytes(self.total)} for {len(self.per_checkpoint)} jobs ({self.kept} kept per "
                f"job, {each} each + {self.in_flight} in flight)")
        if self.existing:
            text += f", {format_bytes(self.existing)} already written, {format_bytes(self.needed)} to go"
        if self.free is None:
            return text + f"; remote storage {self.storage}: free space not checked"
        return text + f"; {format_bytes(self.free)} free at {self.storage}"


def format_bytes(n: float) -> str:
    """``1234567`` -> ``'1.2 MB'`` (powers of 1000)."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def checkpoint_bytes(cfg: StageConfig, in_channels: int, num_classes: int, multilabel: bool = False) -> int:
    """Bytes of one checkpoint of stage ``cfg``: its trained network's state, AdamW's two moments and,
    for a stage that validates, the best-validation weights.

    The network is built on PyTorch's ``meta`` device (shapes only, no memory); pretrained
    weights named in ``cfg.model`` are not read.

    Args:
        cfg: A stage config.
        in_channels: Image channels C.
        num_classes: Mask classes (segmentation) or target classes (classification).
        multilabel: Classification targets are multi-hot.
    """
    import torch

    from medcl.config.metrics import validation_metric
    from medcl.train.loop import StageInputs
    from medcl.train.stages import STAGES

    if getattr(cfg.model, "weights_path", None) is not None:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, weights_path=None))
    stage = STAGES[cfg.kind]
    inputs = StageInputs(dataset_dir="", in_channels=in_channels, num_classes=num_classes, multilabel=multilabel,
                         steps_per_epoch=1)
    with torch.device("meta"):
        net = stage.trainable(stage.build(cfg, inputs), cfg)
    state = sum(t.numel() * t.element_size() for t in net.state_dict().values())
    moments = sum(2 * p.numel() * p.element_size() for p in net.parameters() if p.requires_grad)
    best = state if validation_metric(cfg) is not None else 0  # selection.pt: the best-validation weights
    return state + moments + best


class _OneRow:
    """Stands in for a training stream where only the dataset's channels and classes matter."""

    def count(self) -> int:
        return 1


def estimate_pipeline_disk(cfg: PipelineConfig, jobs: list[Job]) -> DiskEstimate:
    """What the checkpoints of ``jobs`` take (module docstring), against the free space of the run's storage.

    Args:
        cfg: The pipeline, its dataset ingested (``cfg.dataset.path`` has a manifest).
        jobs: Its jobs (:func:`~medcl.runner.plan.plan_jobs`).
    """
    from medcl.config.binder import to_dict
    from medcl.runner.tuner import trial_placement
    from medcl.train.driver import stage_inputs

    sizes: dict[str, int] = {}
    per_job: dict[str, int] = {}
    for job in jobs:
        inputs = stage_inputs(job.config, str(cfg.dataset.path), {"train": _OneRow()}, 1)
        key = repr((job.config.kind, to_dict(job.config.model), getattr(job.config, "protocol", None),
                    inputs.in_channels, inputs.num_classes))
        if key not in sizes:
            sizes[key] = checkpoint_bytes(job.config, inputs.in_channels, inputs.num_classes, inputs.multilabel)
        per_job[job.key] = sizes[key]
    inline = trial_placement(cfg.scaling, cpu=cfg.scaling.cpus_per_worker, gpu=1.0 if cfg.scaling.use_gpu else 0.0,
                             fractional_gpu=False).inline
    storage = run_root(cfg.storage_path, cfg.name)
    remote = is_uri(storage)
    return DiskEstimate(storage=storage, per_checkpoint=per_job, kept=KEPT_INLINE if inline else KEPT_TRAINER,
                        in_flight=min(cfg.max_concurrent_trials, len(jobs)),
                        existing=0 if remote else _tree_bytes(Path(storage)),
                        free=None if remote else shutil.disk_usage(_existing_parent(Path(storage))).free)


def check_pipeline_disk(cfg: PipelineConfig, jobs: list[Job]) -> DiskEstimate:
    """Log the run's disk estimate (:func:`estimate_pipeline_disk`) and refuse it when it does not fit.

    Raises:
        DiskSpaceError: See :func:`refuse_if_short`.
    """
    estimate = estimate_pipeline_disk(cfg, jobs)
    logger.info("disk: %s", estimate.describe())
    refuse_if_short(estimate, f"pipeline {cfg.name!r}")
    return estimate


def refuse_if_short(estimate: DiskEstimate, what: str) -> None:
    """Raise when the checkpoints still to write exceed the free space (warn instead with ``MEDCL_SKIP_DISK_CHECK=1``).

    Args:
        estimate: The run's estimate.
        what: The run, for the message (``pipeline 'quickstart'``).

    Raises:
        DiskSpaceError: Naming the estimate, the free space and what to do.
    """
    if estimate.fits:
        return
    message = (f"{what} would not fit on disk: {estimate.describe()}. Free some space or put storage_path on a "
               f"larger disk (--set storage_path=...); {SKIP_ENV}=1 runs it anyway")
    if os.environ.get(SKIP_ENV, "").strip().lower() in ("1", "true", "yes"):
        logger.warning("%s (%s is set: running anyway)", message, SKIP_ENV)
        return
    raise DiskSpaceError(message)


def _existing_parent(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _tree_bytes(path: Path) -> int:
    """Bytes of the files under ``path`` (0 when it does not exist)."""
    total = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:  # removed while walking (Tune dropping an old checkpoint)
                pass
    return total
