"""Sweeps select on validation metrics only (issue 14, defect 8): `medcl validate` / `medcl sweep` refuse a test metric.

A sweep (or ASHA) that picks hyperparameters by ``test/*``, ``shifted/*`` or
their ``best/`` forms tunes on the test set; the refusal names the file and the
``metric`` key and the opt-in (``allow_test_metric: true``). Validation metrics
(``val/dice_2d`` every epoch, ``best/val/dice_2d`` at the end) are accepted,
with the timing rules that ASHA needs. No Ray, no data: files only.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from medcl.cli import main
from medcl.config.binder import ConfigError
from medcl.config.sweep import load_sweep

REPO = Path(__file__).resolve().parents[2]

PIPELINE = """\
name: tiny
dataset: {path: data/tiny, source: synthetic, options: {num_patients: 8, seed: 0}}
stages:
  global: {kind: global_pretrain, max_epochs: 4, model: {features: [8, 16]}}
  finetune: {kind: seg_finetune, max_epochs: 4, model: {features: [8, 16]}}
methods:
  global: [global, finetune]
"""


def _sweep(tmp_path: Path, body: str, pipeline: str = PIPELINE) -> Path:
    (tmp_path / "pipe.yaml").write_text(pipeline)
    path = tmp_path / "sweep.yaml"
    path.write_text("name: s\npipeline: pipe.yaml\nmode: max\nspace: {stages.finetune.lr: {grid: [0.001]}}\n" + body)
    return path


def _problems(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_sweep(path)
    return info.value.problems


@pytest.mark.parametrize("metric", ["test/dice_2d", "shifted/dice_2d", "best/test/dice_2d",
                                    "best/shifted/dice_3d_mean"])
def test_validate_refuses_a_test_metric_naming_the_file_and_the_key(tmp_path, capsys, metric):
    path = _sweep(tmp_path, f"method: global\nmetric: {metric}\n")
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"invalid configuration in {path}:" in err
    assert f"metric: {metric!r} is measured on the test set" in err
    assert f"set `allow_test_metric: true` in {path}" in err
    assert len(_problems(path)) == 1
    # `medcl sweep` takes the same path, before Ray starts
    assert main(["sweep", str(path)]) == 2
    assert f"metric: {metric!r} is measured on the test set" in capsys.readouterr().err


def test_the_explicit_opt_in_and_validation_metrics_pass(tmp_path, capsys):
    path = _sweep(tmp_path, "method: global\nmetric: test/dice_2d\nallow_test_metric: true\n")
    assert main(["validate", str(path)]) == 0
    assert f"{path}: valid" in capsys.readouterr().out
    for metric in ("best/val/dice_2d", "val/dice_2d", "best/epoch"):
        assert load_sweep(_sweep(tmp_path, f"method: global\nmetric: {metric}\n")).metric == metric
    # ASHA compares val/dice_2d every epoch of a fine-tuning stage
    path = _sweep(tmp_path, "stage: finetune\nmetric: val/dice_2d\nscheduler: {asha: {grace_period: 1}}\n")
    assert load_sweep(path).asha.max_t == 3


@pytest.mark.parametrize("body, message", [
    ("stage: finetune\nmetric: val/dice_2d\nscheduler: {asha: {grace_period: 1}}\n"
     "overrides: [stages.finetune.val_every=2]",
     "scheduler.asha: ASHA stops trials by comparing them every epoch and needs a metric reported every epoch, such "
     "as train/loss or val/dice_2d; 'val/dice_2d' is reported every 2 epochs (val_every: 2; set it to 1)"),
    ("method: global\nmetric: best/val/dice_2d\noverrides: [stages.finetune.val_every=0]",
     "metric: 'best/val/dice_2d' needs validation, but stage 'finetune' (seg_finetune), which ends this sweep, sets "
     "val_every: 0 (never validates); set val_every: 1"),
    ("stage: global\nmetric: val/dice_2d",
     "metric: 'val/dice_2d' is reported by fine-tuning stages when they validate, but this sweep ends with stage "
     "'global' (global_pretrain)"),
])
def test_validation_metrics_that_the_stage_does_not_report_are_refused(tmp_path, body, message):
    path = _sweep(tmp_path, body)
    if "stage: global" in body:  # sweep a key of the stage the trial runs
        path.write_text(path.read_text().replace("stages.finetune.lr", "stages.global.lr"))
    problems = _problems(path)
    assert len(problems) == 1 and problems[0].startswith(message), problems


def test_the_shipped_search_spaces_validate_and_select_on_validation(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    names = sorted(p.name for p in (REPO / "tune_spaces").glob("*.yaml"))
    if not (REPO.parent / "shared" / "data" / "Task04_Hippocampus").is_dir():  # the hippocampus pipeline's source
        names.remove("local_block.yaml")
    for name in names:
        assert main(["validate", f"tune_spaces/{name}"]) == 0, capsys.readouterr().err
        assert not load_sweep(REPO / "tune_spaces" / name).metric.startswith(("test/", "shifted/", "best/test/"))
    assert len(names) >= 2
