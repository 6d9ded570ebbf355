"""Sweeps (``medcl.runner.sweep``): sweep-file validation, an ASHA sweep, and an interrupted chain sweep resumed.

Real Ray (the session fixture) and real MLflow (SQLite under tmp_path) on a
12-patient synthetic cohort of 16 px slices, 1-2 epoch stages, a 3-level U-Net.
Expectations are written out by hand: which trials exist, which one ASHA must
stop (see the ASHA test), which trials and stages may run again after a resume
(none that had finished, and no finished epoch).
"""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from ray.tune import Callback

from medcl.config.binder import ConfigError
from medcl.config.sweep import load_sweep
from medcl.runner.stage_tags import STAGE_TAG_FILE
from medcl.runner.sweep import run_sweep

REPO = Path(__file__).resolve().parents[2]

PIPELINE = """\
name: tiny
dataset: {{path: {data}}}
metric: test/dice_2d
label_fractions: [0.5]
seeds: [0]
stages:
  global:
    kind: global_pretrain
    temperature: 0.5
    max_epochs: {global_epochs}
    batch_size_per_worker: 8
    lr: 1.0e-3
    model: &unet {{features: [8, 16, 32], norm: instance}}
  finetune:
    kind: seg_finetune
    max_epochs: {finetune_epochs}
    batch_size_per_worker: 4
    augment: false
    model: *unet
methods:
  random: [finetune]
  global: [global, finetune]
scaling: {{num_workers: 1, cpus_per_worker: 1, max_failures: 0}}
tracking: {{experiment: sweeps, workdir: {root}}}
storage_path: {root}/runs
"""


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    from medcl.data.ingest import ingest

    out = tmp_path_factory.mktemp("sweep-data") / "synthetic"
    ingest("synthetic", None, out, {"num_patients": 12, "images_per_patient": 4, "size": 16, "seed": 0})
    return out


def _files(root: Path, data: Path, sweep: str, global_epochs: int = 1, finetune_epochs: int = 1) -> Path:
    (root / "pipe.yaml").write_text(PIPELINE.format(data=data, root=root, global_epochs=global_epochs,
                                                    finetune_epochs=finetune_epochs))
    path = root / "sweep.yaml"
    path.write_text(textwrap.dedent(sweep))
    return path


