"""Failure and resume on real Ray Train V2 workers (2 CPU workers, DDP over gloo).

One run, two phases (each worker-group start costs ~20 s, so they share one test):
(a) 3 epochs; rank 1 raises once at epoch 1; ``FailureConfig(max_failures=1)``
    restarts the worker group, which resumes from the epoch-0 checkpoint and
    finishes epochs 1-2 without starting over;
(b) the same ``RunConfig(name, storage_path)`` started again with
    ``max_epochs=5`` starts at epoch 3 (an interrupted/extended run picks up).

Both phases use only medcl's ``report_epoch`` / ``restore_from_ray``. Rank 0 appends
to an event log (``start <epoch> <weight-sum>`` after restoring, ``done
<epoch>`` after each report returns); the test checks it against the
checkpoints that Ray persisted, read back with ``load_model_weights``.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]

STEPS_PER_EPOCH = 3


def _train_fn(config: dict) -> dict:
    """Linear regression with DDP; optionally one rank fails once at ``fail_epoch``."""
    import ray.train
    import ray.train.torch
    import time

    import torch

    from medcl.train.checkpoints import report_epoch, restore_from_ray
    from medcl.train.runtime import seed_everything
    from medcl.train.schedule import warmup_cosine

    import tempfile

    tempfile.tempdir = config["scratch"]  # report_epoch's temporary checkpoint dirs land here
    rank = ray.train.get_context().get_world_rank()
    max_epochs = config["max_epochs"]
    gen = seed_everything(0, rank)
    model = ray.train.torch.prepare_model(torch.nn.Linear(4, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scheduler = warmup_cosine(optimizer, warmup_steps=1, total_steps=max_epochs * STEPS_PER_EPOCH)
    start = restore_from_ray(model, optimizer, scheduler)

    log = Path(config["log"])
    inner = getattr(model, "module", model)
    if rank == 0:
        weight_sum = float(sum(p.detach().sum() for p in inner.parameters()))
        with log.open("a") as fh:
            fh.write(f"start {start} {weight_sum!r} {scheduler.last_epoch} {time.time():.2f}\n")
    x = torch.randn(32, 4, generator=gen)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]) + 0.1
    loss = torch.tensor(0.0)
    for epoch in range(start, max_epochs):
        for _ in range(STEPS_PER_EPOCH):
            loss = torch.nn.functional.mse_loss(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
        marker = Path(config["log"] + ".failed")
        if epoch == config.get("fail_epoch") and rank == config["fail_rank"] and not marker.exists():
            marker.touch()
            raise RuntimeError(f"injected failure on rank {rank} at epoch {epoch}")
        report_epoch(
            {"loss": loss.detach(), "epoch": epoch},
            model=model, optimizer=optimizer, scheduler=scheduler, epoch=epoch,
            step=scheduler.last_epoch, config=config, checkpoint_every=1, max_epochs=max_epochs,
        )
        if rank == 0:
            with log.open("a") as fh:
                fh.write(f"done {epoch} {time.time():.2f}\n")
    return {"start": start, "loss": float(loss)}


def _fit(storage: Path, name: str, config: dict, max_failures: int):
    import ray.cloudpickle
    import ray.train
    from ray.train.torch import TorchTrainer

    # Workers cannot import this test module by name: ship _train_fn by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    trainer = TorchTrainer(
        _train_fn,
        train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 0.5}),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=str(storage),
            # max_failures: worker-group restarts; controller_failure_limit=0: a worker group
            # that cannot start (e.g. no resources) raises instead of retrying forever.
            failure_config=ray.train.FailureConfig(max_failures=max_failures, controller_failure_limit=0),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=None),
        ),
    )
    return trainer.fit()


def _events(log: Path) -> list[tuple[str, ...]]:
    return [tuple(line.split()) for line in log.read_text().splitlines()]


def _weight_sum(checkpoint_dir: Path) -> float:
    from medcl.train.checkpoints import load_model_weights

    return float(sum(t.sum() for t in load_model_weights(checkpoint_dir).values()))


def test_failure_resume_and_restart_of_a_finished_run(ray_session, tmp_path, monkeypatch):
    # Poll workers every 0.5 s instead of 2 s (propagated by Ray from the driver to controller and workers).
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    storage, log, scratch = tmp_path / "storage", tmp_path / "events.log", tmp_path / "scratch"
    scratch.mkdir()
    run_dir = storage / "run"

    # (a) 3 epochs; rank 1 raises once at epoch 1 -> the group restarts and resumes at epoch 1.
    t0 = time.perf_counter()
    config = {"max_epochs": 3, "fail_epoch": 1, "fail_rank": 1, "log": str(log), "scratch": str(scratch)}
    first = _fit(storage, "run", config, max_failures=1)
    t1 = time.perf_counter()
    assert first.error is None
    assert Path(str(log) + ".failed").exists()  # the failure really happened
    events = _events(log)
    assert [e[:2] for e in events] == [("start", "0"), ("done", "0"), ("start", "1"), ("done", "1"), ("done", "2")]
    # the restart loaded the epoch-0 checkpoint's weights and the scheduler's step count
    assert float(events[2][2]) == pytest.approx(_weight_sum(run_dir / "epoch_000000"), abs=1e-6)
    assert int(events[2][3]) == 1 * STEPS_PER_EPOCH
    assert first.return_value["start"] == 1  # rank 0's return value after the restart
    assert first.metrics["epoch"] == 2
    with first.checkpoint.as_directory() as d:
        meta = json.loads((Path(d) / "meta.json").read_text())
    assert meta["epoch"] == 2 and meta["step"] == 3 * STEPS_PER_EPOCH
    assert sorted(p.name for p in run_dir.glob("epoch_*")) == ["epoch_000000", "epoch_000001", "epoch_000002"]

    # (b) the same RunConfig(name, storage_path) again with max_epochs=5 -> starts at epoch 3.
    second = _fit(storage, "run", {"max_epochs": 5, "log": str(log), "scratch": str(scratch)}, max_failures=0)
    t2 = time.perf_counter()
    assert second.error is None
    events = _events(log)[5:]
    assert [e[:2] for e in events] == [("start", "3"), ("done", "3"), ("done", "4")]
    assert float(events[0][2]) == pytest.approx(_weight_sum(run_dir / "epoch_000002"), abs=1e-6)
    assert second.return_value["start"] == 3
    assert second.metrics["epoch"] == 4
    # Ray deleted each local checkpoint after copying it; only the one rank 0 was reporting when
    # the group was torn down (epoch 1 of the failed attempt) is left behind.
    left = [json.loads((d / "meta.json").read_text())["epoch"] for d in scratch.glob("medcl-ckpt-*")]
    assert left in ([], [1])
    print(f"\n[timing] fit with failure+restart {t1 - t0:.1f} s, resumed fit {t2 - t1:.1f} s")


def _local_fn(config: dict) -> dict:
    import torch

    from medcl.train.checkpoints import report_epoch, restore_from_ray

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    assert restore_from_ray(model, optimizer, None) == 0  # fresh run: nothing to restore
    flags = []
    for epoch in range(3):
        with torch.no_grad():
            model.weight.add_(1.0)
        flags.append(
            report_epoch({"loss": torch.tensor(1.5), "epoch": epoch}, model=model, optimizer=optimizer,
                         scheduler=None, epoch=epoch, step=epoch + 1, config={"x": 1}, checkpoint_every=2,
                         max_epochs=3)
        )
    with pytest.raises(ValueError, match="metric 'bad' must be a scalar"):
        report_epoch({"bad": [1, 2]}, model=model, optimizer=None, scheduler=None, epoch=3, step=4,
                     config={}, checkpoint_every=1)
    with pytest.raises(ValueError, match="checkpoint_every must be an int >= 0"):
        report_epoch({}, model=model, optimizer=None, scheduler=None, epoch=3, step=4, config={}, checkpoint_every=-1)
    with pytest.raises(ValueError, match="checkpoint_every=0 .* needs max_epochs"):
        report_epoch({}, model=model, optimizer=None, scheduler=None, epoch=3, step=4, config={}, checkpoint_every=0)
    with pytest.raises(ValueError, match=r"epoch must lie in \[0, max_epochs=3\)"):
        report_epoch({}, model=model, optimizer=None, scheduler=None, epoch=3, step=4, config={}, checkpoint_every=1,
                     max_epochs=3)
    # local mode hands back the last reported checkpoint: restoring loads epoch 2's weights
    fresh = torch.nn.Linear(3, 2)
    start = restore_from_ray(fresh, torch.optim.SGD(fresh.parameters(), lr=0.1), None)
    return {"flags": flags, "start": start, "equal": bool(torch.equal(fresh.weight, model.weight))}


def test_report_epoch_interval_and_restore_in_local_mode(tmp_path, monkeypatch):
    """``ScalingConfig(num_workers=0)`` runs the loop in this process: fast checks of the interval logic."""
    import tempfile

    import ray.train
    from ray.train.torch import TorchTrainer

    # Local mode keeps report_epoch's temporary checkpoint dirs (they are the result): keep them in tmp_path.
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))

    trainer = TorchTrainer(
        _local_fn,
        scaling_config=ray.train.ScalingConfig(num_workers=0),
        run_config=ray.train.RunConfig(name="local", storage_path=str(tmp_path)),
    )
    result = trainer.fit()
    # checkpoint_every=2 -> epoch 1; max_epochs=3 forces the last epoch 2
    assert result.return_value["flags"] == [False, True, True]
    assert result.return_value["start"] == 3 and result.return_value["equal"]
    assert result.metrics == {"loss": 1.5, "epoch": 2.0}  # tensors converted to floats
    with result.checkpoint.as_directory() as d:
        meta = json.loads((Path(d) / "meta.json").read_text())
    assert meta["epoch"] == 2 and meta["config"] == {"x": 1} and meta["metrics"] == {"loss": 1.5, "epoch": 2.0}
    epochs = sorted(json.loads((d / "meta.json").read_text())["epoch"] for d in scratch.glob("medcl-ckpt-*"))
    assert epochs == [1, 2]  # exactly the checkpointed epochs were written
