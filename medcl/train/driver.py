"""Run one training stage: build its Ray Datasets, run its loop on Ray Train, hand back a checkpoint.

``run_stage`` is the single entry point the CLI, the pipeline runner and the
tests use. With ``ScalingSpec(num_workers=N)`` it runs a ``TorchTrainer``
(gloo on CPU, NCCL on GPU); ``run_stage_inline`` runs the same loop in the
calling process of a Ray Tune trial (one CPU worker, no worker-group start-up).
"""
from __future__ import annotations

import functools
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from medcl.config.stages import ScalingSpec, StageConfig, stage_config_from_dict
from medcl.config.binder import to_dict
from medcl.data.streams import build_streams
from medcl.storage import location, resolve_storage
from medcl.train.loop import NonFiniteLossError, StageInputs, run_loop, steps_per_epoch
from medcl.train.run_record import stage_run_name, write_stage_record
from medcl.train.stages import STAGES

if TYPE_CHECKING:
    from medcl.train.context import StageContext, TuneTrialContext

logger = logging.getLogger(__name__)

__all__ = ["STAGES", "StageResult", "run_loop", "run_stage", "run_stage_inline", "stage_inputs",
           "train_loop_per_worker"]

_CLASSIFICATION = ("cls_pretrain", "cls_finetune")
# A worker's return value that stands for a NonFiniteLossError: returned, not raised, because Ray Train
# restarts the worker group on every worker error (FailureConfig.max_failures) and this one would recur.
_NON_FINITE = "medcl_non_finite_loss"


@dataclass(frozen=True)
class StageResult:
    """What a finished stage hands on.

    Attributes:
        checkpoint: Directory of the last checkpoint (``model.pt`` + ``meta.json``), for the next stage's
            ``init_from``: a local path, or a full URI (``s3://bucket/...``) when the run is stored remotely.
        metrics: The last epoch's metrics, with evaluation metrics when the stage evaluates.
        run_dir: Where Ray keeps the run (for resume), a local path or a URI.
    """

    checkpoint: str | None
    metrics: dict[str, float]
    run_dir: str


def stage_inputs(cfg: StageConfig, dataset_dir: str | Path, streams: dict[str, Any], world_size: int,
                 *, amp: bool = False, tracking: dict | None = None) -> StageInputs:
    """Derive the loop's inputs from the manifest and the size of the training stream."""
    from medcl.data.manifest import read_manifest

    manifest = read_manifest(dataset_dir)
    in_channels = int(manifest.image_shape[0])
    if cfg.kind in _CLASSIFICATION:
        num_classes = max(1, len(manifest.class_names or []))
        multilabel = manifest.task == "multilabel"
    else:
        num_classes = max(2, len(manifest.label_map or {}))
        multilabel = False
    rows = streams["train"].count()
    steps = steps_per_epoch(rows, cfg.batch_size_per_worker, world_size, cfg.min_steps_per_epoch,
                            cfg.max_steps_per_epoch)
    return StageInputs(dataset_dir=str(dataset_dir), in_channels=in_channels, num_classes=num_classes,
                       multilabel=multilabel, steps_per_epoch=steps, amp=amp, tracking=tracking)


def _loop_config(cfg: StageConfig, inputs: StageInputs) -> dict[str, Any]:
    return {"stage": to_dict(cfg), "inputs": asdict(inputs)}


def train_loop_per_worker(loop_config: dict[str, Any],
                          context: Callable[[], StageContext] | None = None) -> dict[str, float]:
    """``TorchTrainer`` entry: rebuild the typed config and run the stage's loop on this worker.

    ``context`` builds the worker's :class:`StageContext` (default ``RayTrainContext``).
    """
    from medcl.train.context import RayTrainContext

    cfg = stage_config_from_dict(loop_config["stage"])
    inputs = StageInputs(**loop_config["inputs"])
    try:
        return run_loop((context or RayTrainContext)(), cfg, inputs)
    except NonFiniteLossError as exc:  # every rank stops at the same step (the check is all-reduced)
        return {_NON_FINITE: str(exc)}


