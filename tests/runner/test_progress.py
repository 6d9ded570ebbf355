"""Progress lines: one per epoch, also when a stage on a TorchTrainer reports its last epoch twice."""
from __future__ import annotations

import io
import types

from medcl.runner.progress import ProgressCallback


def test_a_repeated_epoch_report_prints_once_and_a_new_stage_prints_again():
    out = io.StringIO()
    callback = ProgressCallback(stream=out)
    trial = types.SimpleNamespace(trial_id="t1", config={"job": "global@seed=0", "max_epochs": 2})
    callback.on_trial_start(0, [], trial)
    # epoch 0, epoch 1, the hand-over report of epoch 1 again, then the next stage's first epoch
    for result in ({"epoch": 0, "train/loss": 2.0}, {"epoch": 1, "train/loss": 1.5},
                   {"epoch": 1, "train/loss": 1.5, "stage_index": 0}, {"epoch": 0, "train/loss": 3.0}):
        callback.on_trial_result(0, [], trial, result)
    lines = [line.strip() for line in out.getvalue().splitlines()]
    assert lines[0] == "[start] global@seed=0"
    assert [line.split(" loss")[0] for line in lines[1:]] == [
        "global@seed=0: epoch 1/2", "global@seed=0: epoch 2/2", "global@seed=0: epoch 1/2"]


def test_finished_trials_show_the_runs_done_total_elapsed_and_eta(monkeypatch):
    import medcl.runner.progress as progress

    clock = [1000.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    out = io.StringIO()
    callback = ProgressCallback(stream=out, total=4, quiet=True)
    a = types.SimpleNamespace(trial_id="a", config={"job": "finetune@seed=0"})
    b = types.SimpleNamespace(trial_id="b", config={"job": "finetune@seed=1"})
    callback.on_trial_start(0, [], a)
    callback.on_trial_start(0, [], b)
    clock[0] += 100.0                      # two trials side by side, 100 s each
    callback.on_trial_complete(0, [], a)
    callback.on_trial_complete(0, [], b)
    c = types.SimpleNamespace(trial_id="c", config={"job": "finetune@seed=2"})
    callback.on_trial_start(0, [], c)
    clock[0] += 3700.0
    callback.on_trial_complete(0, [], c)
    lines = out.getvalue().splitlines()
    # after 1 of 4 in 100 s: 3 more at 100 s a trial -> 300 s; after 2 of 4: 50 s a trial -> 100 s
    assert lines[0] == "[done 1/4] finetune@seed=0 in 100s (run: 1m40s, ~5m00s to go)"
    assert lines[1] == "[done 2/4] finetune@seed=1 in 100s (run: 1m40s, ~1m40s to go)"
    # 3 of 4 in 3800 s: ~1267 s to go
    assert lines[2] == "[done 3/4] finetune@seed=2 in 3700s (run: 1h03m, ~21m07s to go)"


def test_ray_and_mlflow_set_up_lines_stay_off_the_terminal(tmp_path):
    """A Ray Data execution and a new sqlite store print nothing below WARNING once quieted (a fresh process)."""
    import subprocess
    import sys

    script = f"""
import os
os.environ.pop("MLFLOW_TRACKING_URI", None)
from medcl.runner.session import init_ray, quiet_ray_logging
quiet_ray_logging()
init_ray(num_cpus=1)
import ray
ray.data.range(4).materialize()
from medcl.tracking import configure_tracking
configure_tracking(workdir={str(tmp_path)!r}, experiment="quiet")
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr
    assert "Progress bars disabled" not in proc.stderr
    assert "Creating initial MLflow database tables" not in proc.stderr
    assert "INFO mlflow" not in proc.stderr
