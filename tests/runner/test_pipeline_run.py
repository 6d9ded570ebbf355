"""`medcl run` end to end: a tiny pipeline on real Ray and real MLflow, its resume, and the guards around it.

The cohort is 12 synthetic patients of 4 slices at 16 px; stages run one epoch.
Expectations are the job names and run counts the plan implies, written out by hand.
"""
from __future__ import annotations

import csv
import json
import textwrap
from pathlib import Path

import pytest

from medcl.config.binder import ConfigError
from medcl.config.pipeline import load_pipeline

PIPELINE = """\
name: tiny-run
dataset: {{path: {root}/data, source: synthetic, options: {{num_patients: 12, images_per_patient: 4, size: 16, seed: 0}}}}
metric: test/dice_2d
label_fractions: [0.5, 1.0]
seeds: [0]
stages:
  global:
    kind: global_pretrain
    temperature: 0.5
    max_epochs: 1
    batch_size_per_worker: 8
    model: &unet {{features: [8, 16, 32], norm: instance}}
  local:
    kind: local_pretrain
    loss: supervised
    mode: stride
    stride: 2
    max_epochs: 1
    batch_size_per_worker: 4
    model: *unet
  finetune:
    kind: seg_finetune
    max_epochs: 1
    batch_size_per_worker: 4
    augment: false
    model: *unet
methods:
  random: [finetune]
  global: [global, finetune]
  global+local: [global, local, finetune]
scaling: {{num_workers: 1, cpus_per_worker: 1, max_failures: 0}}
max_concurrent_trials: 2
tracking: {{experiment: runs, workdir: {root}}}
storage_path: {root}/runs
"""


def _pipeline_file(root: Path) -> Path:
    path = root / "tiny.yaml"
    path.write_text(textwrap.dedent(PIPELINE.format(root=root)))
    return path


# ------------------------------------------------------------------ --methods (no Ray) ----
def test_methods_option_keeps_only_the_named_methods(tmp_path):
    cfg = load_pipeline(_pipeline_file(tmp_path), methods=["random", "global"])
    assert list(cfg.methods) == ["random", "global"]


