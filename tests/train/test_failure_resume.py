"""Failure and resume of a real stage loop (global pretraining) on 2 Ray Train workers (gloo DDP).

One run, two phases (each worker-group start costs ~20 s, so they share one test):

(a) ``max_epochs=3``; rank 1 raises once after training epoch 1, before reporting it
    (:func:`_fail_once_context`, the workers' context passed to ``run_stage``);
    ``ScalingSpec(max_failures=1)`` restarts the worker group, which resumes from
    the epoch-0 checkpoint and finishes epochs 1-2 instead of starting over;
(b) the same ``run_stage(storage_path, name)`` again with ``max_epochs=4``: the
    interrupted/extended run starts at epoch 3.

Evidence, independent of the stage's return value: rank 0's per-epoch MLflow
history (steps and timestamps against the failure marker's time), the learning
rate each epoch ended with (the warm-up-free cosine written out here), and the
step counter in each checkpoint's ``meta.json``.
"""
from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest

from medcl.config import GlobalPretrainConfig, ScalingSpec, UNetSpec

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]

LR = 1e-3


def _lr_after(steps: int, total: int) -> float:
    """Cosine decay without warm-up: lr * (1 + cos(pi * steps / total)) / 2."""
    return LR * 0.5 * (1.0 + math.cos(math.pi * steps / total))


def _fail_once_context(at_epoch: int, marker: Path):
    """A ``RayTrainContext`` whose rank 1 raises ``RuntimeError`` instead of reporting epoch ``at_epoch``.

    Once per run: the worker first creates ``marker`` (exclusively), and a restarted worker finds it there.
    Defined inside a function so that cloudpickle ships the class to the workers by value.
    """
    import os

    from medcl.train.context import RayTrainContext

    class FailOnce(RayTrainContext):
        def report(self, metrics, checkpoint_dir=None):
            if self.world_rank == 1 and int(metrics["epoch"]) == at_epoch:
                try:
                    os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                except FileExistsError:
                    pass
                else:
                    raise RuntimeError(f"injected failure on rank 1 at epoch {at_epoch}")
            super().report(metrics, checkpoint_dir)

    return FailOnce


def test_worker_crash_resumes_from_the_latest_checkpoint_and_a_rerun_continues(ray_session, tmp_path, monkeypatch):
    from medcl.data.ingest import ingest
    from medcl.tracking import child_run_id, configure_tracking, parent_run_id
    from medcl.train.driver import run_stage

    # Poll workers every 0.5 s instead of 2 s (Ray passes this on to the controller and workers).
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    data = tmp_path / "data"
    ingest("synthetic", None, data, {"num_patients": 10, "images_per_patient": 4, "size": 16, "seed": 3})
    target = configure_tracking(f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="resume")
    parent = parent_run_id(target, "resume")
    client = target.client()

    def history(run_id: str, key: str) -> list[tuple[int, float, int]]:
        return sorted(((m.step, m.value, m.timestamp) for m in client.get_metric_history(run_id, key)),
                      key=lambda m: (m[2], m[0]))

    marker = tmp_path / "failed-once"
    cfg = GlobalPretrainConfig(max_epochs=3, batch_size_per_worker=4, lr=LR, temperature=0.5,
                               model=UNetSpec(features=(8, 16, 32), norm="batch"))
    scaling = ScalingSpec(num_workers=2, cpus_per_worker=0.5, max_failures=1)
    storage = tmp_path / "runs"

    # (a) rank 1 fails once after epoch 1 -> the group restarts from the epoch-0 checkpoint
    run_a = child_run_id(target, parent, "a")
    first = run_stage(cfg, data, scaling=scaling, storage_path=storage, name="crash",
                      tracking={"tracking_uri": target.tracking_uri, "run_id": run_a},
                      worker_context=_fail_once_context(1, marker))
    assert marker.exists(), "the injected failure did not happen"
    failed_at_ms = marker.stat().st_mtime * 1000
    steps_per_epoch = int(first.metrics["train/steps"])
    train_rows = 6 * 4  # 10 patients -> 6 in train, 4 slices each
    assert steps_per_epoch == train_rows // 2 // 4
    epochs = history(run_a, "epoch")
    before = [int(step) for step, _, t in epochs if t < failed_at_ms]
    after = [int(step) for step, _, t in epochs if t >= failed_at_ms]
    # epoch 0 ran once; epoch 1 may have been logged by rank 0 before the group was torn down;
    # after the restart training went on at epoch 1, not at 0
    assert before in ([0], [0, 1]), epochs
    assert after[-2:] == [1, 2] and 0 not in after, epochs
    # the resumed epoch 1 continued the learning-rate schedule restored from the checkpoint
    total = 3 * steps_per_epoch
    lrs = {}
    for step, value, _ in history(run_a, "train/lr"):
        lrs.setdefault(int(step), []).append(value)
    assert lrs[0] == [pytest.approx(_lr_after(steps_per_epoch, total))]
    assert all(v == pytest.approx(_lr_after(2 * steps_per_epoch, total)) for v in lrs[1])
    assert lrs[2] == [pytest.approx(0.0, abs=1e-12)]
    assert first.metrics["epoch"] == 2.0
    meta = json.loads((Path(first.checkpoint) / "meta.json").read_text())
    assert meta["epoch"] == 2 and meta["step"] == 3 * steps_per_epoch

    # (b) the same storage_path + name with one more epoch: starts at epoch 3
    run_b = child_run_id(target, parent, "b")
    second = run_stage(replace(cfg, max_epochs=4), data, scaling=scaling,
                       storage_path=storage, name="crash",
                       tracking={"tracking_uri": target.tracking_uri, "run_id": run_b})
    assert [int(step) for step, _, _ in history(run_b, "epoch")] == [3]
    assert second.metrics["epoch"] == 3.0
    meta = json.loads((Path(second.checkpoint) / "meta.json").read_text())
    assert meta["epoch"] == 3 and meta["step"] == 4 * steps_per_epoch  # the step counter went on from 3 epochs
    assert Path(second.run_dir) == Path(first.run_dir)
