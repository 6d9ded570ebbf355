"""Run a pipeline: plan its stage jobs, run them wave by wave as Ray Tune trials, report.

Planning turns ``methods × label_fractions × seeds`` into a DAG of stage jobs
and shares prefixes: a global pretraining depends only on the seed, so one
run serves every fraction and every method that starts with it; a stage that
uses labels (supervised local pretraining, fine-tuning) is run per fraction.
Jobs of the same depth form a wave; a wave is one Ray Tune experiment whose
trials run a job each — inline in the trial for one CPU worker, or through a
``TorchTrainer`` for several workers or GPUs. Starting the same pipeline again
resumes: finished waves are read back, an unfinished wave is restored with
``Tuner.restore`` (no trial runs twice), and each job's MLflow child run is
found again by its job key.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medcl.config import StageConfig, to_dict
from medcl.pipeline_config import PipelineConfig, resolve_storage

logger = logging.getLogger(__name__)

__all__ = ["Job", "plan_jobs", "check_resumable", "run_pipeline", "PipelineResult"]

_PLAN_FILE = "plan.json"


@dataclass(frozen=True)
class Job:
    """One stage run of the pipeline.

    Attributes:
        key: Unique, deterministic id (``global>local@seed=0,fraction=0.05``), also the trial and MLflow run name.
        stage: Name of the stage template.
        config: The resolved stage config (seed, label fraction; ``init_from`` is set at run time).
        parent: Key of the job whose checkpoint this one starts from, or None.
        depth: Position in its chain (its wave).
        seed: Seed of the chain.
        label_fraction: Labelled fraction, when some stage of the chain so far uses labels.
        methods: Methods whose final stage this job is (reported in the label-efficiency curve).
    """

    key: str
    stage: str
    config: StageConfig
    parent: str | None
    depth: int
    seed: int
    label_fraction: float | None
    methods: tuple[str, ...] = ()


def _uses_labels(cfg: StageConfig) -> bool:
    if cfg.kind == "local_pretrain":
        return cfg.loss != "self_supervised"
    return hasattr(cfg, "label_fraction")


def plan_jobs(cfg: PipelineConfig) -> list[Job]:
    """All jobs of the pipeline, parents before children, shared prefixes run once."""
    jobs: dict[str, Job] = {}
    for method, chain in cfg.methods.items():
        for seed in cfg.seeds:
            for fraction in cfg.label_fractions:
                parent = None
                labelled = False
                names: list[str] = []
                for depth, stage in enumerate(chain):
                    template = cfg.stage(stage)
                    labelled = labelled or _uses_labels(template)
                    names.append(stage)
                    changes: dict[str, Any] = {"seed": seed}
                    if hasattr(template, "label_fraction"):
                        changes["label_fraction"] = fraction
                    stage_cfg = dataclasses.replace(template, **changes)
                    key = ">".join(names) + f"@seed={seed}" + (f",fraction={fraction:g}" if labelled else "")
                    is_final = depth == len(chain) - 1
                    if key not in jobs:
                        jobs[key] = Job(key=key, stage=stage, config=stage_cfg, parent=parent, depth=depth,
                                        seed=seed, label_fraction=fraction if labelled else None)
                    if is_final:
                        job = jobs[key]
                        jobs[key] = dataclasses.replace(job, methods=tuple(sorted({*job.methods, method})),
                                                        label_fraction=fraction)
                    parent = key
    return sorted(jobs.values(), key=lambda j: (j.depth, j.key))


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
           checkpoints: dict[str, str | None], tracking: dict[str, Any],
           streams: dict[str, dict[str, Any]]) -> None:
    """Ray Tune trial: run one job (inline or on a TorchTrainer), logging to its MLflow child run.

    Metrics and checkpoints reach Tune through the stage's per-epoch reports.
    """
    from ray import tune

    from medcl import tracking as mlt
    from medcl.train.driver import run_stage, run_stage_inline

    job = jobs[config["job"]]
    stage_cfg = job.config
    if job.parent is not None:
        stage_cfg = dataclasses.replace(stage_cfg, init_from=Path(checkpoints[job.parent]))
    target = mlt.configure_tracking(**tracking["target"])
    run_id = mlt.child_run_id(target, tracking["parent_run_id"], job.key, params=_job_params(pipeline, job),
                              tags={"medcl.role": "final" if job.methods else "pretrain",
                                    "medcl.method": ",".join(job.methods) or "none",
                                    "medcl.dataset": str(pipeline.dataset.path)})
    run_tracking = {"tracking_uri": target.tracking_uri, "run_id": run_id}
    scaling = pipeline.scaling
    try:
        if scaling.num_workers == 1 and not scaling.use_gpu:
            metrics = run_stage_inline(stage_cfg, pipeline.dataset.path, tracking=run_tracking,
                                       streams=streams[job.key])
        else:
            from ray.tune.integration.ray_train import TuneReportCallback

            train_storage = f"{resolve_storage(pipeline.storage_path)}/{pipeline.name}/train"
            result = run_stage(stage_cfg, pipeline.dataset.path, scaling=scaling, storage_path=train_storage,
                               name=tune.get_context().get_trial_id(), tracking=run_tracking,
                               callbacks=[TuneReportCallback()], streams=streams[job.key])
            metrics = result.metrics
        mlt.finish_run(target, run_id, metrics=metrics, status="FINISHED")
    except (KeyboardInterrupt, SystemExit):
        mlt.finish_run(target, run_id, metrics=None, status="KILLED")
        raise
    except BaseException:
        mlt.finish_run(target, run_id, metrics=None, status="FAILED")
        raise


def _trial_resources(cfg: PipelineConfig) -> dict[str, float]:
    scaling = cfg.scaling
    if scaling.num_workers == 1 and not scaling.use_gpu:
        return {"CPU": scaling.cpus_per_worker}
    # The trial only drives a TorchTrainer, whose workers hold the real resources.
    return {"CPU": 0.01}


def _run_wave(cfg: PipelineConfig, depth: int, wave: list[Job], jobs: dict[str, Job],
              checkpoints: dict[str, str | None], tracking: dict[str, Any], callbacks: list,
              streams: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One Tune experiment over the jobs of one depth; resumes a previous attempt of it."""
    from ray import tune

    streams = {job.key: streams[job.key] for job in wave}
    trainable = tune.with_resources(
        tune.with_parameters(_trial, pipeline=cfg, jobs=jobs, checkpoints=dict(checkpoints), tracking=tracking,
                             streams=streams),
        _trial_resources(cfg),
    )
    storage = f"{resolve_storage(cfg.storage_path)}/{cfg.name}"
    exp_dir = f"{storage}/wave{depth}"
    if tune.Tuner.can_restore(exp_dir):
        logger.info("resuming wave %d from %s", depth, exp_dir)
        tuner = tune.Tuner.restore(exp_dir, trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={"job": tune.grid_search([job.key for job in wave])},
            tune_config=tune.TuneConfig(max_concurrent_trials=cfg.max_concurrent_trials, reuse_actors=True,
                                        trial_dirname_creator=lambda trial: trial.trial_id),
            run_config=tune.RunConfig(name=f"wave{depth}", storage_path=storage, verbose=0,
                                      failure_config=tune.FailureConfig(max_failures=cfg.scaling.max_failures),
                                      callbacks=callbacks),
        )
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


