"""Model selection on the validation split (issue 14, defect 8): ``val/*`` every epoch, ``best/*`` after the last.

Three parts:

* a real segmentation fine-tune (3 epochs, tiny synthetic cohort, real Ray Data
  streams, in this process): every epoch reports ``val/dice_2d``; each epoch's
  checkpoint is evaluated here with a hand-written pooled Dice on the val and
  test rows, which must give the reported ``val/dice_2d``, the best epoch and
  ``best/test/dice_2d``;
* :func:`medcl.train.loop.fit` on a one-weight model whose weight after epoch e
  is a scripted value (SGD, lr 1), so that the best epoch is not the last: its
  ``best/test/*`` is the evaluation of that epoch's weights, and the best
  survives a resume from a later checkpoint (whose ``selection.pt`` holds the
  weights) and from the best epoch's own checkpoint;
* a dataset without validation patients: no ``"val"`` stream, a warning naming
  the dataset, no ``val/*`` / ``best/*``.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from medcl.config import SegFinetuneConfig, UNetSpec

UNET = UNetSpec(features=(8, 16), norm="batch", embed_dim=16)


def _pooled_dice(pred: np.ndarray, mask: np.ndarray, num_classes: int) -> float:
    """Mean over foreground classes of 2|P n T| / (|P| + |T|), pooled over all slices (absent from both: skipped)."""
    scores = []
    for c in range(1, num_classes):
        p, t = pred == c, mask == c
        if p.sum() + t.sum():
            scores.append(2.0 * (p & t).sum() / (p.sum() + t.sum()))
    return float(np.mean(scores))


# ----------------------------------------------------------------------------- a real fine-tune
@pytest.mark.ray
def test_val_dice_every_epoch_and_best_epoch_test_dice_match_a_recomputation(ray_session, tmp_path):
    from in_process import InProcessContext

    from medcl.data.ingest import ingest
    from medcl.data.streams import build_streams
    from medcl.train.driver import STAGES, run_loop, stage_inputs

    data = tmp_path / "data"
    ingest("synthetic", None, data, {"num_patients": 10, "images_per_patient": 4, "size": 16, "num_classes": 3,
                                     "seed": 0})
    cfg = SegFinetuneConfig(model=UNET, max_epochs=3, batch_size_per_worker=4, max_steps_per_epoch=3, lr=0.1,
                            augment=False)
    stage = STAGES[cfg.kind]
    streams = build_streams(stage.datasets(cfg, str(data)))
    assert set(streams) == {"train", "test", "val"}
    ctx = InProcessContext(streams, keep=tmp_path / "kept")
    inputs = stage_inputs(cfg, str(data), streams, 1)
    run_loop(ctx, cfg, inputs)

    rows = {name: [(b["image"], b["mask"]) for b in streams[name].iter_batches(batch_size=None, batch_format="numpy")]
            for name in ("val", "test")}
    rows = {name: {"image": np.concatenate([i for i, _ in r]), "mask": np.concatenate([m for _, m in r])}
            for name, r in rows.items()}
    dice = {name: [] for name in rows}
    for checkpoint in ctx.checkpoints:  # one per epoch
        net = stage.trainable(stage.build(cfg, inputs), cfg)
        net.load_state_dict(torch.load(checkpoint / "model.pt", weights_only=True))
        net.eval()
        with torch.no_grad():
            for name, batch in rows.items():
                pred = net(torch.as_tensor(batch["image"])).argmax(1).numpy()
                dice[name].append(_pooled_dice(pred, batch["mask"], inputs.num_classes))
    reports = ctx.reports
    assert len(reports) == len(ctx.checkpoints) == 3
    assert [r["val/dice_2d"] for r in reports] == pytest.approx(dice["val"], abs=1e-6)
    best = int(np.argmax(dice["val"]))  # the earliest on ties, like the stage
    last = reports[-1]
    assert last["best/epoch"] == best
    assert last["best/val/dice_2d"] == pytest.approx(dice["val"][best], abs=1e-6)
    assert last["best/test/dice_2d"] == pytest.approx(dice["test"][best], abs=1e-6)
    assert last["test/dice_2d"] == pytest.approx(dice["test"][-1], abs=1e-6)  # the last epoch's, as before
    assert {k for k in last if k.startswith("best/")} >= {"best/test/dice_3d_mean", "best/test/dice_2d_class2"}
    assert not any(k.startswith(("best/", "test/")) for r in reports[:-1] for k in r)


# ----------------------------------------------------------------------------- fit with a scripted trajectory
WEIGHTS = [0.1, 0.45, 0.9, 0.2]  # the weight after each epoch; validation prefers 0.5: the best epoch is 1


def _fit(tmp_path: Path, resume_from: Path | None = None):
    from in_process import InProcessContext

    from medcl.train.loop import fit
    from medcl.train.selection import BestEpoch

    class Context(InProcessContext):
        @contextlib.contextmanager
        def latest_checkpoint(self):
            yield resume_from

    model = nn.Linear(1, 1, bias=False)
    nn.init.zeros_(model.weight)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)

    def batches(epoch: int):
        return [torch.tensor(WEIGHTS[epoch])]

    def loss_fn(target):  # 0.5 (w - t)^2: one SGD step at lr 1 puts w at t
        return 0.5 * (model.weight.squeeze() - target) ** 2, {}

    def weight(m: nn.Module) -> float:
        return float(m.weight.detach().squeeze())

    validated = []

    def validate(m: nn.Module) -> dict[str, float]:
        validated.append(weight(m))
        return {"val/dice_2d": -(weight(m) - 0.5) ** 2, "val/ignored": 0.0}

    def evaluate(m: nn.Module) -> dict[str, float]:
        return {"test/dice_2d": weight(m), "shifted/dice_2d": 2 * weight(m)}

    cfg = SegFinetuneConfig(model=UNET, max_epochs=len(WEIGHTS))
    ctx = Context({}, keep=tmp_path)
    selection = BestEpoch(validate, "val/dice_2d", every=1, max_epochs=cfg.max_epochs)
    out = fit(ctx, cfg, model, optimizer, scheduler, batches, loss_fn, evaluate=evaluate, selection=selection)
    return out, ctx, validated, weight(model)


def test_best_epoch_before_the_last_is_evaluated_on_its_own_weights_and_survives_a_resume(tmp_path):
    out, ctx, validated, final = _fit(tmp_path / "run")
    assert validated == pytest.approx(WEIGHTS)
    assert [r["val/dice_2d"] for r in ctx.reports] == pytest.approx([-(w - 0.5) ** 2 for w in WEIGHTS])
    assert all("val/ignored" not in r for r in ctx.reports)
    expected = {"test/dice_2d": 0.2, "shifted/dice_2d": 0.4, "best/epoch": 1.0, "best/val/dice_2d": -0.0025,
                "best/test/dice_2d": 0.45, "best/shifted/dice_2d": 0.9}
    assert {k: out[k] for k in expected} == pytest.approx(expected)
    assert ctx.reports[-1] == out and final == pytest.approx(0.2)  # the model keeps the last epoch's weights
    # Resumed after epoch 2 (best: epoch 1, weights in selection.pt) and after epoch 1 (best: its own model.pt).
    for after in (2, 1):
        out, ctx, validated, _ = _fit(tmp_path / f"resume{after}", resume_from=tmp_path / "run" / f"epoch{after}")
        assert validated == pytest.approx(WEIGHTS[after + 1:])
        assert {k: out[k] for k in expected} == pytest.approx(expected), after


def test_validation_every_n_epochs_always_includes_the_last(tmp_path):
    from medcl.train.selection import BestEpoch

    best = BestEpoch(lambda m: {}, "val/auc", every=3, max_epochs=7)
    assert [e for e in range(7) if best.due(e)] == [2, 5, 6]
    with pytest.raises(ValueError, match="val_every"):
        BestEpoch(lambda m: {}, "val/auc", every=0, max_epochs=7)


# ----------------------------------------------------------------------------- no validation patients
def test_a_dataset_without_validation_patients_skips_selection_with_a_warning(tmp_path, caplog):
    from in_process import InProcessContext

    from medcl.data.ingest import ingest
    from medcl.train.driver import STAGES
    from medcl.train.loop import StageInputs
    from medcl.train.selection import BestEpoch

    data = tmp_path / "noval"
    ingest("synthetic", None, data, {"num_patients": 4, "images_per_patient": 2, "size": 8, "seed": 0,
                                     "split_ratios": [0.5, 0.0, 0.5]})
    cfg = SegFinetuneConfig(model=UNET)
    stage = STAGES[cfg.kind]
    specs = stage.datasets(cfg, str(data))
    assert "val" not in specs and "test" in specs
    inputs = StageInputs(dataset_dir=str(data), in_channels=1, num_classes=2)
    with caplog.at_level(logging.WARNING, logger="medcl.train.selection"):
        assert BestEpoch.for_stage(InProcessContext({"test": None}), cfg, stage, inputs) is None
    assert f"dataset {data} has no validation slices (split 'val', site A)" in caplog.text
    assert "val_every: 0" in caplog.text
    # val_every: 0 builds no val stream and selects nothing, silently; nor does any rank but 0.
    caplog.clear()
    off = SegFinetuneConfig(model=UNET, val_every=0)
    assert "val" not in stage.datasets(off, str(data))
    assert BestEpoch.for_stage(InProcessContext({"val": None}), off, stage, inputs) is None
    rank1 = InProcessContext({"val": None})
    rank1.world_rank = 1
    assert BestEpoch.for_stage(rank1, cfg, stage, inputs) is None
    assert caplog.text == ""
    with pytest.raises(ValueError, match="val_every must be >= 0"):
        SegFinetuneConfig(val_every=-1)