def _problems(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_sweep(path)
    return info.value.problems


# ------------------------------------------------------------------ validation (no Ray) ----
def test_every_problem_of_a_sweep_file_is_reported_with_its_key_path(tmp_path, dataset):
    path = _files(tmp_path, dataset, """\
        name: bad
        pipeline: pipe.yaml
        method: global
        metric: best/val/dice_2d
        mode: max
        num_sampels: 2
        space:
          stages.global.temperature: {loguniform: [0.0, 1.0]}
          stages.finetune.lr: {uniform: [0.01, 0.001]}
          stages.global.temprature: {grid: [0.1]}
          stages.local.temperature: {grid: [0.1]}
          label_fraction: {choice: [0.5, 1.5]}
          stages.global.lr: {normal: [0, 1]}
          stages.global.batch_size_per_worker: {uniform: [2, 8]}
          stages.finetune.seed: {grid: [1]}
          learning_rate: {grid: [1]}
          stages.global.max_epochs: [1, 2]
    """)
    problems = _problems(path)
    expected = [
        "num_sampels: unknown key (did you mean 'num_samples'?)",
        "space.stages.global.temperature.loguniform: low must be > 0",
        "space.stages.finetune.lr.uniform: low must be < high, got low=0.01, high=0.001",
        "space.stages.global.temprature: stage 'global' (global_pretrain) has no key 'temprature' "
        "(did you mean 'temperature'?)",
        "space.stages.local.temperature: the pipeline has no stage 'local'",
        "space.label_fraction: choice value 1.5 is not valid: stages.finetune.label_fraction: must be in (0, 1]",
        "space.stages.global.lr: unknown distribution 'normal'",
        "space.stages.global.batch_size_per_worker: uniform value 2.0 is not valid",
        "space.stages.finetune.seed: seed is set for every stage of a trial",
        "space.learning_rate: unknown key",
        "space.stages.global.max_epochs: expected one distribution",
    ]
    for text in expected:
        assert sum(text in p for p in problems) == 1, f"{text!r} not reported once in:\n" + "\n".join(problems)
    assert len(problems) == len(expected)


@pytest.mark.parametrize("body, messages", [
    # ASHA on a metric that only exists after the last epoch, over a whole chain.
    ("method: global\nmetric: best/val/dice_2d\nmode: max\nscheduler: {asha: {grace_period: 1}}",
     ["scheduler.asha: ASHA compares trials at the same epoch of one stage; sweep a single stage",
      "scheduler.asha: ASHA stops trials by comparing them every epoch and needs a metric reported every epoch, "
      "such as train/loss or val/dice_2d; 'best/val/dice_2d' is only reported after the last epoch"]),
    # A pretraining stage alone reports no test metric; one epoch leaves no rung before the last.
    ("stage: global\nmetric: best/val/dice_2d\nmode: max\nscheduler: {asha: {max_t: 5}}",
     ["metric: 'best/val/dice_2d' is reported by fine-tuning stages after their last epoch",
      "scheduler.asha: ASHA stops trials by comparing them every epoch",
      "scheduler.asha: grace_period 1 leaves no rung before the training_iteration of the last epoch of "
      "stage 'global' (1, max_epochs=1)"]),
    # A rung at (or after) the last epoch could only stop finished trials.
    ("stage: global\nmetric: train/loss\nmode: min\nscheduler: {asha: {max_t: 1, time_attr: epoch}}\n"
     "overrides: [stages.global.max_epochs=2]",
     ["scheduler.asha: grace_period 1 leaves no rung before the epoch of the last epoch of stage 'global' (1"]),
    ("stage: global\nmetric: train/loss\nmode: min\nscheduler: {asha: {max_t: 3}}\n"
     "overrides: [stages.global.max_epochs=3]",
     ["scheduler.asha.max_t: 3 must be below the training_iteration of the last epoch of stage 'global' (3, "
      "max_epochs=3)"]),
    # Neither or both of method/stage; a sweep of a stage the method does not run; a loss maximised.
    ("method: random\nstage: global\nmetric: train/loss\nmode: max",
     ["method, stage: give exactly one", "mode: 'max' would pick the largest train/loss; use mode: min"]),
    ("method: random\nmetric: best/val/dice_2d\nmode: max",
     ["space.stages.global.temperature: stage 'global' is not run by this sweep, which runs finetune"]),
    ("method: nope\nmetric: best/val/dice_2d\nmode: max\npipeline: missing.yaml",
     ["pipeline: missing.yaml not found"]),
])
def test_scheduler_metric_and_target_errors(tmp_path, dataset, body, messages):
    text = "name: s\npipeline: pipe.yaml\nspace:\n  stages.global.temperature: {grid: [0.1, 0.2]}\n"
    if "pipeline:" in body:
        text = text.replace("pipeline: pipe.yaml\n", "")
    path = _files(tmp_path, dataset, text + body + "\n")
    problems = _problems(path)
    for message in messages:
        assert any(message in p for p in problems), f"{message!r} not in:\n" + "\n".join(problems)
    assert len(problems) == len(messages), "\n".join(problems)


def test_cli_validate_reports_errors_and_accepts_shipped_spaces(tmp_path, dataset, capsys, monkeypatch):
    from medcl.cli import main

    path = _files(tmp_path, dataset, """\
        name: s
        pipeline: pipe.yaml
        stage: global
        metric: train/loss
        mode: min
        space: {stages.global.temperature: {loguniform: [1.0, 0.1]}}
    """)
    assert main(["validate", str(path)]) == 2
    assert "space.stages.global.temperature.loguniform: low must be < high" in capsys.readouterr().err
    # The shipped spaces validate from the repository root (the hippocampus one needs the MSD task).
    monkeypatch.chdir(REPO)
    expected = {"quickstart_temperature.yaml": (("global", "finetune"), 3),
                "global_asha.yaml": (("global",), 8)}
    if (REPO.parent / "shared" / "data" / "Task04_Hippocampus").is_dir():
        expected["local_block.yaml"] = (("global", "local_block", "finetune"), 9)
    for name, (chain, trials) in expected.items():
        sweep = load_sweep(REPO / "tune_spaces" / name)
        assert (sweep.chain, sweep.num_trials()) == (chain, trials)
    assert load_sweep(REPO / "tune_spaces" / "global_asha.yaml").asha.max_t == 7  # just before the last epoch


def test_command_line_overrides_and_resume_guard(tmp_path, dataset):
    from medcl.runner.sweep import _check_resumable

    path = _files(tmp_path, dataset, """\
        name: s
        pipeline: pipe.yaml
        method: global
        metric: best/val/dice_2d
        mode: max
        space: {stages.global.temperature: {grid: [0.1, 0.2]}, seed: {choice: [0, 1]}}
    """)
    # `--set space.stages.global.temperature.grid=[0.3]` replaces the file's entry for that key.
    changed = load_sweep(path, overrides=["space.stages.global.temperature.grid=[0.3]", "num_samples=2"])
    assert changed.space["stages.global.temperature"].values == (0.3,) and changed.num_trials() == 2
    assert changed.space["seed"].values == (0, 1)
    # Resuming a sweep whose space changed since it started is refused, naming what changed.
    sweep = load_sweep(path)
    sidecar = {"fingerprint": sweep.fingerprint()}
    _check_resumable(sweep, "runs/s", sidecar, started=True, resume=True)  # same configuration: fine
    with pytest.raises(ValueError, match=r"started with another configuration \(changed: search, space\)"):
        _check_resumable(changed, "runs/s", sidecar, started=True, resume=True)
    with pytest.raises(ValueError, match=r"already exists at runs/s; continue it with .*--resume.*--set name=s-2"):
        _check_resumable(sweep, "runs/s", sidecar, started=True, resume=False)
    with pytest.raises(ValueError, match="nothing to resume"):
        _check_resumable(sweep, "runs/s", None, started=False, resume=True)


# ------------------------------------------------------------------ sweeps on Ray ----
class _Counter(Callback):
    """Tune callback (in the driver) recording the value of one swept key at each trial start."""

    def __init__(self, key: tuple[str, ...]):
        self.key = key
        self.starts: list = []

    def on_trial_start(self, iteration, trials, trial, **info):
        node = trial.config
        for part in self.key:
            node = node[part]
        self.starts.append(node)


def _client(root: Path):
    from medcl import tracking as mlt

    return mlt.configure_tracking(experiment="sweeps", workdir=root)


@pytest.mark.ray
@pytest.mark.timeout(480)
def test_asha_sweep_logs_one_run_per_trial_and_ends_the_stopped_one(ray_session, tmp_path, dataset):
    # The metric train/lr makes ASHA's decision known in advance: trials run one at a time
    # (lr 1e-4 first); at rung 1 (after epoch 1 of 2) the cosine schedule stands at half of
    # each lr, so the second trial (0.5e-2 > 0.5e-4) is below the cut-off and stopped.
    from medcl import tracking as mlt

    path = _files(tmp_path, dataset, """\
        name: asha
        pipeline: pipe.yaml
        stage: global
        metric: train/lr
        mode: min
        space: {stages.global.lr: {grid: [1.0e-4, 1.0e-2]}}
        scheduler: {asha: {grace_period: 1, reduction_factor: 2}}
        max_concurrent_trials: 1
    """, global_epochs=2)
    counter = _Counter(("stages", "global", "lr"))
    result = run_sweep(load_sweep(path), callbacks=[counter])
    assert counter.starts == [1e-4, 1e-2]

    target = _client(tmp_path)
    runs = mlt.search_runs(target, parent_run_id=result.parent_run_id)
    assert len(runs) == 2
    assert set(runs["tags.medcl.role"]) == {"trial"}
    status = dict(zip(runs["params.stages.global.lr"].astype(float), runs["status"]))
    assert status == {1e-4: "FINISHED", 1e-2: "KILLED"}
    client = target.client()
    for run_id, lr in zip(runs["run_id"], runs["params.stages.global.lr"].astype(float)):
        history = client.get_metric_history(run_id, "train/loss")
        assert [m.step for m in history][:1] == [0]  # per-epoch metrics from the stage loop
        if lr == 1e-4:
            assert [m.step for m in history] == [0, 1]
    parent = client.get_run(result.parent_run_id)
    assert (parent.info.status, parent.data.tags["medcl.role"]) == ("FINISHED", "sweep")
    assert result.best is not None and result.best.values == {"stages.global.lr": 1e-4}
    summary = result.summary()
    assert f"best: trial {result.best.trial_id}, train/lr = " in summary
    assert "KILLED" in summary and "FINISHED" in summary


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_interrupted_chain_sweep_resumes_without_running_anything_twice(ray_session, tmp_path, dataset, capsys):
    import ray

    from medcl import tracking as mlt
    from medcl.cli import main

    marker = tmp_path / "killed"

    class KillOnce(Callback):
        """Kill the process of the trial of temperature 0.5 once it saved the first of 2 epochs of its 2nd stage."""

        def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
            hot = trial.config["stages"]["global"]["temperature"] == 0.5
            tag = json.loads((Path(checkpoint.path) / STAGE_TAG_FILE).read_text())
            if hot and (tag["stage_index"], tag["epoch"]) == (1, 0) and not marker.exists():
                marker.touch()
                ray.kill(trial.temporary_state.ray_actor, no_restart=True)

    path = _files(tmp_path, dataset, """\
        name: chain
        pipeline: pipe.yaml
        method: global
        metric: best/val/dice_2d
        mode: max
        space: {stages.global.temperature: {grid: [0.2, 0.5]}}
        max_concurrent_trials: 2
        max_failures: 0
    """, finetune_epochs=2)
    sweep = load_sweep(path)
    first = run_sweep(sweep, callbacks=[KillOnce()])
    assert marker.exists()
    assert [(t.values["stages.global.temperature"], t.status) for t in first.trials] == [(0.2, "FINISHED"),
                                                                                         (0.5, "ERROR")]
    assert "--resume" in first.summary()
    with pytest.raises(ValueError, match="already exists.*--resume"):
        run_sweep(sweep)

    target = _client(tmp_path)
    client = target.client()
    assert client.get_run(first.parent_run_id).info.status == "FAILED"
    cold = mlt.search_runs(target, parent_run_id=first.parent_run_id, filter=f"attributes.run_name = "
                           f"'{first.trials[0].trial_id}'")
    cold_end = client.get_run(cold["run_id"].item()).info.end_time

    counter = _Counter(("stages", "global", "temperature"))
    second = run_sweep(sweep, resume=True, callbacks=[counter])
    assert counter.starts == [0.5]  # only the killed trial runs again
    assert [t.status for t in second.trials] == ["FINISHED", "FINISHED"]
    assert second.parent_run_id == first.parent_run_id and not second.errors

    trials = mlt.search_runs(target, parent_run_id=second.parent_run_id)
    assert sorted(trials["run_name"]) == sorted(t.trial_id for t in second.trials)  # one run per trial
    assert set(trials["status"]) == {"FINISHED"}
    assert trials["metrics.best/val/dice_2d"].notna().all() and trials["metrics.global/train/loss"].notna().all()
    assert trials["metrics.test/dice_2d"].notna().all() and trials["metrics.best/test/dice_2d"].notna().all()
    assert client.get_run(cold["run_id"].item()).info.end_time == cold_end  # the finished trial was not touched
    for trial_run, trial_id in zip(trials["run_id"], trials["run_name"]):
        stages = mlt.search_runs(target, parent_run_id=trial_run)
        assert sorted(stages["run_name"]) == [f"{trial_id}/0-global", f"{trial_id}/1-finetune"]
        assert set(stages["status"]) == {"FINISHED"}
        by_name = dict(zip(stages["run_name"], stages["run_id"]))
        # Each epoch of each stage ran once, also in the killed trial: its first stage (complete
        # when it was killed) was skipped, its second resumed at epoch 1 from its own checkpoint.
        history = {name: [m.step for m in client.get_metric_history(run_id, "train/loss")]
                   for name, run_id in by_name.items()}
        assert history == {f"{trial_id}/0-global": [0], f"{trial_id}/1-finetune": [0, 1]}
        # Fine-tuning started from the first stage's final checkpoint: the trial's first (1 epoch).
        init_from = client.get_run(by_name[f"{trial_id}/1-finetune"]).data.tags["medcl.init_from"]
        assert init_from == str(tmp_path / "runs" / "sweeps" / "chain" / "tune" / trial_id / "checkpoint_000000")

    # Resuming a finished sweep runs nothing and prints the same table (through the CLI).
    capsys.readouterr()
    assert main(["sweep", str(path), "--resume", "-q"]) == 0
    out = capsys.readouterr().out
    assert "sweep chain: 2 trials (2 finished), metric best/val/dice_2d (max)" in out
    assert all(t.trial_id in out for t in second.trials)
    assert len(mlt.search_runs(target, parent_run_id=second.parent_run_id)) == 2
