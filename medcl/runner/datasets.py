"""The data a run reads: its dataset directory (ingested once) and the Ray Datasets of its stages.

Pipelines and sweeps build the datasets of all their stages in the driver,
before any trial holds a CPU (inside trials, dataset builds compete with the
trials for CPUs: minutes on a small machine, seconds here). Each distinct
:class:`~medcl.data.streams.StreamSpec` is read and decoded once and shared by
every stage that reads it; a trial looks its stages' specs up in that cache and
builds only what is missing.
"""
from __future__ import annotations

from collections.abc import Hashable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from medcl.config.pipeline import PipelineConfig
from medcl.config.stages import StageConfig

__all__ = ["prepare_dataset", "stage_streams"]

K = TypeVar("K", bound=Hashable)


def prepare_dataset(cfg: PipelineConfig) -> Path:
    """The run's dataset directory, checked once: its files must match the manifest's SHA-256.

    An ``existing`` dataset is verified here; any other source is ingested unless
    it is already there and up to date, which the ingest decides by verifying the
    same checksums (a dataset that fails them is rebuilt from its source).

    Raises:
        ManifestError: a shard or ``bags.parquet`` of an ``existing`` dataset is missing or
            its bytes differ from the manifest (the message names the file).
        IngestError: the ingest failed.
    """
    if cfg.dataset.source == "existing":
        from medcl.data.manifest import verify_checksums

        verify_checksums(cfg.dataset.path)
        return cfg.dataset.path
    from medcl.data.ingest import ingest

    ingest(cfg.dataset.source, cfg.dataset.source_path, cfg.dataset.path, cfg.dataset.options)
    return cfg.dataset.path


def stage_streams(stages: Iterable[tuple[K, StageConfig]], dataset_dir: str,
                  cache: dict[Any, Any] | None = None) -> dict[K, dict[str, Any]]:
    """The materialised datasets of each stage, every distinct stream built once (builds overlap).

    Args:
        stages: ``(key, stage config)`` pairs; a key names the stage in the result (a job key, a stage index).
        dataset_dir: The (resolved) dataset directory.
        cache: ``StreamSpec -> dataset`` of streams built before; filled in place with the new ones.

    Returns:
        ``key -> {stream name -> dataset}``, the stage's ``datasets(cfg, dataset_dir)`` materialised.
    """
    from medcl.data.streams import build_streams
    from medcl.train.driver import STAGES

    specs = {key: STAGES[cfg.kind].datasets(cfg, dataset_dir) for key, cfg in stages}
    built = build_streams({(key, name): spec for key, named in specs.items() for name, spec in named.items()},
                          cache=cache)
    return {key: {name: built[(key, name)] for name in named} for key, named in specs.items()}