def _plan_record(cfg: PipelineConfig, jobs: list[Job]) -> dict[str, Any]:
    """What a run of ``cfg`` under its name is: the dataset and every job's resolved config."""
    import json

    configs = {job.key: json.loads(json.dumps(to_dict(job.config), default=str)) for job in jobs}
    return {"dataset": str(Path(cfg.dataset.path).resolve()), "jobs": configs}


def check_resumable(cfg: PipelineConfig) -> bool:
    """Refuse to resume a pipeline run that was started with other jobs or configs.

    The waves of a run are restored by name, so running a changed pipeline (other
    methods, fractions, seeds or stage settings) under the same name would mix
    results of two configurations. The plan of the first run is kept in
    ``<storage_path>/<name>/plan.json``.

    Returns:
        True when a run of this pipeline exists (and will be resumed), False for a new one.

    Raises:
        ValueError: the stored plan differs; the message names what changed.
    """
    from medcl.storage_json import read_json

    root = f"{resolve_storage(cfg.storage_path)}/{cfg.name}"
    old = read_json(root, _PLAN_FILE)
    if old is None:
        return False
    new = _plan_record(cfg, plan_jobs(cfg))
    changes = []
    if old.get("dataset") != new["dataset"]:
        changes.append(f"dataset {old.get('dataset')} -> {new['dataset']}")
    old_jobs, new_jobs = old.get("jobs", {}), new["jobs"]
    added = sorted(set(new_jobs) - set(old_jobs))
    removed = sorted(set(old_jobs) - set(new_jobs))
    changed = sorted(k for k in set(new_jobs) & set(old_jobs) if new_jobs[k] != old_jobs[k])
    for what, keys in (("new jobs", added), ("jobs no longer planned", removed), ("jobs with other settings", changed)):
        if keys:
            more = f" (+{len(keys) - 3} more)" if len(keys) > 3 else ""
            changes.append(f"{what}: {', '.join(keys[:3])}{more}")
    if changes:
        raise ValueError(f"pipeline {cfg.name!r} was started at {root} with another plan ({'; '.join(changes)}); "
                         f"run the changed pipeline under a new name (--set name={cfg.name}-2), or delete {root} "
                         "to start over")
    return True


