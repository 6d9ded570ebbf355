"""Run pipelines and sweeps on Ray Tune: one trial runner for both, waves, resume, resources, progress.

Modules (top-down):
    pipeline: ``run_pipeline`` — a pipeline's jobs wave by wave (a wave is a sweep over job keys), the report.
    sweep: ``run_sweep`` — trials over a search space; ``sweep_summary``: what ``medcl sweep`` prints.
    plan: a pipeline's jobs, the record of a run's plan, the check before resuming one.
    trial: the one trial runner — a chain of stages, inline or on a ``TorchTrainer``, in its MLflow run.
    stage_tags: which stage a checkpoint of a chain trial belongs to (resume stage by stage).
    tuner: where a trial runs and what it reserves; the one restore-or-new ``Tuner``; trial states.
    datasets: the dataset directory (ingested once) and the Ray Datasets of a set of stages, built once.
    interrupt: Ctrl-C during a wave (each running job parks at its next checkpoint; RunInterrupted -> exit 130).
    disk: checkpoint bytes per job and the free-space check before a run.
    lock: one run per name at a time (host, pid; stale locks reclaimed).
    failures: one readable line for a runtime error (Ray's wrappers removed; NaN loss fails without retry).
    ray_shims: every workaround touching Ray internals.
    session: start or join Ray; progress: compact progress lines (a Tune callback).

Only the light modules are re-exported here (no ``ray``/``torch`` import);
``progress``, ``tuner``, ``trial`` and ``stage_tags`` import Ray or torch and are
imported by name.
"""
from __future__ import annotations

from medcl.runner.datasets import prepare_dataset
from medcl.runner.pipeline import PipelineResult, run_pipeline
from medcl.runner.plan import Job, check_resumable, plan_jobs
from medcl.runner.session import init_ray, quiet_ray_logging
from medcl.runner.sweep import run_sweep
from medcl.runner.sweep_summary import SweepResult, TrialSummary

__all__ = [
    "Job",
    "PipelineResult",
    "SweepResult",
    "TrialSummary",
    "check_resumable",
    "init_ray",
    "plan_jobs",
    "prepare_dataset",
    "quiet_ray_logging",
    "run_pipeline",
    "run_sweep",
]
