"""Run a pipeline: plan its stage jobs, run them wave by wave as Ray Tune trials, report.

Jobs of the same depth (:func:`~medcl.runner.plan.plan_jobs`) form a wave; a
wave is a sweep over job keys: one Tune experiment (``<storage_path>/<name>/wave<depth>``)
whose trials each run one job as a one-stage chain (:func:`~medcl.runner.trial.run_trial`)
that starts from its parent job's checkpoint. Starting the same pipeline again
resumes: finished waves are read back, an unfinished wave is restored with
``Tuner.restore`` (no trial runs twice), and each job's MLflow child run is
found again by its job key.

Example:
    >>> result = run_pipeline(load_pipeline("pipelines/quickstart.yaml"))  # doctest: +SKIP
    >>> result.table  # label efficiency per method and fraction  # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medcl.config.pipeline import PipelineConfig
from medcl.runner.plan import PLAN_FILE, Job, check_resumable, plan_jobs, plan_record, run_root

if TYPE_CHECKING:
    from medcl.runner.trial import TrialPlan

logger = logging.getLogger(__name__)

__all__ = ["PipelineResult", "run_pipeline"]


@dataclass(frozen=True)
class PipelineResult:
    """Outcome of a pipeline run."""

    parent_run_id: str
    tracking_uri: str
    checkpoints: dict[str, str | None]
    metrics: dict[str, dict[str, float]]
    table: Any = None
    csv_path: str | None = None
    png_path: str | None = None


def _job_params(cfg: PipelineConfig, job: Job) -> dict[str, Any]:
    from medcl.config.binder import to_dict

    stage = to_dict(job.config)
    params = {
        "job": job.key,
        "stage": job.stage,
        "kind": job.config.kind,
        "seed": job.seed,
        "label_fraction": job.label_fraction if job.label_fraction is not None else "none",
        "method": ",".join(job.methods) if job.methods else "none",
        "dataset": str(cfg.dataset.path),
        "num_workers": cfg.scaling.num_workers,
        "use_gpu": cfg.scaling.use_gpu,
    }
    params.update({f"config.{k}": v for k, v in stage.items() if k != "model"})
    params.update({f"config.model.{k}": v for k, v in stage.get("model", {}).items()})
    return params


def _trial(config: dict[str, Any], pipeline: PipelineConfig, jobs: dict[str, Job],
           checkpoints: dict[str, str | None], plan: TrialPlan) -> None:
    """Ray Tune trainable of a wave: run the job ``config["job"]``, logging to its MLflow child run.

    Its name (``_trial``) is stored in the wave's Tune experiment: ``Tuner.restore`` needs the same.
    """
    from medcl.runner.trial import TrialRun, run_trial

    job = jobs[config["job"]]
    stage_cfg = job.config
    if job.parent is not None:
        stage_cfg = dataclasses.replace(stage_cfg, init_from=Path(checkpoints[job.parent]))
    run = TrialRun(job.key, params=_job_params(pipeline, job),
                   tags={"medcl.role": "final" if job.methods else "pretrain",
                         "medcl.method": ",".join(job.methods) or "none",
                         "medcl.dataset": str(pipeline.dataset.path)})
    run_trial(plan, [(job.stage, stage_cfg)], run)


def _run_wave(cfg: PipelineConfig, depth: int, wave: list[Job], jobs: dict[str, Job],
              checkpoints: dict[str, str | None], plan: TrialPlan, callbacks: list) -> dict[str, Any]:
    """One Tune experiment over the jobs of one depth; resumes a previous attempt of it."""
    from ray import tune

    from medcl.runner.tuner import open_tuner

    trainable = tune.with_resources(
        tune.with_parameters(_trial, pipeline=cfg, jobs=jobs, checkpoints=dict(checkpoints), plan=plan),
        plan.placement.resources,
    )
    storage = run_root(cfg.storage_path, cfg.name)
    if tune.Tuner.can_restore(f"{storage}/wave{depth}"):
        logger.info("resuming wave %d from %s", depth, f"{storage}/wave{depth}")
    # A restored wave calls the callbacks Tune pickled at its first start (restore_callbacks=False).
    tuner = open_tuner(trainable, storage, f"wave{depth}", param_space={"job": tune.grid_search([j.key for j in wave])},
                       tune_options={"max_concurrent_trials": cfg.max_concurrent_trials}, callbacks=callbacks,
                       max_failures=cfg.scaling.max_failures, restore_callbacks=False)
    grid = tuner.fit()
    out: dict[str, Any] = {}
    errors = []
    for result in grid:
        key = result.config["job"]
        if result.error is not None:
            errors.append(f"{key}: {result.error}")
            continue
        out[key] = result
    if errors:
        raise RuntimeError(f"{len(errors)} job(s) of wave {depth} failed (re-run the same command to resume):\n  "
                           + "\n  ".join(errors))
    return out


def run_pipeline(cfg: PipelineConfig, *, config_text: str | None = None, callbacks: list | None = None,
                 report: bool = True) -> PipelineResult:
    """Run every job of ``cfg`` (Ray must be initialised), then write the label-efficiency report.

    Args:
        cfg: The validated pipeline.
        config_text: The pipeline file's text, logged as an artifact of the parent run.
        callbacks: Ray Tune callbacks (progress display).
        report: Write the curve and table at the end.

    Raises:
        ValueError: A run of this name was started with another plan (:func:`~medcl.runner.plan.check_resumable`).
        RuntimeError: Jobs of a wave failed (re-running the same pipeline resumes).
    """
    from medcl import tracking as mlt
    from medcl.runner.datasets import prepare_dataset, stage_streams
    from medcl.runner.trial import TrialPlan, handover_path
    from medcl.runner.tuner import trial_placement
    from medcl.storage import write_json

    resuming = check_resumable(cfg)
    root = run_root(cfg.storage_path, cfg.name)
    dataset_dir = prepare_dataset(cfg)
    cfg = dataclasses.replace(cfg, dataset=dataclasses.replace(cfg.dataset, path=Path(dataset_dir).resolve()))
    target = mlt.configure_tracking(tracking_uri=cfg.tracking.tracking_uri, experiment=cfg.tracking.experiment,
                                    workdir=cfg.tracking.workdir)
    parent = mlt.parent_run_id(target, cfg.name, params={"pipeline": cfg.name, "metric": cfg.metric,
                                                          "label_fractions": cfg.label_fractions,
                                                          "seeds": cfg.seeds, "methods": list(cfg.methods)},
                               tags={"medcl.role": "pipeline", "medcl.dataset": str(cfg.dataset.path)},
                               reopen_finished=resuming)
    if config_text is not None:
        mlt.log_text(target, parent, config_text, "pipeline.yaml")
    jobs = plan_jobs(cfg)
    write_json(root, PLAN_FILE, plan_record(cfg, jobs))
    by_key = {job.key: job for job in jobs}
    checkpoints: dict[str, str | None] = {}
    metrics: dict[str, dict[str, float]] = {}
    streams: dict[Any, Any] = {}
    stage_streams([(job.key, job.config) for job in jobs], str(cfg.dataset.path), cache=streams)
    scaling = cfg.scaling
    plan = TrialPlan(
        tracking={"target": {"tracking_uri": target.tracking_uri, "experiment": cfg.tracking.experiment,
                             "workdir": str(Path(cfg.tracking.workdir).resolve())},
                  "parent_run_id": parent},
        dataset_dir=str(cfg.dataset.path), train_storage=f"{root}/train", train_name="{trial_id}",
        placement=trial_placement(scaling, cpu=scaling.cpus_per_worker, gpu=1.0 if scaling.use_gpu else 0.0,
                                  fractional_gpu=False),
        streams=streams, stage_tags=False)
    for depth in sorted({job.depth for job in jobs}):
        wave = [job for job in jobs if job.depth == depth]
        logger.info("wave %d: %d job(s)", depth, len(wave))
        results = _run_wave(cfg, depth, wave, by_key, checkpoints, plan, callbacks or [])
        for key, result in results.items():
            checkpoints[key] = handover_path(result.checkpoint)
            metrics[key] = dict(result.metrics or {})
    out = PipelineResult(parent_run_id=parent, tracking_uri=target.tracking_uri, checkpoints=checkpoints, metrics=metrics)
    if report:
        from medcl.report import write_report

        # The report is written locally (then logged to MLflow) even when storage is remote.
        report_dir = Path("medcl_reports" if "://" in cfg.storage_path else cfg.storage_path).resolve() / cfg.name
        csv_path, png_path, table = write_report(target, parent, cfg.metric, report_dir,
                                                 filter="tags.`medcl.role` = 'final'")
        out = dataclasses.replace(out, table=table, csv_path=str(csv_path), png_path=str(png_path))
    mlt.end_parent_run(target, parent)
    return out
