"""Ctrl-C during ``medcl run``: exit 130, nothing unfinished marked finished or handed on, a resume that finishes.

The end-to-end test sends SIGINT to a real ``medcl run`` process group (as a
terminal's Ctrl-C does) while a job of wave 0 is mid-stage, then runs the same
command again. Expectations are written out by hand: the jobs the plan
implies, one MLflow point per configured epoch, one kept checkpoint per job.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

EPOCHS = 6
PIPELINE = """\
name: ctrl-c
dataset: {{path: {root}/data, source: synthetic, options: {{num_patients: 12, images_per_patient: 4, size: 16, seed: 0}}}}
metric: test/dice_2d
label_fractions: [1.0]
seeds: [0]
stages:
  global: {{kind: global_pretrain, temperature: 0.5, max_epochs: {epochs}, batch_size_per_worker: 8,
            model: &unet {{features: [8, 16, 32], norm: instance}}}}
  finetune: {{kind: seg_finetune, max_epochs: {epochs}, batch_size_per_worker: 4, augment: false, model: *unet}}
methods: {{random: [finetune], global: [global, finetune]}}
scaling: {{num_workers: 1, cpus_per_worker: 1, max_failures: 0}}
max_concurrent_trials: 2
tracking: {{experiment: runs, workdir: {root}}}
storage_path: {root}/runs
"""
# The plan by hand: random -> one fine-tuning; global -> pretraining, then fine-tuning from it.
JOBS = {"finetune@seed=0,fraction=1": 0, "global@seed=0": 0, "global>finetune@seed=0,fraction=1": 1}


class _Trial:
    def __init__(self, trial_id: str, status: str = "RUNNING") -> None:
        self.trial_id, self.status = trial_id, status


# ------------------------------------------------------------------ the drain, without Ray ----
# (result after a Ctrl-C, decision, parked at once, parked after its checkpoint is saved)
DECISIONS = [
    ({"epoch": 1.0, "max_epochs": 6.0, "should_checkpoint": True}, "NOOP", False, True),   # inline epoch
    ({"epoch": 1.0, "max_epochs": 6.0}, "CONTINUE", False, False),                        # no checkpoint yet
    ({"epoch": 5.0, "max_epochs": 6.0, "should_checkpoint": True}, "CONTINUE", False, False),  # last epoch
    ({"epoch": 1.0, "max_epochs": 6.0, "checkpoint_path": "/x"}, "NOOP", True, True),      # TorchTrainer report
]


@pytest.mark.parametrize("result, decision, parked_now, parked_after_save", DECISIONS)
def test_a_ctrl_c_parks_a_trial_at_its_next_checkpoint(result, decision, parked_now, parked_after_save):
    from medcl.runner.interrupt import Drain

    drain = Drain()
    trial = _Trial("t1")
    assert drain.scheduler.on_trial_result(None, trial, dict(result)) == "CONTINUE"  # before any Ctrl-C
    drain.requested = True
    assert drain.scheduler.on_trial_result(None, trial, dict(result)) == decision
    assert ("t1" in drain.parked) == parked_now
    drain.callback.on_trial_save(0, [], trial)
    assert ("t1" in drain.parked) == parked_after_save
    assert drain.scheduler.choose_trial_to_run(None) is None  # nothing starts after a Ctrl-C


def test_the_run_stops_once_every_running_trial_is_parked():
    from medcl.runner.interrupt import Drain

    received = []
    previous = signal.signal(signal.SIGUSR1, lambda *_: received.append("SIGUSR1"))
    try:
        drain = Drain()
        trials = [_Trial("a"), _Trial("b"), _Trial("c", "TERMINATED"), _Trial("d", "PENDING")]
        drain.callback.on_step_end(0, trials)
        drain.on_sigint(signal.SIGINT, None)  # first Ctrl-C: a request, no stop yet
        drain.park("a", will_save=False)
        drain.callback.on_step_end(1, trials)
        assert received == []  # b still runs
        drain.park("b", will_save=True)
        drain.callback.on_step_end(2, trials)
        assert received == []  # b's checkpoint is not saved yet
        drain.callback.on_trial_save(3, trials, trials[1])
        drain.callback.on_step_end(3, trials)
        drain.callback.on_step_end(4, trials)
        assert received == ["SIGUSR1"]  # once
        with pytest.raises(KeyboardInterrupt):  # the second press went to Tune; a third one raises
            drain.forced = True
            drain.on_sigint(signal.SIGINT, None)
    finally:
        signal.signal(signal.SIGUSR1, previous)


# ------------------------------------------------------------------ a wave's broken Tune state ----
def _noop_trainable(config):
    return None


@pytest.mark.parametrize("content", [b"", b"\x80\x04garbage"])
def test_an_empty_tuner_pkl_starts_the_wave_afresh(tmp_path, content):
    from medcl.runner.tuner import open_tuner

    (tmp_path / "wave1").mkdir()
    (tmp_path / "wave1" / "tuner.pkl").write_bytes(content)
    tuner = open_tuner(_noop_trainable, str(tmp_path), "wave1", param_space={"job": 1}, tune_options={},
                       callbacks=[], max_failures=0)
    assert (tmp_path / "wave1" / "tuner.pkl").stat().st_size > 0  # a new Tuner wrote its state
    assert tuner is not None


def test_an_unreadable_tuner_pkl_of_a_wave_that_ran_names_what_to_delete(tmp_path):
    from medcl.runner.tuner import open_tuner

    (tmp_path / "wave1").mkdir()
    (tmp_path / "wave1" / "tuner.pkl").write_bytes(b"")
    (tmp_path / "wave1" / "experiment_state-2026-01-01_00-00-00.json").write_text("{}")
    with pytest.raises(ValueError, match=rf"tuner.pkl is unreadable \(EOFError.*delete {tmp_path}/wave1 "):
        open_tuner(_noop_trainable, str(tmp_path), "wave1", param_space={"job": 1}, tune_options={},
                   callbacks=[], max_failures=0)


# ------------------------------------------------------------------ Ctrl-C on a real `medcl run` ----
def _medcl_run(root: Path, log: Path) -> subprocess.Popen:
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", MLFLOW_DISABLE_TELEMETRY="true")
    with open(log, "w") as err:
        # Its own process group: the SIGINT goes to medcl and every process it started, as Ctrl-C in a terminal.
        return subprocess.Popen([sys.executable, "-m", "medcl.cli", "run", str(root / "p.yaml")], cwd=root, env=env,
                                stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True)


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_ctrl_c_mid_wave_exits_130_and_the_same_command_finishes_the_run(tmp_path):
    from medcl import tracking as mlt

    (tmp_path / "p.yaml").write_text(textwrap.dedent(PIPELINE.format(root=tmp_path, epochs=EPOCHS)))
    log = tmp_path / "first.log"
    proc = _medcl_run(tmp_path, log)
    try:
        deadline = time.monotonic() + 400
        while ": epoch 2/" not in log.read_text():  # a wave-0 job is mid-stage (progress lines)
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)
        proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    err = log.read_text()
    assert proc.returncode == 130, err[-3000:]
    assert "interrupted in wave 0" in err and "run the same command again" in err
    assert "wave 1:" not in err and not (tmp_path / "runs" / "ctrl-c" / "wave1").exists()  # nothing handed on

    target = mlt.configure_tracking(experiment="runs", workdir=tmp_path)
    client = target.client()
    parent = mlt.find_parent_run(target, "ctrl-c")
    assert client.get_run(parent).info.status == "KILLED"
    children = mlt.search_runs(target, parent_run_id=parent)
    status = dict(zip(children["run_name"], children["status"]))
    epochs = {name: [m.step for m in client.get_metric_history(run_id, "epoch")]
              for name, run_id in zip(children["run_name"], children["run_id"])}
    assert set(status) <= {k for k, depth in JOBS.items() if depth == 0}
    assert set(status.values()) <= {"FINISHED", "KILLED"} and "KILLED" in status.values()
    for name, state in status.items():  # a KILLED job stopped mid-stage; a FINISHED one has every epoch
        assert epochs[name] == list(range(EPOCHS if state == "FINISHED" else len(epochs[name])))
        assert state == "FINISHED" or len(epochs[name]) < EPOCHS

    proc = _medcl_run(tmp_path, tmp_path / "second.log")
    out, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, (tmp_path / "second.log").read_text()[-3000:]
    assert client.get_run(parent).info.status == "FINISHED"
    children = mlt.search_runs(target, parent_run_id=parent)
    assert sorted(children["run_name"]) == sorted(JOBS)  # one run per job, the same jobs as a run never stopped
    assert set(children["status"]) == {"FINISHED"}
    for run_id in children["run_id"]:  # each job trained exactly its epochs, each logged once
        for key in ("epoch", "train/loss"):
            assert [m.step for m in client.get_metric_history(run_id, key)] == list(range(EPOCHS)), key
    assert {line.split()[0] for line in out.splitlines() if "100%" in line} == {"global", "random"}

    # Disk: each job keeps one checkpoint (its latest), not one per epoch.
    for depth in (0, 1):
        trials = [d for d in (tmp_path / "runs" / "ctrl-c" / f"wave{depth}").iterdir() if d.is_dir()]
        assert len(trials) == sum(1 for d in JOBS.values() if d == depth)
        for trial in trials:
            assert len(list(trial.glob("checkpoint_*"))) == 1, sorted(p.name for p in trial.iterdir())
