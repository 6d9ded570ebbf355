"""Runtime failures: a NaN loss fails its job once, the parent run ends FAILED, a failed start-up records nothing.

Real Ray, real MLflow (sqlite), a tiny synthetic cohort (12 patients of 4 slices at 16 px). A learning
rate of 1e30 makes the loss non-finite from the second optimiser step: the same on every try, so
retrying (``max_failures: 2`` here) cannot help. Attempts are counted by Tune (the trial's failures)
and, on a ``TorchTrainer``, by the workers' contexts themselves (a file line per worker start).
"""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]

PIPELINE = """\
name: nan-run
dataset:
  path: {root}/data
  source: synthetic
  options: {{num_patients: {patients}, images_per_patient: 4, size: 16, seed: 0}}
metric: test/dice_2d
label_fractions: [1.0]
seeds: [0]
stages:
  finetune:
    kind: seg_finetune
    lr: 1.0e+30
    max_epochs: 1
    batch_size_per_worker: 4
    augment: false
    model: {{features: [8, 16], norm: instance}}
methods:
  random: [finetune]
scaling: {{num_workers: 1, cpus_per_worker: 1, max_failures: 2}}
tracking: {{experiment: errors, workdir: {root}}}
storage_path: {root}/runs
"""


def _pipeline_file(root: Path, patients: int = 12) -> Path:
    path = root / "nan.yaml"
    path.write_text(textwrap.dedent(PIPELINE.format(root=root, patients=patients)))
    return path


def test_a_nan_loss_fails_its_job_once_naming_it_and_the_parent_run_ends_failed(ray_session, tmp_path):
    from ray import tune

    from medcl import tracking as mlt
    from medcl.config.pipeline import load_pipeline
    from medcl.runner.pipeline import run_pipeline

    with pytest.raises(RuntimeError) as info:
        run_pipeline(load_pipeline(_pipeline_file(tmp_path)), report=False)
    message = str(info.value)  # what `medcl run` prints after "medcl run: error: "
    assert message.startswith("1 job(s) of wave 0 failed and were not retried")
    assert "Traceback" not in message
    # the job, the step and the stage's settings
    assert "job finetune@seed=0,fraction=1: non-finite loss (" in message
    assert "at step 1 of epoch 0 (optimiser step 1) of stage seg_finetune with " in message
    assert "lr=1e+30" in message and "batch_size_per_worker=4" in message

    # Tune ran the job once: no failure was counted, so none was retried (max_failures: 2)
    (trial,) = tune.ExperimentAnalysis(str(tmp_path / "runs" / "nan-run" / "wave0")).trials
    assert trial.num_failures == 0

    # MLflow: the job's run and the pipeline's run ended FAILED, none is left RUNNING
    target = mlt.configure_tracking(experiment="errors", workdir=tmp_path)
    parent = mlt.find_parent_run(target, "nan-run")
    assert target.client().get_run(parent).info.status == "FAILED"
    children = mlt.search_runs(target, parent_run_id=parent)
    assert list(children["run_name"]) == ["finetune@seed=0,fraction=1"]
    assert list(children["status"]) == ["FAILED"]


def test_a_run_that_fails_at_start_up_records_nothing(ray_session, tmp_path):
    from medcl import tracking as mlt
    from medcl.config.pipeline import load_pipeline
    from medcl.runner.pipeline import run_pipeline

    # 2 patients: one in train, one in val, none in test, so the evaluation stream selects no rows
    cfg = load_pipeline(_pipeline_file(tmp_path, patients=2))
    with pytest.raises(ValueError, match="selects no rows"):
        run_pipeline(cfg)
    assert not (tmp_path / "runs" / "nan-run").exists()  # no plan.json (nor lock): the name is free
    target = mlt.configure_tracking(experiment="errors", workdir=tmp_path)
    assert mlt.find_parent_run(target, "nan-run") is None  # and no MLflow run to resume


def _counting_context(log: Path):
    """A ``RayTrainContext`` that appends a line to ``log`` each time a worker starts the loop (by value to workers)."""
    from medcl.train.context import RayTrainContext

    class Counting(RayTrainContext):
        def __init__(self) -> None:
            super().__init__()
            with open(log, "a") as fh:
                fh.write(f"rank {self.world_rank}\n")

    return Counting


def test_a_nan_loss_on_a_torch_trainer_is_not_restarted(ray_session, tmp_path):
    from medcl.config import ScalingSpec, SegFinetuneConfig, UNetSpec
    from medcl.data.ingest import ingest
    from medcl.train.driver import run_stage

    data = tmp_path / "data"
    ingest("synthetic", None, data, {"num_patients": 12, "images_per_patient": 4, "size": 16, "seed": 0})
    cfg = SegFinetuneConfig(lr=1e30, max_epochs=1, batch_size_per_worker=4, augment=False,
                            model=UNetSpec(features=(8, 16), norm="instance"))
    log = tmp_path / "starts.txt"
    with pytest.raises(FloatingPointError) as info:  # medcl.train.loop.NonFiniteLossError
        run_stage(cfg, data, scaling=ScalingSpec(num_workers=1, max_failures=2), storage_path=tmp_path / "runs",
                  name="nan", worker_context=_counting_context(log))
    assert log.read_text().splitlines() == ["rank 0"]  # one worker start: Ray Train did not restart the group
    message = str(info.value)
    assert message.startswith("Train run nan: non-finite loss (")
    assert "at step 1 of epoch 0 (optimiser step 1) of stage seg_finetune with " in message and "lr=1e+30" in message
