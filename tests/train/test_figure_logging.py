"""Evaluation figures reach the fine-tune's MLflow run (issue 16, item 7), from rank 0 only.

* a real segmentation fine-tune (tiny synthetic cohort, real Ray Data streams, run
  in this process with a throw-away SQLite MLflow store) ends with
  ``figures/test_panel.png`` among its run's artifacts, a PNG of the panel's size;
* the final evaluation of a classification fine-tune logs ``figures/roc_test.png``
  and ``figures/roc_shifted.png`` (``figures/best/...`` for the best epoch's weights;
  plain streams, no Ray), and draws nothing without a run logger (ranks > 0, an
  untracked run);
* :func:`medcl.train.loop.fit` evaluates the best epoch's weights with ``best_evaluate``
  (which run_loop points at ``figures/best/``).

The figures' content is tested in tests/train/test_figures.py.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from medcl.config import SegFinetuneConfig, UNetSpec


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from medcl.tracking import configure_tracking, parent_run_id

    root = tmp_path_factory.mktemp("figure-logging")
    target = configure_tracking(f"sqlite:///{root / 'mlflow.db'}", experiment="test-figures")
    return target, parent_run_id(target, "test_figures")


def _child(store, name: str) -> dict:
    from medcl.tracking import child_run_id

    target, parent = store
    return {"tracking_uri": target.tracking_uri, "run_id": child_run_id(target, parent, name)}


def _artifacts(store, run_id: str, folder: str = "figures") -> list[str]:
    return sorted(f.path for f in store[0].client().list_artifacts(run_id, folder) if not f.is_dir)


# ----------------------------------------------------------------------------- a real segmentation fine-tune
@pytest.mark.ray
def test_a_tracked_segmentation_fine_tune_logs_its_test_panels(ray_session, store, tmp_path):
    from in_process import InProcessContext

    from medcl.data.ingest import ingest
    from medcl.data.streams import build_streams
    from medcl.train.driver import STAGES, run_loop, stage_inputs

    data = tmp_path / "data"
    ingest("synthetic", None, data, {"num_patients": 8, "images_per_patient": 3, "size": 16, "seed": 0})
    cfg = SegFinetuneConfig(model=UNetSpec(features=(8, 16), embed_dim=16), max_epochs=1, batch_size_per_worker=4,
                            max_steps_per_epoch=1, augment=False, val_every=0)
    stage = STAGES[cfg.kind]
    streams = build_streams(stage.datasets(cfg, str(data)))
    assert set(streams) == {"train", "test"}
    tracking = _child(store, "seg")
    run_loop(InProcessContext(streams), cfg, stage_inputs(cfg, str(data), streams, 1, tracking=tracking))
    run_id = tracking["run_id"]
    assert _artifacts(store, run_id) == ["figures/test_panel.png"]
    local = Path(store[0].client().download_artifacts(run_id, "figures/test_panel.png", str(tmp_path)))
    assert local.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(local) as im:
        cases = min(6, streams["test"].count())
        assert im.size == (20 + 160 * cases, 550)


# ----------------------------------------------------------------------------- classification, no Ray
class _Stream:
    def __init__(self, batches: list[dict]) -> None:
        self.batches = batches

    def iter_batches(self, batch_size, batch_format):
        yield from self.batches


def _cls_stream(seed: int) -> _Stream:
    """Two-class images (N, 2, 1, 1) whose pixels are the logits, 4 patients of 3 images."""
    rng = np.random.default_rng(seed)
    y = np.repeat([0, 1, 0, 1], 3)
    x = (rng.normal(size=(12, 2)) + np.eye(2)[y]).astype(np.float32)[:, :, None, None]
    return _Stream([{"image": x, "class_label": y, "patient_id": np.repeat(list("abcd"), 3).astype(object)}])


def test_the_classification_evaluation_logs_its_roc_curves_only_with_a_run_logger(store):
    from in_process import InProcessContext

    from medcl.tracking import attach_run_logger
    from medcl.train.final_evaluation import BEST_FIGURES, final_evaluation
    from medcl.train.loop import StageInputs
    from medcl.train.stages import STAGES

    stage = STAGES["cls_finetune"]
    ctx = InProcessContext({"test": _cls_stream(0), "test_shifted": _cls_stream(1)})
    inputs = StageInputs(dataset_dir="unused", in_channels=2, num_classes=2)
    tracking = _child(store, "cls")
    run_logger = attach_run_logger(**tracking)
    metrics = final_evaluation(stage, ctx, inputs, run_logger)(nn.Flatten())
    assert {"test/auc", "test/patient_auc", "shifted/auc"} <= set(metrics)
    assert _artifacts(store, tracking["run_id"]) == ["figures/roc_shifted.png", "figures/roc_test.png"]
    final_evaluation(stage, ctx, inputs, run_logger, BEST_FIGURES)(nn.Flatten())
    assert _artifacts(store, tracking["run_id"], "figures/best") == ["figures/best/roc_shifted.png",
                                                                     "figures/best/roc_test.png"]
    # No run logger (another rank, an untracked run): the same metrics, no figure drawn.
    drawn = []
    evaluate = stage.evaluate

    class Spy(type(stage)):
        def evaluate(self, *args, figure=None):
            drawn.append(figure)
            return evaluate(*args, figure=figure)

    assert final_evaluation(Spy(), ctx, inputs, None)(nn.Flatten()) == metrics
    assert drawn == [None, None]


# ----------------------------------------------------------------------------- fit: the best epoch's evaluation
def test_fit_evaluates_the_best_epochs_weights_with_best_evaluate(tmp_path):
    from in_process import InProcessContext

    from medcl.train.loop import fit
    from medcl.train.selection import BestEpoch

    weights = [0.45, 0.9]  # the weight after each epoch; validation prefers 0.5: epoch 0 is the best, 1 the last
    model = nn.Linear(1, 1, bias=False)
    nn.init.zeros_(model.weight)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)

    def w(m: nn.Module) -> float:
        return float(m.weight.detach().squeeze())

    seen = {"evaluate": [], "best_evaluate": []}

    def evaluation(name: str):
        def run(m: nn.Module) -> dict[str, float]:
            seen[name].append(w(m))
            return {"test/dice_2d": w(m)}
        return run

    class Context(InProcessContext):
        @contextlib.contextmanager
        def latest_checkpoint(self):
            yield None

    cfg = SegFinetuneConfig(model=UNetSpec(features=(8, 16)), max_epochs=2)
    selection = BestEpoch(lambda m: {"val/dice_2d": -(w(m) - 0.5) ** 2}, "val/dice_2d", every=1, max_epochs=2)
    out = fit(Context({}, keep=tmp_path), cfg, model, optimizer, scheduler, lambda e: [torch.tensor(weights[e])],
              lambda t: (0.5 * (model.weight.squeeze() - t) ** 2, {}), evaluate=evaluation("evaluate"),
              best_evaluate=evaluation("best_evaluate"), selection=selection)
    assert seen["evaluate"] == pytest.approx([0.9]) and seen["best_evaluate"] == pytest.approx([0.45])
    assert out["test/dice_2d"] == pytest.approx(0.9) and out["best/test/dice_2d"] == pytest.approx(0.45)
