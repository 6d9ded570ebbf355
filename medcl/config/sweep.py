"""Sweep files (``tune_spaces/*.yaml``): a base pipeline, what one trial runs, a search space, a metric.

A sweep names a pipeline file and either a ``method`` of it (each trial runs
that chain of stages, e.g. global pretraining then fine-tuning) or a single
``stage`` (each trial runs that stage alone, optionally from ``init_from``).
``space`` maps dotted keys into the pipeline to distributions::

    space:
      label_fraction: {choice: [0.05, 0.25]}          # every stage that uses labels
      seed: {grid: [0, 1]}                              # every stage of the trial
      stages.local.temperature: {loguniform: [0.05, 1.0]}
      stages.local.block_size: {grid: [8, 16]}
      stages.finetune.lr: {uniform: [1.0e-4, 1.0e-3]}
      stages.global.num_partitions: {randint: [2, 6]}   # high excluded

``metric`` selects: it must not be measured on the test set (``test/``,
``shifted/``, ``best/test/``, ``best/shifted/``) unless the file sets
``allow_test_metric: true``; select on ``val/dice_2d`` (every epoch, what ASHA
compares) or ``best/val/dice_2d`` (the best epoch's, at the end of a method).
Keys not swept keep the pipeline's values; ``seed`` and ``label_fraction``
default to the pipeline's first ``seeds`` / ``label_fractions`` entry. The
whole file is validated before Ray starts; every problem is reported at once
with its key path (``space.stages.local.temperature: ...``). Paths: ``pipeline``
is taken relative to the sweep file (then to the current directory); paths
inside the pipeline are relative to the current directory, as for ``medcl run``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from medcl.config.binder import ConfigError, apply_overrides, build, check, load_yaml, to_dict
from medcl.config.metrics import check_metric, is_evaluation_metric, is_test_metric, stage_metrics
from medcl.config.pipeline import PipelineConfig, TrackingSpec, check_run_name, load_pipeline
from medcl.config.space import DISTRIBUTIONS, Distribution, check_space, parse_space, resolve_chain
from medcl.config.stages import check_seed

__all__ = ["Distribution", "AshaSpec", "SchedulerSpec", "TrialResources", "SweepConfig", "load_sweep",
           "resolve_chain", "DISTRIBUTIONS"]

@dataclass(frozen=True)
class AshaSpec:
    """ASHA early stopping (asynchronous successive halving) of a single-stage sweep.

    ``time_attr``: ``training_iteration`` (1 per epoch, from 1) or ``epoch``
    (from 0). Rungs are at ``grace_period * reduction_factor**k`` up to
    ``max_t``, which must lie before the stage's last epoch (default: just
    before it); trials that pass every rung run to the end of their stage.
    """

    max_t: int | None = None
    grace_period: int = 1
    reduction_factor: float = 2.0
    time_attr: Literal["training_iteration", "epoch"] = "training_iteration"

    def __post_init__(self) -> None:
        check(self.max_t is None or self.max_t >= 1, f"max_t must be >= 1, got {self.max_t}")
        check(self.grace_period >= 1, f"grace_period must be >= 1, got {self.grace_period}")
        check(self.reduction_factor > 1, f"reduction_factor must be > 1, got {self.reduction_factor}")
        check(self.max_t is None or self.grace_period <= self.max_t,
               f"grace_period must be <= max_t, got grace_period={self.grace_period}, max_t={self.max_t}")


@dataclass(frozen=True)
class SchedulerSpec:
    """Trial scheduler; only ``asha`` for now."""

    asha: AshaSpec | None = None


@dataclass(frozen=True)
class TrialResources:
    """What one trial reserves. ``cpu`` default: the pipeline's ``scaling.cpus_per_worker``.

    With one worker per stage (the default) the trial runs its stages itself and
    holds these resources; a GPU fraction (``gpu: 0.5``) lets trials share a GPU.
    With ``scaling.num_workers > 1`` they are per Ray Train worker (``gpu`` 0 or 1).
    """

    cpu: float | None = None
    gpu: float = 0.0

    def __post_init__(self) -> None:
        check(self.cpu is None or self.cpu > 0, f"cpu must be > 0, got {self.cpu}")
        check(self.gpu >= 0, f"gpu must be >= 0, got {self.gpu}")


@dataclass(frozen=True)
class _SweepFile:
    """The keys of a sweep file (see tune_spaces/quickstart_temperature.yaml for a commented example)."""

    name: str
    pipeline: Path
    metric: str
    mode: Literal["min", "max"]
    space: dict[str, Any]
    allow_test_metric: bool = False  # select on a test/ or shifted/ metric knowingly (tunes on the test set)
    method: str | None = None
    stage: str | None = None
    init_from: Path | None = None
    num_samples: int = 1
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    resources: TrialResources = field(default_factory=TrialResources)
    max_concurrent_trials: int | None = None  # default: the pipeline's
    max_failures: int | None = None  # retries of a failed trial; default: the pipeline's scaling.max_failures
    search_seed: int = 0  # seeds the random draws of choice/uniform/loguniform/randint
    storage_path: str | None = None  # default: <pipeline storage_path>/sweeps
    tracking: TrackingSpec | None = None  # default: the pipeline's
    overrides: list[str] = field(default_factory=list)  # key=value changes to the pipeline, as `medcl run --set`
    description: str = ""

    def __post_init__(self) -> None:
        check_run_name(self.name)
        check_seed("search_seed", self.search_seed)
        check(self.num_samples >= 1, f"num_samples must be >= 1, got {self.num_samples}")
        check(self.max_concurrent_trials is None or self.max_concurrent_trials >= 1,
               f"max_concurrent_trials must be >= 1, got {self.max_concurrent_trials}")
        check(self.max_failures is None or self.max_failures >= 0,
               f"max_failures must be >= 0, got {self.max_failures}")
        check(bool(self.space), "space must name at least one key to sweep")


@dataclass(frozen=True)
class SweepConfig:
    """A validated sweep, with its base pipeline loaded (see :func:`load_sweep`).

    Attributes:
        chain: Stage names one trial runs, in order (a method's chain, or the one swept stage).
        space: Dotted pipeline key -> distribution.
        asha: The ASHA settings with ``max_t`` filled in, or None.
    """

    name: str
    source: Path
    pipeline_path: Path
    pipeline: PipelineConfig
    chain: tuple[str, ...]
    method: str | None
    stage: str | None
    init_from: Path | None
    metric: str
    mode: str
    num_samples: int
    space: dict[str, Distribution]
    asha: AshaSpec | None
    resources: TrialResources
    max_concurrent_trials: int
    max_failures: int
    search_seed: int
    storage_path: str
    tracking: TrackingSpec
    description: str = ""

    def num_trials(self) -> int:
        """Trials the sweep runs: the grid's size times ``num_samples``."""
        grid = math.prod(len(d.values) for d in self.space.values() if d.kind == "grid")
        return grid * self.num_samples

    def fingerprint(self) -> dict[str, str]:
        """What must not change when a sweep is resumed, part by part (hashes of plain JSON)."""
        parts = {
            "pipeline stages": {name: self.pipeline.stages[name] for name in self.chain},
            "trial": {"chain": list(self.chain), "init_from": str(self.init_from),
                      "seeds": self.pipeline.seeds, "label_fractions": self.pipeline.label_fractions},
            "space": {k: d.describe() for k, d in sorted(self.space.items())},
            "search": {"num_samples": self.num_samples, "search_seed": self.search_seed,
                       "metric": self.metric, "mode": self.mode, "asha": to_dict(self.asha)},
            "dataset": str(self.pipeline.dataset.path.resolve()),
        }
        return {k: hashlib.sha256(json.dumps(v, sort_keys=True, default=str).encode()).hexdigest()[:16]
                for k, v in parts.items()}


def _check_metric(file: _SweepFile, pipeline: PipelineConfig, chain: tuple[str, ...], problems: list[str]) -> None:
    last = chain[-1]
    problem = check_metric(file.metric, last, pipeline.stage(last), "this sweep")
    if problem is not None:
        problems.append(problem)
    asha = file.scheduler.asha
    if asha is None:
        return
    when = stage_metrics(pipeline.stage(last)).when(file.metric)
    per_epoch = when == "per_epoch" or (when is None and not is_evaluation_metric(file.metric))  # else said above
    if len(chain) > 1:
        problems.append(f"scheduler.asha: ASHA compares trials at the same epoch of one stage; sweep a single stage "
                        f"(`stage: NAME`) rather than method {file.method!r} ({' > '.join(chain)})")
    if not per_epoch:
        every = getattr(pipeline.stage(last), "val_every", 0)
        said = (f"reported every {every} epochs (val_every: {every}; set it to 1)" if when == "final" and every > 1
                and file.metric.startswith("val/") else "only reported after the last epoch")
        problems.append(f"scheduler.asha: ASHA stops trials by comparing them every epoch and needs a metric reported "
                        f"every epoch, such as train/loss or val/dice_2d; {file.metric!r} is {said}")
    if any(k == f"stages.{chain[0]}.max_epochs" for k in file.space) or len(chain) > 1:
        return
    try:
        max_epochs = resolve_chain(pipeline, chain, {})[0][1].max_epochs
    except ConfigError:
        return
    last = _last_time(asha, max_epochs)
    where = f"the {asha.time_attr} of the last epoch of stage {chain[0]!r} ({last}, max_epochs={max_epochs})"
    if last - 1 < asha.grace_period:
        problems.append(f"scheduler.asha: grace_period {asha.grace_period} leaves no rung before {where}; "
                        "ASHA needs a rung before the last epoch: raise max_epochs or lower grace_period")
    elif asha.max_t is not None and asha.max_t >= last:
        problems.append(f"scheduler.asha.max_t: {asha.max_t} must be below {where}: a rung there could only "
                        "stop trials that have already finished")


def _last_time(asha: AshaSpec, max_epochs: int) -> int:
    """The value of ``asha.time_attr`` at a stage's last epoch (iterations count from 1, epochs from 0)."""
    return max_epochs if asha.time_attr == "training_iteration" else max_epochs - 1


def _find_pipeline(path: Path, source: Path) -> Path | None:
    if path.is_absolute():
        return path if path.is_file() else None
    for candidate in (source.parent / path, Path.cwd() / path):
        if candidate.is_file():
            return candidate
    return None


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> SweepConfig:
    """Read and fully validate a sweep file and its base pipeline.

    Args:
        path: The sweep YAML.
        overrides: ``key.path=value`` changes to the sweep file (``medcl sweep --set``).

    Raises:
        ConfigError: every problem found, one per line, each with its key path.
    """
    source = Path(path)
    problems: list[str] = []
    data = load_yaml(source, problems)
    if overrides:
        data = apply_overrides(data, overrides)
    try:
        file = build(_SweepFile, data, source=str(source))
    except ConfigError as exc:
        problems.extend(exc.problems)
        # Bad optional keys should not hide the other problems: check the rest without them.
        bad = {re.split(r"[.:\[]", p, maxsplit=1)[0] for p in exc.problems}
        try:
            file = build(_SweepFile, {k: v for k, v in data.items() if k not in bad})
        except ConfigError:
            file = None
    space = parse_space(data.get("space"), problems)
    if file is None:
        raise ConfigError(problems, source=str(source))

    pipeline_path = _find_pipeline(file.pipeline, source)
    pipeline = None
    if pipeline_path is None:
        problems.append(f"pipeline: {file.pipeline} not found (looked next to {source} and in {Path.cwd()})")
    else:
        try:
            pipeline = load_pipeline(pipeline_path, overrides=file.overrides)
        except ConfigError as exc:
            problems.extend(f"pipeline {pipeline_path}: {p}" for p in exc.problems)

    if is_test_metric(file.metric) and not file.allow_test_metric:
        problems.append(f"metric: {file.metric!r} is measured on the test set: a sweep that picks hyperparameters "
                        "(or an ASHA that stops trials) by it tunes on the test set, and the test numbers stop being "
                        "an unbiased estimate. Select on validation: val/dice_2d (every epoch, for ASHA) or "
                        "best/val/dice_2d (the best epoch's, for a whole method); val/patient_auc, "
                        "best/val/patient_auc (per image: val/auc) for classification. To select on the test set "
                        f"knowingly, set `allow_test_metric: true` in {source}")
    if file.mode == "max" and file.metric.endswith("loss"):
        problems.append(f"mode: 'max' would pick the largest {file.metric}; use mode: min")
    chain: tuple[str, ...] = ()
    if (file.method is None) == (file.stage is None):
        problems.append("method, stage: give exactly one: `method: NAME` runs a pipeline method's chain of stages "
                        "per trial, `stage: NAME` runs one stage per trial")
    elif pipeline is not None and file.method is not None:
        if file.method not in pipeline.methods:
            problems.append(f"method: the pipeline has no method {file.method!r}; its methods: "
                            f"{', '.join(pipeline.methods)}")
        else:
            chain = tuple(pipeline.methods[file.method])
    elif pipeline is not None:
        if file.stage not in pipeline.stages:
            problems.append(f"stage: the pipeline has no stage {file.stage!r}; its stages: {', '.join(pipeline.stages)}")
        else:
            chain = (file.stage,)
    if file.init_from is not None:
        if file.stage is None:
            problems.append("init_from: only for single-stage sweeps (`stage:`); a method's stages hand over themselves")
        elif not file.init_from.exists():
            problems.append(f"init_from: {file.init_from} does not exist")

    if pipeline is not None and chain:
        check_space(space, pipeline, chain, problems)
        _check_metric(file, pipeline, chain, problems)
        scaling = pipeline.scaling
        if scaling.num_workers > 1 and file.resources.gpu not in (0, 1):
            problems.append(f"resources.gpu: with scaling.num_workers={scaling.num_workers} every Ray Train worker "
                            f"takes a whole GPU; use 0 or 1, got {file.resources.gpu}")
        elif file.resources.gpu > 1:
            problems.append(f"resources.gpu: a single-worker trial uses one GPU, got {file.resources.gpu}; "
                            "use scaling.num_workers for more")
    if problems or pipeline is None or pipeline_path is None:
        raise ConfigError(problems, source=str(source))

    asha = file.scheduler.asha
    if asha is not None and asha.max_t is None:  # the last rung just before the last epoch
        max_t = max(asha.grace_period, _last_time(asha, resolve_chain(pipeline, chain, {})[0][1].max_epochs) - 1)
        asha = dataclasses.replace(asha, max_t=max_t)
    resources = file.resources
    if resources.cpu is None:
        resources = dataclasses.replace(resources, cpu=pipeline.scaling.cpus_per_worker)
    return SweepConfig(
        name=file.name, source=source.resolve(), pipeline_path=pipeline_path.resolve(), pipeline=pipeline,
        chain=chain, method=file.method, stage=file.stage,
        init_from=file.init_from.resolve() if file.init_from is not None else None,
        metric=file.metric, mode=file.mode, num_samples=file.num_samples, space=space, asha=asha,
        resources=resources,
        max_concurrent_trials=file.max_concurrent_trials or pipeline.max_concurrent_trials,
        max_failures=pipeline.scaling.max_failures if file.max_failures is None else file.max_failures,
        search_seed=file.search_seed,
        storage_path=file.storage_path or f"{pipeline.storage_path}/sweeps",
        tracking=file.tracking or pipeline.tracking, description=file.description,
    )
