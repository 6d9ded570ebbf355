"""``medcl export`` / :func:`medcl.export.load_model`: a fine-tuned checkpoint as safetensors + model.json (issue 16, item 1).

Two real fine-tunes run in this process (the stage loop on real Ray Data streams) on a tiny
synthetic cohort: a U-Net segmentation fine-tune that selects its best epoch on validation
Dice, and a ResNet classification fine-tune. Their checkpoints are laid out as a single-stage
run (``stage.json`` beside them) and as a pipeline job (``plan.json`` and a hand-written
``checkpoints.json``). The exports are loaded in a fresh Python process, which must reproduce
the outputs of the checkpoint's own network (built here by the stage's code) on fixed inputs;
the card is checked against the raw ``manifest.json`` and the ingest options given here (a
tiny MSD folder, with --data, for the slice axis and orientation).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from medcl.config import ClsFinetuneConfig, ResNetSpec, SegFinetuneConfig, UNetSpec

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("restore_root_logging")]  # cli.main reconfigures logging

REPO = Path(__file__).resolve().parents[1]
UNET = UNetSpec(features=(8, 16), norm="batch", embed_dim=16)
SYNTH_OPTIONS = {"num_patients": 10, "images_per_patient": 4, "size": 16, "num_classes": 3, "seed": 0}
MSD_OPTIONS = {"size": 16, "normalisation": "minmax"}
JOB = "simclr>cls_finetune@seed=0,fraction=1"




@pytest.fixture(scope="module")
def trained(ray_session, tmp_path_factory):
    """{"seg": ..., "cls": ...}: config, dataset, stage inputs, kept epoch checkpoints, the laid-out checkpoint.

    Both stages train on one synthetic cohort (masks and patient labels), their streams built in one go
    (the test slices are shared): a 2-epoch segmentation fine-tune that selects on validation Dice, a
    1-epoch classification fine-tune without selection (``val_every: 0``).
    """
    from in_process import InProcessContext

    from medcl.data.ingest import ingest
    from medcl.data.streams import build_streams
    from medcl.train.driver import STAGES, run_loop, stage_inputs
    from medcl.train.run_record import write_stage_record

    work = tmp_path_factory.mktemp("export")
    data = work / "synth"
    ingest("synthetic", None, data, SYNTH_OPTIONS)
    configs = {
        "seg": SegFinetuneConfig(model=UNET, max_epochs=2, batch_size_per_worker=4, max_steps_per_epoch=3, lr=0.05,
                                 augment=False),
        "cls": ClsFinetuneConfig(model=ResNetSpec(arch="resnet18", small_input=False), max_epochs=1, val_every=0,
                                 batch_size_per_worker=4, max_steps_per_epoch=2, lr=1e-3, augment=False),
    }
    specs = {(name, key): spec for name, cfg in configs.items()
             for key, spec in STAGES[cfg.kind].datasets(cfg, str(data)).items()}
    built = build_streams({f"{name}/{key}": spec for (name, key), spec in specs.items()})
    out = {}
    for name, cfg in configs.items():
        streams = {key: built[f"{n}/{key}"] for n, key in specs if n == name}
        ctx = InProcessContext(streams, keep=work / f"kept-{name}")
        inputs = stage_inputs(cfg, str(data), streams, 1)
        run_loop(ctx, cfg, inputs)
        out[name] = dict(cfg=cfg, data=data, inputs=inputs, epochs=ctx.checkpoints, reports=ctx.reports)
    # segmentation: a single-stage run, stage.json one level above its checkpoint
    out["seg"]["checkpoint"] = work / "runs" / "seg-run" / "checkpoint_000001"
    shutil.copytree(out["seg"]["epochs"][-1], out["seg"]["checkpoint"])
    write_stage_record(configs["seg"], data, work / "runs", "seg-run")
    # classification: a pipeline job, with plan.json and checkpoints.json in the run directory
    run = out["cls"]["run"] = work / "runs" / "pipe"
    checkpoint = out["cls"]["checkpoint"] = run / "wave1" / "trial_0" / "checkpoint_000000"
    shutil.copytree(out["cls"]["epochs"][-1], checkpoint)
    (run / "plan.json").write_text(json.dumps({"dataset": str(data.resolve()), "jobs": {}}))
    (run / "checkpoints.json").write_text(json.dumps({"simclr@seed=0": None, JOB: str(checkpoint)}))
    return out


def _reference(run: dict, state: dict) -> torch.nn.Module:
    """The checkpoint's network as its stage builds it, holding ``state``, in eval mode."""
    from medcl.train.driver import STAGES

    stage = STAGES[run["cfg"].kind]
    net = stage.trainable(stage.build(run["cfg"], run["inputs"]), run["cfg"])
    net.load_state_dict(state)
    return net.eval()


