"""Run a pipeline: plan its stage jobs, run them wave by wave as Ray Tune trials, report.

Jobs of the same depth (:func:`~medcl.runner.plan.plan_jobs`) form a wave; a
wave is a sweep over job keys: one Tune experiment (``<storage_path>/<name>/wave<depth>``)
whose trials each run one job as a one-stage chain (:func:`~medcl.runner.trial.run_trial`)
that starts from its parent job's checkpoint. Starting the same pipeline again
resumes: finished waves are read back, an unfinished wave is restored with
``Tuner.restore`` (no trial runs twice), and each job's MLflow child run is
found again by its job key. Starting it with more jobs (``--methods`` with a
method added, more seeds or fractions) extends it: the new jobs run as waves of
their own (``wave<depth>-ext<k>``, :func:`~medcl.runner.plan.job_groups`) after
the old ones are read back, under the same parent run, into the same curve.
After each wave ``<storage_path>/<name>/checkpoints.json`` maps every finished job
to its checkpoint, and each job's MLflow run carries it as tag ``medcl.checkpoint``.

Example:
    >>> result = run_pipeline(load_pipeline("pipelines/quickstart.yaml"))  # doctest: +SKIP
    >>> result.table  # label efficiency per method and fraction  # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from medcl.config.pipeline import PipelineConfig
from medcl.runner.failures import describe_error
from medcl.runner.plan import PLAN_FILE, Job, check_resumable, job_groups, plan_jobs, plan_record, run_root

if TYPE_CHECKING:
    from medcl.runner.failures import ParentRunGuard
    from medcl.runner.trial import TrialPlan

logger = logging.getLogger(__name__)

__all__ = ["PipelineResult", "run_pipeline", "jobs_left", "CHECKPOINTS_FILE", "CHECKPOINT_TAG"]

CHECKPOINTS_FILE = "checkpoints.json"  # <storage_path>/<name>/checkpoints.json: job key -> checkpoint
CHECKPOINT_TAG = "medcl.checkpoint"    # on each job's MLflow run: its checkpoint


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
    from medcl.runner.failures import no_retry
    from medcl.runner.trial import TrialRun, parent_checkpoint, run_trial

    job = jobs[config["job"]]
    stage_cfg = job.config
    if job.parent is not None:
        stage_cfg = dataclasses.replace(stage_cfg, init_from=parent_checkpoint(job, checkpoints))
    run = TrialRun(job.key, params=_job_params(pipeline, job),
                   tags={"medcl.role": "final" if job.methods else "pretrain",
                         "medcl.method": ",".join(job.methods) or "none",
                         "medcl.dataset": str(pipeline.dataset.path)})
    with no_retry(f"job {job.key}"):  # a NaN loss ends the trial with a report, not an error Tune retries
        run_trial(plan, [(job.stage, stage_cfg)], run)


def _run_wave(cfg: PipelineConfig, depth: int, wave: list[Job], jobs: dict[str, Job],
              checkpoints: dict[str, str | None], plan: TrialPlan, callbacks: list,
              experiment_name: str | None = None) -> dict[str, Any]:
    """One Tune experiment (``experiment_name``, default ``wave<depth>``) over jobs of one depth; resumes it.

    Returns only when every job of the wave finished: Ctrl-C parks the running jobs at their next
    checkpoint (:mod:`medcl.runner.interrupt`) and raises; nothing unfinished is handed on.

    Raises:
        RunInterrupted: The wave was interrupted; its unfinished jobs resume from their latest checkpoints.
        RuntimeError: Jobs of the wave failed.
    """
    from ray import tune

    from medcl.runner.interrupt import RunInterrupted, stop_at_next_checkpoint
    from medcl.runner.ray_shims import forget_pending_decisions
    from medcl.runner.tuner import open_tuner

    trainable = tune.with_resources(
        tune.with_parameters(_trial, pipeline=cfg, jobs=jobs, checkpoints=dict(checkpoints), plan=plan),
        plan.placement.resources,
    )
    storage = run_root(cfg.storage_path, cfg.name)
    name = experiment_name or f"wave{depth}"
    experiment = f"{storage}/{name}"
    if tune.Tuner.can_restore(experiment):
        logger.info("resuming %s from %s", name, experiment)
        forget_pending_decisions(experiment)
    with stop_at_next_checkpoint() as drain:
        # Each job keeps its latest checkpoint only: the one it hands on (and resumes from).
        tuner = open_tuner(trainable, storage, name,
                           param_space={"job": tune.grid_search([j.key for j in wave])},
                           tune_options={"max_concurrent_trials": cfg.max_concurrent_trials},
                           callbacks=[*callbacks, drain.callback], max_failures=cfg.scaling.max_failures,
                           keep_checkpoints=1, scheduler=drain.scheduler)
        grid = tuner.fit()
    # Tune returns normally when interrupted: the state it saved says which trials ended.
    status = {trial.config["job"]: trial.status for trial in tune.ExperimentAnalysis(experiment).trials}
    out: dict[str, Any] = {}
    errors = []
    for result in grid:
        key = result.config["job"]
        if result.error is not None:
            errors.append(f"{key}: {describe_error(result.error)}")
        elif status.get(key) == "TERMINATED":
            out[key] = result
    unfinished = sorted(job.key for job in wave if job.key not in out and status.get(job.key) != "ERROR")
    if unfinished and (drain.requested or not errors):
        more = f" (+{len(unfinished) - 3} more)" if len(unfinished) > 3 else ""
        message = (f"pipeline {cfg.name!r} interrupted in wave {depth}: {len(unfinished)} job(s) not finished "
                   f"({', '.join(unfinished[:3])}{more}); run the same command again to finish them from their "
                   "latest checkpoints")
        logger.warning("%s", message)
        raise RunInterrupted(message)
    if errors:
        raise RuntimeError(f"{len(errors)} job(s) of wave {depth} failed (re-run the same command to resume):\n  "
                           + "\n  ".join(errors))
    return out


def jobs_left(cfg: PipelineConfig) -> int:
    """How many planned jobs have not finished: the plan less those ``checkpoints.json`` lists (progress totals)."""
    from medcl.storage import read_json

    finished = read_json(run_root(cfg.storage_path, cfg.name), CHECKPOINTS_FILE) or {}
    return sum(job.key not in finished for job in plan_jobs(cfg))


def _record_checkpoints(target: Any, parent: str, root: str, checkpoints: dict[str, str | None],
                        finished: list[str]) -> None:
    """Write ``<root>/checkpoints.json`` (job key -> checkpoint) and tag the ``finished`` jobs' MLflow runs with theirs.

    Written after every wave, so an interrupted run lists what it has; the tag
    (``medcl.checkpoint``) leads from a run in the MLflow UI to its weights.
    """
    from medcl import tracking as mlt
    from medcl.storage import write_json

    write_json(root, CHECKPOINTS_FILE, {key: path for key, path in sorted(checkpoints.items())})
    children = mlt.search_runs(target, parent_run_id=parent)
    run_ids = dict(zip(children["run_name"], children["run_id"])) if len(children) else {}
    for key in finished:
        if checkpoints.get(key) and key in run_ids:
            mlt.RunLogger(target, run_ids[key]).set_tags({CHECKPOINT_TAG: checkpoints[key]})


class _BackgroundHook:
    """Runs ``after_wave`` calls one at a time in a background thread, so that a wave's hook (logging its
    MLflow models, ~1-5 s a job on the driver) overlaps the next wave's training.

    :meth:`submit` first waits for the previous call (calls stay in wave order, one in flight) and
    re-raises its error; leaving the ``with`` block waits for the last call, re-raising its error
    unless the block itself is raising (then the call still finishes: finished waves keep their models).
    """

    def __init__(self, hook: Callable[..., Any] | None) -> None:
        self._hook, self._pending, self._pool = hook, None, None

    def __enter__(self) -> _BackgroundHook:
        if self._hook is not None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="medcl-after-wave")
        return self

    def submit(self, *args: Any) -> None:
        if self._pool is None:
            return
        self._wait()
        self._pending = self._pool.submit(self._hook, *args)

    def _wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self._pool is None:
            return
        try:
            if exc_type is None:
                self._wait()
        finally:
            self._pool.shutdown(wait=True)


def run_pipeline(cfg: PipelineConfig, *, config_text: str | None = None, callbacks: list | None = None,
                 report: bool = True, after_wave: Callable[..., Any] | None = None) -> PipelineResult:
    """Run every job of ``cfg`` (Ray must be initialised), then write the label-efficiency report.

    One run per name at a time (:func:`~medcl.runner.lock.run_lock`). The plan is recorded
    (``plan.json``) and the MLflow parent run started only once every job's datasets are built, so a
    run that fails at start-up binds its name to nothing; a run that fails later ends its parent run
    FAILED (KILLED when interrupted).

    Args:
        cfg: The validated pipeline.
        config_text: The pipeline file's text, logged as an artifact of the parent run.
        callbacks: Ray Tune callbacks (progress display).
        report: Write the curve and table at the end.
        after_wave: Called on the driver after each wave's checkpoints are recorded, with ``(target,
            parent_run_id, checkpoints, finished job keys, dataset_dir)``, in a background thread while the
            next wave trains (one call at a time, in wave order; the last one finishes before the report);
            ``medcl run`` logs the fine-tuned models to MLflow with it
            (:func:`medcl.model_logging.log_job_models`).

    Raises:
        ValueError: A run of this name was started with another plan (:func:`~medcl.runner.plan.check_resumable`).
        RuntimeError: Jobs of a wave failed (re-running the same pipeline resumes; a job whose loss became
            NaN is not retried); :class:`~medcl.runner.lock.RunLockedError`: a run of this name is running.
    """
    from medcl.runner.failures import ParentRunGuard
    from medcl.runner.lock import run_lock

    with run_lock(run_root(cfg.storage_path, cfg.name), f"pipeline {cfg.name!r}"), ParentRunGuard() as guard:
        return _run_pipeline(cfg, config_text=config_text, callbacks=callbacks, report=report, guard=guard,
                             after_wave=after_wave)


def _run_pipeline(cfg: PipelineConfig, *, config_text: str | None, callbacks: list | None, report: bool,
                  guard: ParentRunGuard, after_wave: Callable[..., Any] | None = None) -> PipelineResult:
    """:func:`run_pipeline` under the run's lock; ``guard`` ends the parent run when this raises."""
    from medcl import tracking as mlt
    from medcl.runner.datasets import prepare_dataset, stage_streams
    from medcl.runner.disk import check_pipeline_disk
    from medcl.runner.failures import raise_terminal_errors
    from medcl.runner.trial import TrialPlan, handover_path, parent_checkpoint
    from medcl.runner.tuner import trial_placement
    from medcl.storage import read_json, write_json

    resuming = check_resumable(cfg)
    root = run_root(cfg.storage_path, cfg.name)
    stored_plan = read_json(root, PLAN_FILE) if resuming else None
    dataset_dir = prepare_dataset(cfg)
    cfg = dataclasses.replace(cfg, dataset=dataclasses.replace(cfg.dataset, path=Path(dataset_dir).resolve()))
    target = mlt.configure_tracking(tracking_uri=cfg.tracking.tracking_uri, experiment=cfg.tracking.experiment,
                                    workdir=cfg.tracking.workdir)
    jobs = plan_jobs(cfg)
    check_pipeline_disk(cfg, jobs)  # logs the checkpoints' size; refuses a run that would not fit on disk
    streams: dict[Any, Any] = {}  # built first: a job whose data cannot be read fails before anything is recorded
    stage_streams([(job.key, job.config) for job in jobs], str(cfg.dataset.path), cache=streams)
    groups = job_groups(stored_plan, jobs)
    grid = {"label_fractions": cfg.label_fractions, "seeds": cfg.seeds, "methods": list(cfg.methods)}
    # MLflow params cannot change: an extended run keeps its first start's grid params, and the
    # tags say what it holds now.
    params = {"pipeline": cfg.name, "metric": cfg.metric, **({} if len(groups) > 1 else grid)}
    parent = mlt.parent_run_id(target, cfg.name, params=params,
                               tags={"medcl.role": "pipeline", "medcl.dataset": str(cfg.dataset.path),
                                     **{f"medcl.{k}": ",".join(map(str, v)) for k, v in grid.items()}},
                               reopen_finished=resuming)
    guard.watch(lambda status: mlt.end_parent_run(target, parent, status=status))
    if config_text is not None:
        mlt.log_text(target, parent, config_text, "pipeline.yaml")
    write_json(root, PLAN_FILE, plan_record(cfg, jobs, groups))
    by_key = {job.key: job for job in jobs}
    checkpoints: dict[str, str | None] = {}
    metrics: dict[str, dict[str, float]] = {}
    scaling = cfg.scaling
    plan = TrialPlan(
        tracking={"target": {"tracking_uri": target.tracking_uri, "experiment": cfg.tracking.experiment,
                             "workdir": str(Path(cfg.tracking.workdir).resolve())},
                  "parent_run_id": parent},
        dataset_dir=str(cfg.dataset.path), train_storage=f"{root}/train", train_name="{trial_id}",
        placement=trial_placement(scaling, cpu=scaling.cpus_per_worker, gpu=1.0 if scaling.use_gpu else 0.0,
                                  fractional_gpu=False),
        streams=streams, stage_tags=False)
    with _BackgroundHook(after_wave) as hook:  # a wave's hook runs while the next wave trains
        for depth in sorted({job.depth for job in jobs}):
            for index, group in enumerate(groups):  # the first start's jobs, then each extension's
                wave = [by_key[key] for key in group if by_key[key].depth == depth]
                if not wave:
                    continue
                for job in wave:
                    parent_checkpoint(job, checkpoints)  # a parent without a checkpoint stops the run here, naming it
                name = f"wave{depth}" if index == 0 else f"wave{depth}-ext{index}"
                logger.info("%s: %d job(s)", name, len(wave))
                results = _run_wave(cfg, depth, wave, by_key, checkpoints, plan, callbacks or [],
                                    experiment_name=name)
                raise_terminal_errors(depth, results)
                for key, result in results.items():
                    checkpoints[key] = handover_path(result.checkpoint)
                    metrics[key] = dict(result.metrics or {})
                _record_checkpoints(target, parent, root, checkpoints, list(results))
                hook.submit(target, parent, dict(checkpoints), list(results), str(cfg.dataset.path))
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