def run_stage(cfg: StageConfig, dataset_dir: str | Path, *, scaling: ScalingSpec = ScalingSpec(),
              storage_path: str | Path, name: str | None = None, tracking: dict | None = None,
              callbacks: list | None = None, streams: dict[str, Any] | None = None,
              worker_context: Callable[[], StageContext] | None = None) -> StageResult:
    """Run one stage on a ``TorchTrainer`` with ``scaling.num_workers`` workers.

    Starting again with the same ``storage_path`` and ``name`` resumes the run
    from its latest checkpoint; a worker failure restarts the group from the
    latest checkpoint up to ``scaling.max_failures`` times, a non-finite loss
    (deterministic) does not restart it. ``name`` defaults to one derived from
    the settings (:func:`~medcl.train.run_record.stage_run_name`); the run keeps
    its settings in ``stage.json`` once its datasets are built. ``streams``: the
    stage's datasets when the caller built them already (``build_streams``).
    ``worker_context``: builds each worker's :class:`StageContext` instead of
    ``RayTrainContext`` (a subclass of it, e.g. one that injects a failure); it
    is pickled to the workers, so define it where cloudpickle copies it by value.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    dataset_dir = str(Path(dataset_dir).resolve())
    if streams is None:  # a stage run on its own opens the dataset: check its files once (a pipeline did already)
        from medcl.data.manifest import verify_checksums

        verify_checksums(dataset_dir)
        streams = build_streams(STAGES[cfg.kind].datasets(cfg, dataset_dir))
    amp = scaling.use_gpu
    inputs = stage_inputs(cfg, dataset_dir, streams, scaling.num_workers, amp=amp, tracking=tracking)
    name = name or stage_run_name(cfg, dataset_dir)
    write_stage_record(cfg, dataset_dir, storage_path, name)
    resources = {"CPU": scaling.cpus_per_worker}
    if scaling.use_gpu:
        resources["GPU"] = 1
    loop = train_loop_per_worker
    if worker_context is not None:
        loop = functools.partial(train_loop_per_worker, context=worker_context)
    trainer = TorchTrainer(
        loop,
        train_loop_config=_loop_config(cfg, inputs),
        scaling_config=ray.train.ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=resolve_storage(storage_path),
            failure_config=ray.train.FailureConfig(max_failures=scaling.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=callbacks,
        ),
        datasets=streams,
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )
    result = trainer.fit()
    if isinstance(result.return_value, dict) and _NON_FINITE in result.return_value:
        raise NonFiniteLossError(f"Train run {name}: {result.return_value[_NON_FINITE]}")
    metrics = dict(result.return_value or result.metrics or {})
    checkpoint = result.checkpoint
    checkpoint = location(checkpoint.filesystem, checkpoint.path) if checkpoint is not None else None
    return StageResult(checkpoint=checkpoint, metrics=metrics, run_dir=location(result.filesystem, result.path))


def run_stage_inline(cfg: StageConfig, dataset_dir: str | Path, *, use_gpu: bool = False,
                     tracking: dict | None = None, streams: dict[str, Any] | None = None,
                     context: TuneTrialContext | None = None) -> dict[str, float]:
    """Run one stage in this process, inside a Ray Tune function trainable.

    Reports and checkpoints go through ``ray.tune``; a restarted or restored
    trial resumes from its latest checkpoint. Returns the last metrics.
    ``context``: the caller's own ``TuneTrialContext`` (subclass) over ``streams``
    instead of a plain one.
    """
    from medcl.train.context import TuneTrialContext

    dataset_dir = str(Path(dataset_dir).resolve())
    if streams is None:
        streams = build_streams(STAGES[cfg.kind].datasets(cfg, dataset_dir))
    inputs = stage_inputs(cfg, dataset_dir, streams, 1, amp=use_gpu, tracking=tracking)
    ctx = context if context is not None else TuneTrialContext(streams, use_gpu=use_gpu)
    return run_loop(ctx, cfg, inputs)