def _best_state(checkpoint: Path) -> tuple[dict, int]:
    """The best epoch's weights as the checkpoint holds them (selection.pt, else its own model.pt when it is the best)."""
    meta = json.loads((checkpoint / "meta.json").read_text())
    selection = torch.load(checkpoint / "selection.pt", weights_only=True)
    if selection["state_dict"] is not None:
        return selection["state_dict"], selection["epoch"]
    assert selection["epoch"] == meta["epoch"]
    return torch.load(checkpoint / "model.pt", weights_only=True), selection["epoch"]


def _load_in_fresh_process(exports: dict[str, Path], inputs: dict[str, torch.Tensor], tmp_path: Path) -> dict:
    """``load_model`` of each export in a new interpreter: its outputs on ``inputs``, and whether Ray was imported."""
    torch.save(inputs, tmp_path / "inputs.pt")
    script = textwrap.dedent(f"""
        import json, sys, torch
        from medcl.export import load_model
        inputs = torch.load({str(tmp_path / 'inputs.pt')!r}, weights_only=True)
        exports = json.loads({json.dumps({k: str(v) for k, v in exports.items()})!r})
        out = {{}}
        with torch.no_grad():
            for name, path in exports.items():
                net, card = load_model(path)
                out[name] = net(inputs[name])
        out["ray_imported"] = torch.tensor("ray" in sys.modules)
        torch.save(out, {str(tmp_path / 'outputs.pt')!r})
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return torch.load(tmp_path / "outputs.pt", weights_only=True)


# ----------------------------------------------------------------------------- loading reproduces the checkpoint
def test_exports_loaded_in_a_fresh_process_give_the_checkpoint_outputs(trained, tmp_path):
    from medcl.export import export_model

    exports = {"seg": export_model(trained["seg"]["checkpoint"], tmp_path / "seg"),
               "cls": export_model(trained["cls"]["checkpoint"], tmp_path / "cls")}
    gen = torch.Generator().manual_seed(0)
    inputs = {"seg": torch.rand(3, 1, 16, 16, generator=gen), "cls": torch.rand(3, 1, 16, 16, generator=gen)}
    outputs = _load_in_fresh_process(exports, inputs, tmp_path)

    assert not bool(outputs["ray_imported"])  # loading needs neither Ray nor the training process
    seg_state, _ = _best_state(trained["seg"]["checkpoint"])
    cls_state = torch.load(trained["cls"]["checkpoint"] / "model.pt", weights_only=True)
    with torch.no_grad():
        expected = {"seg": _reference(trained["seg"], seg_state)(inputs["seg"]),
                    "cls": _reference(trained["cls"], cls_state)(inputs["cls"])}
    assert outputs["seg"].shape == (3, 3, 16, 16) and outputs["cls"].shape == (3, 2)
    assert not torch.equal(outputs["seg"][0], outputs["seg"][1])  # a real function of the input
    for name in ("seg", "cls"):
        torch.testing.assert_close(outputs[name], expected[name], rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- the card
def test_model_json_describes_the_dataset_preprocessing_and_metrics(trained, tmp_path):
    from medcl.export import export_model

    out = export_model(trained["seg"]["checkpoint"], tmp_path / "seg")
    card = json.loads((out / "model.json").read_text())
    manifest_path = trained["seg"]["data"] / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    last = trained["seg"]["reports"][-1]

    assert sorted(p.name for p in out.iterdir()) == ["model.json", "model.safetensors"]
    assert (card["task"], card["stage_kind"], card["architecture"]) == ("segmentation", "seg_finetune", "unet")
    assert card["model_spec"] == {"features": [8, 16], "norm": "batch", "embed_dim": 16}
    assert (card["in_channels"], card["num_classes"], card["multilabel"]) == (1, 3, False)
    assert card["label_map"] == {"0": "background", "1": "organ", "2": "inner"}  # the synthetic cohort's classes
    assert card["class_names"] == ["normal", "lesion"]
    pre = card["preprocessing"]
    assert (pre["source_kind"], pre["size"], pre["channels"]) == ("synthetic", [16, 16], 1)
    assert pre["normalisation"] == manifest["normalisation"]
    assert {k: pre["ingest_options"][k] for k in SYNTH_OPTIONS} == SYNTH_OPTIONS
    assert card["dataset"] == {"path": str(trained["seg"]["data"].resolve()), "fingerprint": manifest["fingerprint"],
                               "manifest_sha256": hashlib.sha256(manifest_path.read_bytes()).hexdigest(),
                               "task": "segmentation"}
    assert card["weights"]["which"] == "best" and card["weights"]["epoch"] == last["best/epoch"]
    assert card["weights"]["selection_metric"] == "val/dice_2d"
    assert card["weights"]["sha256"] == hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
    assert card["metrics"]["test/dice_2d"] == pytest.approx(last["best/test/dice_2d"])
    assert card["stage_metrics"]["test/dice_2d"] == pytest.approx(last["test/dice_2d"])
    assert card["job"] is None and card["source"]["checkpoint"] == str(trained["seg"]["checkpoint"])
    assert card["medcl_version"] == __import__("medcl").__version__ and card["created"].endswith("+00:00")


def test_model_json_of_a_volume_dataset_records_its_slice_axis(trained, tmp_path):
    """--data: the same network described by a 3-class, 1-channel MSD dataset (make_msd's), sliced sagittally."""
    from tests.data.test_bad_input import make_msd

    from medcl.data.ingest import ingest
    from medcl.export import export_model

    ingest("msd", make_msd(tmp_path / "Task", n=2), tmp_path / "msd", {**MSD_OPTIONS, "axis": "sagittal"})
    out = export_model(trained["seg"]["checkpoint"], tmp_path / "model", dataset_dir=tmp_path / "msd")
    card = json.loads((out / "model.json").read_text())
    manifest = json.loads((tmp_path / "msd" / "manifest.json").read_text())
    assert card["label_map"] == {"0": "background", "1": "a", "2": "b"}  # make_msd's dataset.json
    pre = card["preprocessing"]
    assert (pre["source_kind"], pre["size"], pre["channels"]) == ("msd", [16, 16], 1)
    assert (pre["axis"], pre["axis_name"], pre["orientation"]) == (0, "sagittal", "RAS")
    assert pre["modalities"] == {"0": "MRI"} and pre["ingest_options"]["normalisation"] == "minmax"
    assert pre["normalisation"] == manifest["normalisation"]
    assert card["dataset"]["fingerprint"] == manifest["fingerprint"]


def test_pipeline_job_export_by_run_dir_records_job_and_class_names(trained, tmp_path):
    from medcl.cli import main

    rc = main(["export", str(trained["cls"]["run"]), "--job", JOB, "--out", str(tmp_path / "cls"), "-q"])
    assert rc == 0
    card = json.loads((tmp_path / "cls" / "model.json").read_text())
    assert card["job"] == JOB and card["task"] == "classification" and card["architecture"] == "resnet_classifier"
    assert card["class_names"] == ["normal", "lesion"] and card["num_classes"] == 2 and not card["multilabel"]
    assert card["dataset"]["path"] == str(trained["cls"]["data"].resolve())  # from plan.json
    assert card["model_spec"]["arch"] == "resnet18" and card["model_spec"]["small_input"] is False
    # the checkpoint alone finds its job in the pipeline's checkpoints.json
    from medcl.export import export_model

    again = json.loads((export_model(trained["cls"]["checkpoint"], tmp_path / "again") / "model.json").read_text())
    assert again["job"] == JOB


def test_run_dir_form_errors_name_the_jobs(trained, tmp_path, capsys):
    from medcl.cli import main

    assert main(["export", str(trained["cls"]["run"]), "--job", "nope", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'nope' is not in" in err and JOB in err
    assert main(["export", str(trained["cls"]["run"]), "--job", "simclr@seed=0", "--out", str(tmp_path / "x")]) == 2
    assert "without a checkpoint" in capsys.readouterr().err
    assert main(["export", str(trained["cls"]["run"]), "--out", str(tmp_path / "x")]) == 2
    assert "--job KEY" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------- which weights
def test_best_and_last_export_the_weights_selection_and_model_pt_hold(trained, tmp_path):
    from safetensors.torch import load_file

    from medcl.export import export_model

    run = trained["seg"]
    # A copy of the final checkpoint whose selection names epoch 0 (the weights of the kept epoch-0 checkpoint).
    checkpoint = tmp_path / "runs" / "seg-run" / "checkpoint_000001"
    shutil.copytree(run["checkpoint"], checkpoint)
    shutil.copy(run["checkpoint"].parent / "stage.json", checkpoint.parent / "stage.json")
    epoch0 = torch.load(run["epochs"][0] / "model.pt", weights_only=True)
    last = torch.load(checkpoint / "model.pt", weights_only=True)
    torch.save({"metric": "val/dice_2d", "epoch": 0, "value": 0.5, "values": {"val/dice_2d": 0.5},
                "state_dict": epoch0}, checkpoint / "selection.pt")

    best_dir = export_model(checkpoint, tmp_path / "best")
    last_dir = export_model(checkpoint, tmp_path / "last", weights="last")
    best, latest = load_file(str(best_dir / "model.safetensors")), load_file(str(last_dir / "model.safetensors"))
    assert set(best) == set(epoch0) == set(last)
    assert all(torch.equal(best[k], epoch0[k]) for k in epoch0)
    assert all(torch.equal(latest[k], last[k]) for k in last)
    assert any(not torch.equal(epoch0[k], last[k]) for k in last)  # the two epochs' weights differ
    cards = [json.loads((d / "model.json").read_text())["weights"] for d in (best_dir, last_dir)]
    assert [(c["which"], c["epoch"]) for c in cards] == [("best", 0), ("last", 1)]

    # the classification stage ran with val_every: 0 (no selection.pt): "best" exports the last epoch
    assert not (trained["cls"]["checkpoint"] / "selection.pt").exists()
    fallback = export_model(trained["cls"]["checkpoint"], tmp_path / "fallback")
    card = json.loads((fallback / "model.json").read_text())["weights"]
    assert (card["which"], card["requested"], card["epoch"]) == ("last", "best", 0)
    assert "selection_metric" not in card


# ----------------------------------------------------------------------------- refusals, atomicity
def test_existing_out_dir_is_refused_unless_forced(trained, tmp_path):
    from medcl.export import export_model

    out = tmp_path / "model"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="exists and is not empty.*--force"):
        export_model(trained["seg"]["checkpoint"], out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    export_model(trained["seg"]["checkpoint"], out, force=True)
    assert sorted(p.name for p in out.iterdir()) == ["model.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # nothing left beside it


def test_a_failure_mid_write_leaves_no_output(trained, tmp_path, monkeypatch):
    import safetensors.torch

    from medcl.export import export_model

    def half_written(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", half_written)
    with pytest.raises(OSError, match="No space left"):
        export_model(trained["seg"]["checkpoint"], tmp_path / "model")
    assert list(tmp_path.iterdir()) == []


def test_a_changed_weights_file_is_refused_on_load(trained, tmp_path):
    from medcl.export import export_model, load_model

    out = export_model(trained["seg"]["checkpoint"], tmp_path / "model")
    data = bytearray((out / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF  # one bit pattern of the last tensor's bytes
    (out / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="model.safetensors: sha256 differs from .*model.json"):
        load_model(out)


def test_pretraining_checkpoint_is_refused_naming_its_kind(tmp_path, capsys):
    from medcl.cli import main
    from medcl.config import GlobalPretrainConfig
    from medcl.config.binder import to_dict
    from medcl.train.checkpoints import save_checkpoint

    save_checkpoint(tmp_path / "ckpt", model=torch.nn.Linear(2, 2), epoch=0, step=1,
                    config=to_dict(GlobalPretrainConfig(model=UNET)))
    assert main(["export", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "is a global_pretrain checkpoint; only fine-tuned models (seg_finetune, cls_finetune)" in err
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_without_its_run_needs_data(trained, tmp_path):
    from medcl.data.ingest import ingest
    from medcl.export import export_model

    lone = tmp_path / "elsewhere" / "checkpoint"
    shutil.copytree(trained["seg"]["checkpoint"], lone)
    with pytest.raises(ValueError, match="records its dataset; pass --data"):
        export_model(lone, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    card = json.loads((export_model(lone, tmp_path / "out", dataset_dir=trained["seg"]["data"]) / "model.json")
                      .read_text())
    assert card["dataset"]["path"] == str(trained["seg"]["data"].resolve())
    ingest("synthetic", None, tmp_path / "two", {**SYNTH_OPTIONS, "num_classes": 2})
    with pytest.raises(ValueError, match="do not fit the network.*seg_head"):  # a dataset of 2 mask classes, not 3
        export_model(lone, tmp_path / "wrong", dataset_dir=tmp_path / "two")
    assert not (tmp_path / "wrong").exists()
