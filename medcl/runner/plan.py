"""Plan a pipeline: its stage jobs, the record of a run's plan, and the check before resuming one.

Planning turns ``methods × label_fractions × seeds`` into a DAG of stage jobs
and shares prefixes: a global pretraining depends only on the seed, so one
run serves every fraction and every method that starts with it; a stage that
uses labels (supervised local pretraining, fine-tuning) is run per fraction.
Jobs of the same depth form a wave (:mod:`medcl.runner.pipeline`).

The plan of a run is kept in ``<storage_path>/<name>/plan.json``. Starting the
same name again resumes it; with *more* jobs (other methods, seeds or fractions
added by ``--methods`` or ``--set``) it extends it: the finished jobs are kept
and the new ones run as a further group of waves (:func:`job_groups`), so one
parent run and one curve hold them all. Any other change (a job dropped, a
job's settings or the dataset changed) is refused.

Example:
    >>> jobs = plan_jobs(load_pipeline("pipelines/quickstart.yaml"))  # doctest: +SKIP
    >>> [job.key for job in jobs][:2]  # doctest: +SKIP
    ['finetune@seed=0,fraction=0.05', 'finetune@seed=0,fraction=0.25']
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medcl.config.binder import to_dict
from medcl.config.pipeline import PipelineConfig
from medcl.config.stages import StageConfig
from medcl.storage import read_json, resolve_storage

__all__ = ["PLAN_FILE", "Job", "check_resumable", "job_groups", "plan_jobs", "plan_record", "run_root"]

PLAN_FILE = "plan.json"


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
                    labelled = labelled or template.uses_labels
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


def run_root(storage_path: str | Path, name: str) -> str:
    """Where a pipeline or sweep called ``name`` keeps its run: ``<storage_path>/<name>`` (a path or a URI)."""
    return f"{resolve_storage(storage_path)}/{name}"


def plan_record(cfg: PipelineConfig, jobs: list[Job], groups: list[list[str]] | None = None) -> dict[str, Any]:
    """What a run of ``cfg`` under its name is: the dataset, every job's resolved config, its job groups."""
    configs = {job.key: json.loads(json.dumps(to_dict(job.config), default=str)) for job in jobs}
    return {"dataset": str(Path(cfg.dataset.path).resolve()), "jobs": configs,
            "groups": groups if groups is not None else [[job.key for job in jobs]]}


def job_groups(old: dict[str, Any] | None, jobs: list[Job]) -> list[list[str]]:
    """The run's job groups: the stored ones, then the jobs no group holds yet (an extension), if any.

    Group ``g`` of depth ``d`` is one Tune experiment (``wave<d>``, ``wave<d>-ext<g>``), so an
    extension never touches the experiments of the jobs that already ran.

    Args:
        old: The stored plan record (None: a new run); a record from before groups were stored
            is one group of its jobs.
        jobs: The jobs planned now (a superset of the stored ones: :func:`check_resumable`).
    """
    if old is None:
        return [[job.key for job in jobs]]
    groups = [list(g) for g in old.get("groups") or [list(old.get("jobs", {}))]]
    known = {key for group in groups for key in group}
    added = [job.key for job in jobs if job.key not in known]
    return groups + [added] if added else groups


def check_resumable(cfg: PipelineConfig) -> bool:
    """Refuse to resume a pipeline run that was started with other jobs or configs; allow more jobs.

    The waves of a run are restored by name, so running a changed pipeline (a job dropped, a
    job's stage settings or the dataset changed) under the same name would mix results of two
    configurations. Added jobs (methods, seeds or fractions) extend the run (:func:`job_groups`).
    The plan is kept in ``<storage_path>/<name>/plan.json``.

    Returns:
        True when a run of this pipeline exists (and will be resumed or extended), False for a new one.

    Raises:
        ValueError: the stored plan differs other than by added jobs; the message names what changed.
    """
    root = run_root(cfg.storage_path, cfg.name)
    old = read_json(root, PLAN_FILE)
    if old is None:
        return False
    new = plan_record(cfg, plan_jobs(cfg))
    changes = []
    if old.get("dataset") != new["dataset"]:
        changes.append(f"dataset {old.get('dataset')} -> {new['dataset']}")
    old_jobs, new_jobs = old.get("jobs", {}), new["jobs"]
    removed = sorted(set(old_jobs) - set(new_jobs))
    changed = sorted(k for k in set(new_jobs) & set(old_jobs) if new_jobs[k] != old_jobs[k])
    for what, keys in (("jobs no longer planned", removed), ("jobs with other settings", changed)):
        if keys:
            more = f" (+{len(keys) - 3} more)" if len(keys) > 3 else ""
            changes.append(f"{what}: {', '.join(keys[:3])}{more}")
    if changes:
        raise ValueError(f"pipeline {cfg.name!r} was started at {root} with another plan ({'; '.join(changes)}); "
                         "a run can only be extended (more methods, seeds or fractions, the same settings); "
                         f"run the changed pipeline under a new name (--set name={cfg.name}-2), or delete {root} "
                         "to start over")
    return True
