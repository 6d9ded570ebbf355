"""The metric names declared per stage kind (medcl/config/metrics.py) are exactly what a real run logs.

Every kind runs for one epoch of two steps in this process (the real stage
code, the real Ray Data streams, no Trainer), on a 3-class synthetic cohort
with a shifted site and a 3-class MedMNIST-like file, and reports through a
small :class:`StageContext` that keeps every report. Each reported name must be
declared, with the right timing (every epoch, or after the last one only), and
every declared name must be reported (a ``{c}`` pattern at least once).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medcl.config import (
    ClsFinetuneConfig,
    ClsPretrainConfig,
    GlobalPretrainConfig,
    LocalPretrainConfig,
    ResNetSpec,
    SegFinetuneConfig,
    UNetSpec,
)
from medcl.config.metrics import stage_metrics

pytestmark = pytest.mark.ray

UNET = UNetSpec(features=(8, 16), norm="batch", embed_dim=16)
RESNET = ResNetSpec(arch="resnet18", small_input=True, projection_dim=16)
SHORT = {"max_epochs": 2, "batch_size_per_worker": 4, "max_steps_per_epoch": 1}


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[str, Path]:
    from medcl.data.ingest import ingest

    root = tmp_path_factory.mktemp("metrics")
    ingest("synthetic", None, root / "seg", {"num_patients": 8, "images_per_patient": 4, "size": 16,
                                             "num_classes": 3, "shifted_patients": 1, "seed": 0})
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 12), ("val", 3), ("test", 9)):
        arrays[f"{split}_images"] = rng.integers(0, 255, size=(n, 16, 16), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 3)[:, None].astype(np.uint8)  # every class in every split
    np.savez(root / "cls.npz", **arrays)
    ingest("medmnist", root / "cls.npz", root / "cls", {})
    return {"seg": root / "seg", "cls": root / "cls"}


CONFIGS = {
    "global": (GlobalPretrainConfig(model=UNET, temperature=0.5, **SHORT), "seg"),
    "local-both": (LocalPretrainConfig(model=UNET, loss="both", label_fraction=0.5, stride=4, **SHORT), "seg"),
    "local-supervised": (LocalPretrainConfig(model=UNET, loss="supervised", stride=4, **SHORT), "seg"),
    "seg-finetune": (SegFinetuneConfig(model=UNET, **SHORT), "seg"),
    "cls-pretrain": (ClsPretrainConfig(model=RESNET, **SHORT), "seg"),  # reads the stream "global" reads
    "cls-finetune": (ClsFinetuneConfig(model=RESNET, protocol="linear", **SHORT), "cls"),
}


@pytest.fixture(scope="module")
def streams(ray_session, datasets) -> dict[str, dict]:
    """Every run's streams, built together (each distinct stream once; the builds overlap)."""
    from medcl.data.streams import build_streams
    from medcl.train.driver import STAGES

    specs = {(key, name): spec for key, (cfg, data) in CONFIGS.items()
             for name, spec in STAGES[cfg.kind].datasets(cfg, str(datasets[data])).items()}
    built = build_streams(specs)
    return {key: {name: ds for (k, name), ds in built.items() if k == key} for key in CONFIGS}


def _reports(cfg, data: Path, streams: dict) -> list[dict[str, float]]:
    """Every report of one in-process run of ``cfg`` on ``data``."""
    from in_process import InProcessContext

    from medcl.train.driver import run_loop, stage_inputs

    ctx = InProcessContext(streams)
    run_loop(ctx, cfg, stage_inputs(cfg, str(data), streams, 1))
    return ctx.reports


@pytest.mark.parametrize("key", list(CONFIGS))
def test_each_kind_logs_exactly_its_declared_metrics(datasets, streams, key):
    cfg, data = CONFIGS[key]
    reports = _reports(cfg, datasets[data], streams[key])
    declared = stage_metrics(cfg)
    assert len(reports) == 2
    for report in reports:
        undeclared = sorted(name for name in report if declared.when(name) is None)
        assert not undeclared, f"{cfg.kind} logs {undeclared}, not declared in medcl/config/metrics.py"
    every_epoch = set(reports[0])
    assert {declared.when(name) for name in every_epoch} == {"per_epoch"}
    assert {declared.when(name) for name in set(reports[1]) - every_epoch} <= {"final"}
    for pattern in declared.per_epoch:
        assert any(_matches(pattern, name) for name in every_epoch), f"{cfg.kind} never logs {pattern}"
    for pattern in declared.final:
        # the synthetic cohort has a shifted site; the MedMNIST-like file has none
        if pattern.startswith(("shifted/", "best/shifted/")) and data == "cls":
            continue
        assert any(_matches(pattern, name) for name in reports[1]), f"{cfg.kind} never logs {pattern}"


def _matches(pattern: str, name: str) -> bool:
    from medcl.config.metrics import StageMetrics

    return StageMetrics(per_epoch=(pattern,), final=()).when(name) == "per_epoch"
