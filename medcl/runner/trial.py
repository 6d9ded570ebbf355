"""One trial runner for pipelines and sweeps: a chain of stages in a Ray Tune trial, inside its MLflow child run.

A trial runs a chain of one or more stages in order, each starting from the
previous stage's final checkpoint: a pipeline job is a chain of one stage whose
``init_from`` is its parent job's checkpoint (:mod:`medcl.runner.pipeline`); a
sweep trial is a method's chain or one stage (:mod:`medcl.runner.sweep`). Each
stage runs inline in the trial (one CPU worker, or a GPU fraction) or on a
``TorchTrainer`` (several workers: one Train run per trial and stage, which
resumes itself; the trial holds almost no resources, see
:func:`medcl.runner.tuner.trial_placement`).

Resume: sweep trials tag their checkpoints (:mod:`medcl.runner.stage_tags`) and
a restored trial continues at the stage its latest checkpoint names; after a
``TorchTrainer`` stage the trial reports a small tag-only checkpoint that points
at the stage's final Train checkpoint. Pipeline jobs are untagged
(``TrialPlan.stage_tags=False``): each job is a trial of its own, resumed by its
wave, and its Tune checkpoints and reports are exactly the stage loop's (inline), or
the ``TorchTrainer``'s reports and then that tag-only checkpoint, which the wave
hands on to the next jobs (:func:`handover_path`, :func:`parent_checkpoint`).
``TuneReportCallback`` forwards a Train checkpoint to Tune only as the metric
``checkpoint_path``, so without the tag-only checkpoint Tune would keep none.
Hand-overs are local paths or full URIs (:func:`medcl.storage.location`): Ray's
``Checkpoint.path`` alone drops the ``s3://`` of remote storage.

MLflow: the trial's child run (named after the job key or the trial id, found
again after a restore) gets the trial's parameters and, when it ends FINISHED,
the last stage's final metrics; an error ends it FAILED, an interruption KILLED
(:func:`medcl.tracking.child_run`). A chain of several stages also gets one run
per stage under the trial's run (per-epoch metrics), and the trial's run each
stage's final metrics as ``<stage>/<metric>``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from medcl.config.binder import to_dict
from medcl.config.stages import StageConfig
from medcl.runner.datasets import stage_streams
from medcl.runner.stage_tags import ChainStageContext, numeric, read_tag, write_tag
from medcl.storage import is_uri, location

if TYPE_CHECKING:
    from medcl.runner.plan import Job
    from medcl.runner.tuner import TrialPlacement
    from medcl.tracking import ChildRun, TrackingTarget

logger = logging.getLogger(__name__)

__all__ = ["TrialPlan", "TrialRun", "handover_path", "parent_checkpoint", "run_trial", "stage_params"]


@dataclass(frozen=True)
class TrialPlan:
    """What every trial of one pipeline or sweep needs besides its stages (shipped with ``tune.with_parameters``).

    Attributes:
        tracking: ``{"target": configure_tracking keyword arguments, "parent_run_id": the pipeline's or sweep's run}``.
        dataset_dir: The resolved dataset directory.
        train_storage: ``storage_path`` of the Train runs of stages run on a ``TorchTrainer``.
        train_name: Name of such a Train run, formatted with ``trial_id``, ``index`` and ``stage``.
        placement: Inline or on a ``TorchTrainer``, GPU, the trainer's scaling.
        streams: ``StreamSpec -> materialised dataset``, built in the driver (:func:`~medcl.runner.datasets.stage_streams`).
        stage_tags: Tag checkpoints with their stage and resume at the tagged stage (sweeps); False for
            pipeline jobs (see the module docstring).
    """

    tracking: dict[str, Any]
    dataset_dir: str
    train_storage: str
    train_name: str
    placement: TrialPlacement
    streams: dict[Any, Any]
    stage_tags: bool


@dataclass(frozen=True)
class TrialRun:
    """The MLflow child run of one trial, under the pipeline's or sweep's parent run.

    Attributes:
        name: Run name: the job key, or the Tune trial id.
        params: Parameters (nested dicts are flattened with dotted keys).
        tags: Tags of the trial's run.
        stage_run_tags: Tags of the per-stage runs of a chain of several stages.
    """

    name: str
    params: dict[str, Any]
    tags: dict[str, str]
    stage_run_tags: dict[str, str] = field(default_factory=dict)


def stage_params(cfg: StageConfig) -> dict[str, Any]:
    """MLflow parameters of a stage config (``init_from`` left out: it names a run's own directory)."""
    return {k: v for k, v in to_dict(cfg).items() if k != "init_from"}


def handover_path(checkpoint: Any) -> str | None:
    """Where the model a trial hands on is, given its final Tune checkpoint (``result.checkpoint``), or None.

    A tag-only checkpoint points at the stage's Train checkpoint; any other is the stage's own.

    Returns:
        A local path or a full URI (``s3://bucket/...``), or None for no checkpoint.
    """
    if checkpoint is None:
        return None
    tag = read_tag(checkpoint)
    return (tag or {}).get("model_dir") or location(checkpoint.filesystem, checkpoint.path)


def parent_checkpoint(job: Job, checkpoints: dict[str, str | None]) -> str | Path | None:
    """The checkpoint pipeline job ``job`` starts from: what its parent job handed over (None for a first stage).

    Args:
        job: The job.
        checkpoints: Job key -> :func:`handover_path` of the jobs that finished.

    Returns:
        A local ``Path``, a URI string (kept as text: a ``Path`` folds ``s3://`` to ``s3:/``), or None.

    Raises:
        RuntimeError: The parent job finished without a checkpoint, naming both jobs.
    """
    if job.parent is None:
        return None
    handed = checkpoints.get(job.parent)
    if handed is None:
        raise RuntimeError(f"job {job.key!r} cannot start: its parent job {job.parent!r} finished without a "
                           f"checkpoint to hand over (its Tune result has none)")
    return handed if is_uri(handed) else Path(handed)


def run_trial(plan: TrialPlan, stages: list[tuple[str, StageConfig]], run: TrialRun) -> None:
    """Run a trial's stages inside its MLflow child run (call from a Ray Tune function trainable).

    Args:
        plan: The pipeline's or sweep's :class:`TrialPlan`.
        stages: ``(stage name, resolved stage config)`` in order; the first one's ``init_from`` is kept.
        run: The trial's MLflow run.

    Raises:
        RuntimeError: An inline stage ended without its final (tagged) checkpoint.
    """
    from ray import tune

    from medcl import tracking as mlt

    trial_id = tune.get_context().get_trial_id()
    target = mlt.configure_tracking(**plan.tracking["target"])
    with mlt.child_run(target, plan.tracking["parent_run_id"], run.name, params=run.params,
                       tags=run.tags) as trial_run:
        trial_run.final_metrics = _run_chain(plan, stages, run, target, trial_run, trial_id)


def _run_chain(plan: TrialPlan, stages: list[tuple[str, StageConfig]], run: TrialRun, target: TrackingTarget,
               trial_run: ChildRun, trial_id: str) -> dict[str, float]:
    """Run the trial's stages in order, skipping those its latest checkpoint shows complete."""
    from ray import tune

    from medcl import tracking as mlt

    nested = len(stages) > 1
    first, handover, final = 0, None, {}
    latest = tune.get_checkpoint()
    tag = read_tag(latest) if latest is not None else None
    if tag is not None:
        if tag["complete"]:
            first, final = tag["stage_index"] + 1, tag["metrics"]
            handover = tag["model_dir"] or latest
            if nested:  # done when the stage ended, unless the trial died just after its last report
                _close_completed_stage(target, trial_run.run_id, f"{trial_id}/{tag['stage_index']}-{tag['stage']}",
                                       final)
                mlt.log_new_metrics(target, trial_run.run_id, {f"{tag['stage']}/{k}": v for k, v in final.items()})
        else:
            first = tag["stage_index"]  # resumes from its own checkpoint, which holds all its weights
        logger.info("trial %s: resuming at stage %d of %d", trial_id, first, len(stages))
    streams = stage_streams([(i, cfg) for i, (_, cfg) in enumerate(stages) if i >= first], plan.dataset_dir,
                            cache=dict(plan.streams))
    for index in range(first, len(stages)):
        name, cfg = stages[index]
        stage_run = (mlt.child_run(target, trial_run.run_id, f"{trial_id}/{index}-{name}",
                                   params={"stage": name, "kind": cfg.kind, "stage_index": index,
                                           "config": stage_params(cfg)},
                                   tags=run.stage_run_tags)
                     if nested else contextlib.nullcontext(trial_run))
        with stage_run as stage_log:
            with _local_dir(handover) as init_dir:
                if init_dir is not None:
                    cfg = dataclasses.replace(cfg, init_from=init_dir)
                    stage_log.set_tags({"medcl.init_from": str(init_dir)})
                run_tracking = {"tracking_uri": target.tracking_uri, "run_id": stage_log.run_id}
                final, handover = _run_stage(plan, index, name, cfg, streams[index], run_tracking,
                                             plan.train_name.format(trial_id=trial_id, index=index, stage=name))
            if nested:
                stage_log.final_metrics = final
        if nested:
            mlt.log_new_metrics(target, trial_run.run_id, {f"{name}/{k}": v for k, v in numeric(final).items()})
    return final


def _run_stage(plan: TrialPlan, index: int, name: str, cfg: StageConfig, streams: dict[str, Any],
               run_tracking: dict[str, str], train_name: str) -> tuple[dict[str, float], Any]:
    """Run one stage of the trial; returns its final metrics and its hand-over checkpoint."""
    from ray import tune

    placement = plan.placement
    if placement.inline:
        from medcl.train.driver import run_stage_inline

        ctx = (ChainStageContext(streams, stage_index=index, stage=name, max_epochs=cfg.max_epochs,
                                 use_gpu=placement.use_gpu) if plan.stage_tags else None)
        metrics = run_stage_inline(cfg, plan.dataset_dir, use_gpu=placement.use_gpu, tracking=run_tracking,
                                   streams=streams, context=ctx)
        if not plan.stage_tags:
            return metrics, None
        handover = tune.get_checkpoint()  # the last report of the loop: this stage's final checkpoint
        tag = read_tag(handover) if handover is not None else None
        if tag is None or tag["stage_index"] != index or not tag["complete"]:
            raise RuntimeError(f"stage {index} ({name}) ended without its final checkpoint (latest tag: {tag})")
        return metrics or tag["metrics"], handover
    from ray.tune.integration.ray_train import TuneReportCallback

    from medcl.train.driver import run_stage

    result = run_stage(cfg, plan.dataset_dir, scaling=placement.scaling, storage_path=plan.train_storage,
                       name=train_name, tracking=run_tracking, callbacks=[TuneReportCallback()], streams=streams)
    if result.checkpoint is None:
        raise RuntimeError(f"stage {index} ({name}) ended without a checkpoint (Train run {result.run_dir})")
    # TuneReportCallback forwards the Train checkpoint to Tune only as the metric ``checkpoint_path``: report a
    # tag-only checkpoint that points at it (``result.checkpoint``, a path or URI), for every trial.
    metrics = numeric(result.metrics)
    with tempfile.TemporaryDirectory(prefix="medcl-stage-") as tmp:
        write_tag(tmp, {"stage_index": index, "stage": name, "epoch": cfg.max_epochs - 1, "complete": True,
                        "model_dir": result.checkpoint, "metrics": metrics})
        # Pipeline jobs report the stage's metrics alone, as their inline runs do.
        tune.report({**metrics, "stage_index": index} if plan.stage_tags else metrics,
                    checkpoint=tune.Checkpoint.from_directory(tmp))
    return (metrics if plan.stage_tags else result.metrics), result.checkpoint


@contextlib.contextmanager
def _local_dir(source: Any) -> Iterator[str | Path | None]:
    """An ``init_from`` for a hand-over: None, a path or URI (Train checkpoint, kept) or a ``tune.Checkpoint``.

    A URI stays a string: the stage's workers, on any node, read it themselves (``load_model_weights``).
    """
    if source is None or isinstance(source, (str, Path)):
        yield None if source is None else source if is_uri(source) else Path(source)
        return
    with source.as_directory() as path:
        yield Path(path)


def _close_completed_stage(target: TrackingTarget, trial_run: str, name: str, metrics: dict[str, float]) -> None:
    """Finish the MLflow run of a stage whose final checkpoint exists but whose run was left open or KILLED."""
    from medcl import tracking as mlt

    runs = mlt.search_runs(target, parent_run_id=trial_run, filter=f"attributes.run_name = '{name}'")
    for run_id, status in zip(runs.get("run_id", []), runs.get("status", [])):
        if status != "FINISHED":
            mlt.finish_run(target, run_id, metrics=metrics, status="FINISHED")