def test_methods_option_names_an_unknown_method(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_pipeline(_pipeline_file(tmp_path), methods=["random", "simclr"])
    (problem,) = info.value.problems
    assert "'simclr'" in problem and "random, global, global+local" in problem


def test_cli_run_with_an_unknown_method_exits_2_before_ray_starts(tmp_path, capsys):
    from medcl.cli import main

    code = main(["run", str(_pipeline_file(tmp_path)), "--methods", "nope", "-q"])
    assert code == 2
    assert "'nope'" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------ end to end (Ray + MLflow) ----
@pytest.mark.ray
def test_pipeline_runs_reports_resumes_and_refuses_a_changed_plan(ray_session, tmp_path):
    from medcl import tracking as mlt
    from medcl.runner.pipeline import run_pipeline
    from medcl.runner.plan import check_resumable

    path = _pipeline_file(tmp_path)
    cfg = load_pipeline(path, methods=["random", "global+local"])
    first = run_pipeline(cfg, config_text=path.read_text())

    # The plan by hand: random -> finetune per fraction; global+local -> one global, then local
    # and finetune per fraction (supervised local uses labels).
    expected = {
        "finetune@seed=0,fraction=0.5", "finetune@seed=0,fraction=1",
        "global@seed=0",
        "global>local@seed=0,fraction=0.5", "global>local@seed=0,fraction=1",
        "global>local>finetune@seed=0,fraction=0.5", "global>local>finetune@seed=0,fraction=1",
    }
    target = mlt.configure_tracking(experiment="runs", workdir=tmp_path)
    children = mlt.search_runs(target, parent_run_id=first.parent_run_id)
    assert set(children["run_name"]) == expected
    assert set(children["status"]) == {"FINISHED"}
    finals = children[children["tags.medcl.role"] == "final"]
    assert set(finals["run_name"]) == {"finetune@seed=0,fraction=0.5", "finetune@seed=0,fraction=1",
                                       "global>local>finetune@seed=0,fraction=0.5",
                                       "global>local>finetune@seed=0,fraction=1"}
    assert finals["metrics.test/dice_2d"].between(0.0, 1.0).all()

    # The report: one row per method and fraction, read back from MLflow; files exist.
    with open(first.csv_path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {(r["method"], float(r["label_fraction"])) for r in rows} == {
        ("random", 0.5), ("random", 1.0), ("global+local", 0.5), ("global+local", 1.0)}
    assert Path(first.png_path).stat().st_size > 0
    assert set(first.checkpoints) == expected
    # Every job's checkpoint is listed in checkpoints.json and tagged on its MLflow run.
    listed = json.loads((tmp_path / "runs" / "tiny-run" / "checkpoints.json").read_text())
    assert listed == first.checkpoints and all(Path(path).is_dir() for path in listed.values())
    # Trial folders are named by job key: wave*/<key with '>' as '+'>/checkpoint_*.
    assert {Path(path).parent.name for path in listed.values()} == {key.replace(">", "+") for key in listed}
    tagged = mlt.search_runs(target, parent_run_id=first.parent_run_id)
    assert dict(zip(tagged["run_name"], tagged["tags.medcl.checkpoint"])) == listed

    # `medcl report` reads the same runs back from MLflow and prints the same table.
    from medcl.cli import main

    out = tmp_path / "report"
    assert main(["report", "--experiment", "runs", "--pipeline", "tiny-run", "--out", str(out),
                 "--tracking-uri", target.tracking_uri, "-q"]) == 0
    with open(out / "label_efficiency_test_dice_2d.csv", newline="") as fh:
        assert list(csv.DictReader(fh)) == rows
    assert (out / "label_efficiency_test_dice_2d.png").stat().st_size > 0

    # Running the same pipeline again resumes: no job runs again, no new MLflow run.
    second = run_pipeline(cfg, config_text=path.read_text())
    assert second.parent_run_id == first.parent_run_id
    again = mlt.search_runs(target, parent_run_id=first.parent_run_id)
    assert sorted(again["run_id"]) == sorted(children["run_id"])
    for key in expected:
        assert second.metrics[key].get("train/loss") == first.metrics[key].get("train/loss")

    # The same name with a changed plan is refused before anything runs, naming what changed.
    longer = load_pipeline(path, overrides=["stages.finetune.max_epochs=2"], methods=["random", "global+local"])
    with pytest.raises(ValueError, match="jobs with other settings: finetune@seed=0,fraction=0.5") as info:
        check_resumable(longer)
    assert "--set name=tiny-run-2" in str(info.value)
    fewer = load_pipeline(path, methods=["random"])
    with pytest.raises(ValueError, match="jobs no longer planned: global"):
        check_resumable(fewer)

    # More methods extend the run: only the new jobs run (from the global checkpoint that
    # exists), under the same parent, and the curve holds all three methods.
    bigger = load_pipeline(path)  # adds the `global` method: its two fine-tuning jobs are new
    assert check_resumable(bigger)
    third = run_pipeline(bigger, config_text=path.read_text())
    assert third.parent_run_id == first.parent_run_id
    extended = mlt.search_runs(target, parent_run_id=first.parent_run_id)
    new = {"global>finetune@seed=0,fraction=0.5", "global>finetune@seed=0,fraction=1"}
    assert set(extended["run_name"]) == expected | new and len(extended) == len(expected) + 2
    assert set(extended[extended["run_name"].isin(expected)]["run_id"]) == set(children["run_id"])
    for key in expected:  # the old jobs were read back, not run again
        assert third.metrics[key].get("train/loss") == first.metrics[key].get("train/loss")
    assert third.checkpoints["global@seed=0"] == first.checkpoints["global@seed=0"]
    with open(third.csv_path, newline="") as fh:
        assert {(r["method"], float(r["label_fraction"])) for r in csv.DictReader(fh)} == {
            (m, f) for m in ("random", "global", "global+local") for f in (0.5, 1.0)}
    plan = json.loads((tmp_path / "runs" / "tiny-run" / "plan.json").read_text())
    assert plan["groups"][1] == sorted(new)
    assert (tmp_path / "runs" / "tiny-run" / "wave1-ext1").is_dir()
    assert not (tmp_path / "runs" / "tiny-run" / "wave0-ext1").exists()  # no new job at depth 0


def test_progress_counts_only_the_jobs_left_of_a_resumed_or_extended_run(tmp_path):
    from medcl.runner.pipeline import jobs_left

    cfg = load_pipeline(_pipeline_file(tmp_path))  # 3 methods x 2 fractions: 1 global, 2 local, 6 fine-tunes
    assert jobs_left(cfg) == 9
    run = tmp_path / "runs" / "tiny-run"
    run.mkdir(parents=True)
    (run / "checkpoints.json").write_text(json.dumps({"global@seed=0": "/x", "finetune@seed=0,fraction=1": "/y",
                                                      "gone@seed=0": None}))
    assert jobs_left(cfg) == 7


def test_trial_folders_are_named_by_job_key_and_stay_unique():
    from types import SimpleNamespace

    from medcl.runner.tuner import trial_dirname

    def name(config):
        return trial_dirname(SimpleNamespace(config=config, trial_id="ab12c_00003"))

    assert name({"job": "global>local_stride>finetune@seed=0,fraction=0.01"}) == \
        "global+local_stride+finetune@seed=0,fraction=0.01"
    assert name({"job": "finetune@seed=1,fraction=1"}) == "finetune@seed=1,fraction=1"
    # A sweep's trial (no job) keeps its trial id; unsafe characters get the id as a suffix.
    assert name({"lr": 0.1}) == "ab12c_00003"
    assert name({"job": "a b/c+d>finetune@seed=0"}) == "a_b_c_d+finetune@seed=0-ab12c_00003"


def test_the_after_wave_hook_overlaps_the_next_wave_in_order_and_finishes_before_the_end():
    import threading

    from medcl.runner.pipeline import _BackgroundHook

    calls, main = [], threading.get_ident()
    release = threading.Event()

    def hook(wave):
        if wave == 0:
            assert release.wait(10)  # still running while the "next wave" (the with block) goes on
        calls.append((wave, threading.get_ident() != main))

    with _BackgroundHook(hook) as background:
        background.submit(0)
        assert calls == []           # submit did not wait for the hook
        release.set()
        background.submit(1)         # waits for wave 0's call first
        assert calls[0] == (0, True)
    assert calls == [(0, True), (1, True)]  # the last call finished before the block ended

    def failing(wave):
        raise OSError(f"store down at wave {wave}")

    with pytest.raises(OSError, match="wave 0"):
        with _BackgroundHook(failing) as background:
            background.submit(0)
    # A block that raises still lets the pending call finish, and keeps its own error.
    done = []
    with pytest.raises(KeyError):
        with _BackgroundHook(lambda: (release.wait(0.2), done.append(1))) as background:
            background.submit()
            raise KeyError("wave failed")
    assert done == [1]
    with _BackgroundHook(None) as background:  # no hook: nothing to run
        background.submit(0)
