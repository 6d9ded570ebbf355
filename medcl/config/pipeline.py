"""Pipeline files (``pipelines/*.yaml``): a dataset, stage templates, methods, fractions, seeds.

A *method* is a chain of stage templates, e.g. ``[global, local, finetune]``;
every method runs at every label fraction and seed. Validation happens here,
before Ray starts: unknown keys, wrong types, missing files, fractions out of
range and methods naming unknown stages are reported together, each with its
key path. The stage templates are parsed once, here: ``PipelineConfig.stage(name)``
returns the typed template.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from medcl.config.binder import ConfigError, apply_overrides, build, check, check_all, load_yaml
from medcl.config.metrics import check_metric
from medcl.config.stages import (
    FINETUNE_KINDS,
    SEED_LIMIT,
    STAGE_CONFIGS,
    ScalingSpec,
    StageConfig,
    check_fraction,
    check_seed,
    stage_config_from_dict,
)

__all__ = ["PipelineConfig", "DatasetSpec", "TrackingSpec", "load_pipeline", "read_pipeline_identity", "with_scaling", "check_run_name",
           "STAGE_KINDS"]

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


def check_run_name(name: str) -> None:
    """Raise ``ValueError("name must ...")`` unless ``name`` is safe as one directory name and an MLflow run name.

    Letters, digits, ``.``, ``_`` and ``-``, starting with a letter or digit: no path
    separator, no ``..``, not empty.
    """
    check(bool(_NAME_RE.match(name)), "name must be letters, digits, '.', '_' or '-' starting with a letter or "
                                      f"digit (it names a directory and an MLflow run), got {name!r}")


@dataclass(frozen=True)
class DatasetSpec:
    """Where the shards are, and how to make them if they are not there yet.

    ``source`` names the ingest (``synthetic``, ``msd``, ``medmnist``,
    ``folder``) or ``existing`` for shards made earlier; ``source_path`` is the
    task folder / ``.npz`` / CSV; ``options`` the source's ingest options
    (``medcl ingest SOURCE --help`` lists them). Re-running an ingest that is
    up to date is a no-op.
    """

    path: Path
    source: Literal["synthetic", "msd", "medmnist", "folder", "existing"] = "existing"
    source_path: Path | None = None
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TrackingSpec:
    """MLflow: ``tracking_uri`` null → the embedded SQLite store in ``workdir``; env MLFLOW_TRACKING_URI wins over null."""

    experiment: str = "medcl"
    tracking_uri: str | None = None
    workdir: Path = Path(".")


@dataclass(frozen=True)
class PipelineConfig:
    """A whole experiment: see ``pipelines/quickstart.yaml`` for a commented example.

    ``stages`` holds the templates as the file wrote them (what a sweep's resume
    fingerprint hashes); :meth:`stage` gives them typed.
    """

    name: str
    dataset: DatasetSpec
    stages: dict[str, dict[str, Any]]
    methods: dict[str, list[str]]
    label_fractions: list[float] = field(default_factory=lambda: [1.0])
    seeds: list[int] = field(default_factory=lambda: [0])
    metric: str = "test/dice_2d"
    scaling: ScalingSpec = field(default_factory=ScalingSpec)
    tracking: TrackingSpec = field(default_factory=TrackingSpec)
    storage_path: str = "medcl_runs"  # local directory, or s3://... / gs://... shared by all nodes
    max_concurrent_trials: int = 2
    description: str = ""
    smoke: list[str] = field(default_factory=list)  # key=value overrides applied by `medcl run --smoke`

    def __post_init__(self) -> None:
        check_all(
            lambda: check_run_name(self.name),
            lambda: check_fraction("label_fractions", self.label_fractions),
            lambda: check(bool(self.label_fractions), "label_fractions must not be empty"),
            lambda: check(bool(self.seeds), "seeds must not be empty"),
            lambda: check_seed("seeds", self.seeds),
            lambda: check(self.max_concurrent_trials >= 1,
                          f"max_concurrent_trials must be >= 1, got {self.max_concurrent_trials}"),
        )

    @cached_property
    def templates(self) -> dict[str, StageConfig]:
        """Stage name -> typed template; :func:`load_pipeline` fills it when it validates them.

        Raises:
            ConfigError: a template is not valid (only for a config made without ``load_pipeline``).
        """
        problems: list[str] = []
        templates = {name: _parse_template(name, data, problems) for name, data in self.stages.items()}
        if problems:
            raise ConfigError(problems)
        return templates

    def stage(self, name: str) -> StageConfig:
        """The typed template of stage ``name``."""
        return self.templates[name]


def _parse_template(name: str, data: Any, problems: list[str]) -> StageConfig | None:
    """The typed template ``stages.<name>``, or None with its problems added to ``problems``."""
    try:
        return stage_config_from_dict(data, path=f"stages.{name}")
    except ConfigError as exc:
        problems.extend(exc.problems)
        return None


def _check_stages(stages: Any, methods: Any, problems: list[str]) -> dict[str, StageConfig]:
    """Stage templates and method chains, checked on the raw mapping (so other errors don't hide these).

    Returns:
        Stage name -> typed template (None where the template has problems).
    """
    if not isinstance(stages, dict) or not isinstance(methods, dict):
        return {}  # the dataclass build already reported the type
    templates = {}
    for name, data in stages.items():
        if not isinstance(data, dict):
            continue
        templates[name] = _parse_template(name, data, problems)
        for key in ("seed", "label_fraction", "init_from"):
            if key in data:
                problems.append(f"stages.{name}.{key}: set by the pipeline (seeds, label_fractions, methods); "
                                "remove it here")
    for method, chain in methods.items():
        if not isinstance(chain, list):
            continue
        if not chain:
            problems.append(f"methods.{method}: must list at least one stage")
        for i, stage in enumerate(chain):
            if stage not in stages:
                problems.append(f"methods.{method}[{i}]: unknown stage {stage!r}; defined: {sorted(stages)}")
        known = [stage for stage in chain if isinstance(stages.get(stage), dict)]
        models = {stage: stages[stage].get("model") for stage in known}
        if len({repr(m) for m in models.values()}) > 1:
            problems.append(f"methods.{method}: stages {list(models)} must share one model shape to hand over "
                            f"weights; got {models}")
        kinds = [stages[stage].get("kind") for stage in known]
        if kinds and kinds[-1] not in FINETUNE_KINDS:
            problems.append(f"methods.{method}: must end with a fine-tuning stage, ends with {kinds[-1]!r}")
    return templates


def _check_metric(metric: Any, methods: Any, templates: dict[str, StageConfig | None],
                  problems: list[str]) -> None:
    """``metric`` must be logged by the last stage of every method (the report reads it from those runs).

    Checked on the raw file (so that other errors don't hide it); wrong types were reported by the build.
    """
    if not isinstance(metric, str) or not isinstance(methods, dict):
        return
    seen: set[str] = set()
    for method, chain in methods.items():
        last = chain[-1] if isinstance(chain, list) and chain else None
        if not isinstance(last, str) or last in seen or templates.get(last) is None:
            continue
        seen.add(last)
        problem = check_metric(metric, last, templates[last], f"method {method!r}")
        if problem is not None:
            problems.append(problem)


def _check_dataset(spec: DatasetSpec, problems: list[str]) -> None:
    if spec.source == "existing":
        return
    from medcl.data.ingest import ingest_options

    known = ingest_options(spec.source)
    for key in sorted(set(spec.options) - set(known)):
        problems.append(f"dataset.options.{key}: unknown {spec.source} ingest option; known: {sorted(known)}")
    for key, value in sorted(spec.options.items()):
        if key.endswith("seed") and key in known and (isinstance(value, bool) or not isinstance(value, int)
                                                      or not 0 <= value < SEED_LIMIT):
            problems.append(f"dataset.options.{key}: must be an integer in [0, 2**31), got {value!r}")
    if spec.source == "synthetic":
        if spec.source_path is not None:
            problems.append("dataset.source_path: the synthetic source takes no source_path")
    elif spec.source_path is None:
        problems.append(f"dataset.source_path: required for source {spec.source!r}")
    elif not spec.source_path.exists():
        problems.append(f"dataset.source_path: {spec.source_path} does not exist")


def load_pipeline(path: str | Path, overrides: list[str] | None = None, smoke: bool = False,
                  methods: list[str] | None = None) -> PipelineConfig:
    """Read and fully validate a pipeline file; ``overrides`` are ``key.path=value`` strings.

    ``smoke`` first applies the file's own ``smoke:`` overrides (a short CPU run).
    ``methods`` keeps only these methods of the file (``medcl run --methods``).

    Relative paths in the file (dataset path, ingest source paths, storage,
    MLflow workdir) are taken relative to the current directory.

    Raises:
        ConfigError: every problem found, one per line, with its key path.
    """
    problems: list[str] = []
    data = load_yaml(path, problems)
    if smoke:
        smoke_overrides = data.get("smoke") or []
        if not isinstance(smoke_overrides, list) or not smoke_overrides:
            raise ConfigError(["smoke: --smoke needs a non-empty list of key=value overrides in the file"],
                              source=str(path))
        data = apply_overrides(data, [str(o) for o in smoke_overrides])
    if overrides:
        data = apply_overrides(data, overrides)
    if methods:
        known = data.get("methods") if isinstance(data.get("methods"), dict) else {}
        unknown = [m for m in methods if m not in known]
        if unknown:
            raise ConfigError([f"--methods: unknown method(s) {', '.join(map(repr, unknown))}; "
                               f"the file has {', '.join(known) or 'none'}"], source=str(path))
        data = {**data, "methods": {m: known[m] for m in methods}}
    try:
        cfg = build(PipelineConfig, data, source=str(path))
    except ConfigError as exc:
        problems.extend(exc.problems)
        cfg = None
    templates = _check_stages(data.get("stages"), data.get("methods"), problems)
    if cfg is not None:
        if cfg.dataset.source == "existing" and not (cfg.dataset.path / "manifest.json").is_file():
            problems.append(f"dataset.path: no dataset at {cfg.dataset.path} (manifest.json missing); "
                            "ingest one first or set dataset.source")
        _check_dataset(cfg.dataset, problems)
    _check_metric(data.get("metric", _DEFAULT_METRIC), data.get("methods"), templates, problems)
    if problems:
        raise ConfigError(problems, source=str(path))
    cfg.__dict__["templates"] = templates  # fills the cached property: the templates are parsed once
    return cfg


def with_scaling(cfg: PipelineConfig, **changes: Any) -> PipelineConfig:
    """A copy with some ScalingSpec fields replaced (``--num-workers``, ``--use-gpu``)."""
    changes = {k: v for k, v in changes.items() if v is not None}
    return dataclasses.replace(cfg, scaling=dataclasses.replace(cfg.scaling, **changes))


STAGE_KINDS = tuple(STAGE_CONFIGS)
_DEFAULT_METRIC = PipelineConfig.__dataclass_fields__["metric"].default


def read_pipeline_identity(path: str | Path, overrides: list[str] | None = None) -> tuple[str, str, str | None, str, str]:
    """``(name, tracking.experiment, tracking.tracking_uri, tracking.workdir, metric)`` of a pipeline file.

    What ``medcl report`` needs to find a pipeline's runs, read with ``overrides`` applied but
    without validating the rest of the file (its dataset need not be on this machine).

    Raises:
        ConfigError: the file is missing or unreadable, or has no ``name`` or a bad ``tracking`` mapping.
    """
    if not Path(path).is_file():
        raise ConfigError([f"pipeline file {path} not found"], source=str(path))
    data = apply_overrides(load_yaml(path), list(overrides or []))
    tracking = data.get("tracking") or {}
    if not isinstance(data.get("name"), str) or not isinstance(tracking, dict):
        raise ConfigError(["name: a pipeline needs a string `name` and a `tracking` mapping (or none)"],
                          source=str(path))
    defaults = TrackingSpec()
    return (data["name"], str(tracking.get("experiment", defaults.experiment)), tracking.get("tracking_uri"),
            str(tracking.get("workdir") or defaults.workdir), str(data.get("metric") or "test/dice_2d"))
