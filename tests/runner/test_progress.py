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