def _build_all_streams(cfg: PipelineConfig, jobs: list[Job]) -> dict[str, dict[str, Any]]:
    """Every job's datasets; each distinct stream is read and decoded once, all builds in parallel."""
    from medcl.data.ray_datasets import build_streams
    from medcl.train.driver import STAGES

    specs = {job.key: STAGES[job.config.kind].datasets(job.config, str(cfg.dataset.path)) for job in jobs}
    flat = {f"{key}\0{name}": spec for key, named in specs.items() for name, spec in named.items()}
    built = build_streams(flat)
    return {key: {name: built[f"{key}\0{name}"] for name in named} for key, named in specs.items()}


def prepare_dataset(cfg: PipelineConfig) -> Path:
    """Ingest the pipeline's dataset unless it is already there and up to date (a no-op then)."""
    if cfg.dataset.source == "existing":
        return cfg.dataset.path
    from medcl.data.ingest import ingest

    ingest(cfg.dataset.source, cfg.dataset.source_path, cfg.dataset.path, cfg.dataset.options)
    return cfg.dataset.path


def run_pipeline(cfg: PipelineConfig, *, config_text: str | None = None, callbacks: list | None = None,
                 report: bool = True) -> PipelineResult:
    """Run every job of ``cfg`` (Ray must be initialised), then write the label-efficiency report.

    Args:
        cfg: The validated pipeline.
        config_text: The pipeline file's text, logged as an artifact of the parent run.
        callbacks: Ray Tune callbacks (progress display).
        report: Write the curve and table at the end.
    """
    from medcl import tracking as mlt

    from medcl.storage_json import write_json

    resuming = check_resumable(cfg)
    run_root = f"{resolve_storage(cfg.storage_path)}/{cfg.name}"
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
    tracking = {"target": {"tracking_uri": target.tracking_uri, "experiment": cfg.tracking.experiment,
                           "workdir": str(Path(cfg.tracking.workdir).resolve())},
                "parent_run_id": parent}
    jobs = plan_jobs(cfg)
    write_json(run_root, _PLAN_FILE, _plan_record(cfg, jobs))
    by_key = {job.key: job for job in jobs}
    checkpoints: dict[str, str | None] = {}
    metrics: dict[str, dict[str, float]] = {}
    streams = _build_all_streams(cfg, jobs)
    for depth in sorted({job.depth for job in jobs}):
        wave = [job for job in jobs if job.depth == depth]
        logger.info("wave %d: %d job(s)", depth, len(wave))
        results = _run_wave(cfg, depth, wave, by_key, checkpoints, tracking, callbacks or [], streams)
        for key, result in results.items():
            checkpoints[key] = result.checkpoint.path if result.checkpoint is not None else None
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
