"""Typed configuration: stage configs, pipeline files, sweep files, and how YAML becomes them.

Decision (issue 12): the configs stay frozen dataclasses built by our own binder
(:mod:`medcl.config.binder`), not pydantic v2 models. The binder is about 200 lines
and its messages are part of the interface (tests and users read them): every
problem at once, each at its key path (``stages.local.model.features[1]: expected an
integer, got 'x'``), ``did you mean`` hints for mistyped keys, the known keys
otherwise, range checks next to type errors. Pydantic words its errors differently
(``Input should be a valid integer``) at ``loc`` tuples and has no ``did you
mean``; translating every error type back into today's messages would need more
code than the binder itself, and its coercions differ from ours (lax mode turns
``"3"`` into an int, strict mode refuses ``"1e-3"``, the YAML 1.1 float we accept).
So: same messages, shorter code, no switch.

Modules:
    paths: dotted key paths (``a.b.c``) into nested mappings: get/set/flatten/unflatten.
    binder: ConfigError, build, to_dict, load_yaml, apply_overrides.
    stages: the five stage configs, their model and scaling specs.
    metrics: the metric names each stage kind logs (what ``metric:`` may name).
    pipeline: pipeline files (PipelineConfig, load_pipeline).
    space: a sweep's search space, and one trial's stage configs (resolve_chain).
    sweep: sweep files (SweepConfig, load_sweep).
"""
from __future__ import annotations

from medcl.config.binder import ConfigError, apply_overrides, build, load_yaml, to_dict
from medcl.config.paths import flatten, get_path, set_path, unflatten
from medcl.config.pipeline import STAGE_KINDS, DatasetSpec, PipelineConfig, TrackingSpec, load_pipeline, with_scaling
from medcl.config.space import DISTRIBUTIONS, Distribution, resolve_chain
from medcl.config.stages import (
    STAGE_CONFIGS,
    ClsFinetuneConfig,
    ClsPretrainConfig,
    GlobalPretrainConfig,
    LocalPretrainConfig,
    ResNetSpec,
    ScalingSpec,
    SegFinetuneConfig,
    StageConfig,
    UNetSpec,
    stage_config_from_dict,
)
from medcl.config.sweep import AshaSpec, SchedulerSpec, SweepConfig, TrialResources, load_sweep

__all__ = [
    # what the module medcl.config exported before issue 12
    "ConfigError",
    "UNetSpec",
    "ResNetSpec",
    "ScalingSpec",
    "GlobalPretrainConfig",
    "LocalPretrainConfig",
    "SegFinetuneConfig",
    "ClsPretrainConfig",
    "ClsFinetuneConfig",
    "STAGE_CONFIGS",
    "StageConfig",
    "stage_config_from_dict",
    "to_dict",
    # binder, paths
    "build",
    "load_yaml",
    "apply_overrides",
    "get_path",
    "set_path",
    "flatten",
    "unflatten",
    # pipeline and sweep files
    "DatasetSpec",
    "TrackingSpec",
    "PipelineConfig",
    "load_pipeline",
    "with_scaling",
    "STAGE_KINDS",
    "DISTRIBUTIONS",
    "Distribution",
    "AshaSpec",
    "SchedulerSpec",
    "TrialResources",
    "SweepConfig",
    "load_sweep",
    "resolve_chain",
]
