"""MLflow models, the Model Registry and the MLflow UI in a real browser (issue 16, items 2 and 8).

One tiny pipeline (synthetic cohort of 12 patients, 4 slices of 16 px; one method, two seeds, one
fraction, one epoch) runs through ``medcl run --register tiny`` against a real ``mlflow server``
(the session's: a subprocess on a free loopback port with its own sqlite database and artifact
root, tests/conftest.py; this module uses its own experiment ``ui``). Then:

* each fine-tuning job's run holds a logged PyTorch model whose ``mlflow.pytorch.load_model``
  gives the outputs of medcl's own export of the job's checkpoint (``medcl.export.load_model``);
* ``--register`` made a version of ``tiny-random-1`` whose source run is the job with the higher
  ``best/val/dice_2d`` (read back from the runs here, not from medcl);
* what the run printed links the runs table, the parent run and its curve;
* headless Chromium (Debian's ``chromium``; skipped without it) shows the parent run's child runs
  and the curve artifact; its screenshot is kept and its path printed.
"""
from __future__ import annotations

import contextlib
import io
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch


PIPELINE = """\
name: tiny-ui
dataset: {{path: {root}/data, source: synthetic, options: {{num_patients: 12, images_per_patient: 4, size: 16, seed: 0}}}}
metric: test/dice_2d
label_fractions: [1.0]
seeds: [0, 1]
stages:
  finetune:
    kind: seg_finetune
    max_epochs: 1
    batch_size_per_worker: 4
    augment: false
    model: {{features: [8, 16], norm: instance}}
methods:
  random: [finetune]
scaling: {{num_workers: 1, cpus_per_worker: 1, max_failures: 0}}
max_concurrent_trials: 2
tracking: {{tracking_uri: "{uri}", experiment: ui, workdir: {root}}}
storage_path: {root}/runs
"""
JOBS = {"finetune@seed=0,fraction=1", "finetune@seed=1,fraction=1"}
CURVE = "report/label_efficiency_test_dice_2d.png"


pytestmark = pytest.mark.usefixtures("restore_root_logging")  # medcl.cli.main reconfigures logging


@pytest.fixture(scope="module")
def served(ray_session, mlflow_server, tmp_path_factory):
    """The pipeline run by ``medcl run ... --register tiny`` against a real server: paths, URI, stdout.

    ``medcl.cli.main`` runs in this process, on the session's Ray instance; its progress display goes to
    the real stderr (Tune pickles its callbacks, and pytest's capture file cannot be pickled).
    """
    import logging

    from medcl.cli import main

    root = tmp_path_factory.mktemp("mlflow-ui")
    uri = mlflow_server[0]
    handlers, level = logging.getLogger().handlers[:], logging.getLogger().level
    path = root / "tiny.yaml"
    path.write_text(textwrap.dedent(PIPELINE.format(root=root, uri=uri)))
    out, stderr = io.StringIO(), sys.stderr
    try:
        sys.stderr = sys.__stderr__
        with contextlib.redirect_stdout(out):
            code = main(["run", str(path), "--register", "tiny", "-q"])
    finally:
        sys.stderr = stderr
        logging.getLogger().handlers[:] = handlers
        logging.getLogger().setLevel(level)
    assert code == 0, out.getvalue()
    yield {"root": root, "uri": uri, "stdout": out.getvalue()}


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _pipeline_runs(uri: str) -> tuple[str, object, list]:
    """(experiment id, parent run, child runs) of the pipeline, read with MLflow's own client."""
    client = _client(uri)
    exp = client.get_experiment_by_name("ui")
    runs = client.search_runs([exp.experiment_id])
    (parent,) = [r for r in runs if r.info.run_name == "tiny-ui"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    return exp.experiment_id, parent, children


# ----------------------------------------------------------------------------- item 2: models and registry
@pytest.mark.ray
def test_each_finetune_run_logs_a_model_that_gives_the_exported_outputs(served, tmp_path):
    import mlflow
    import mlflow.pytorch

    from medcl.export import export_job, load_model

    _, _, children = _pipeline_runs(served["uri"])
    assert {r.info.run_name for r in children} == JOBS
    client = _client(served["uri"])
    x = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    saved = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(served["uri"])
    try:
        for run in children:
            model_id = run.data.tags["medcl.model_id"]
            logged = client.get_logged_model(model_id)
            assert logged.source_run_id == run.info.run_id and str(logged.status).endswith("READY")
            info = mlflow.models.get_model_info(f"models:/{model_id}")
            assert list(info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == [-1, 1, 16, 16]
            assert info.metadata["medcl_model_card"]["job"] == run.info.run_name
            mlflow_net = mlflow.pytorch.load_model(f"models:/{model_id}")
            # the independent reference: medcl's own export of the job's checkpoint
            export = export_job(served["root"] / "runs" / "tiny-ui", run.info.run_name, tmp_path / run.info.run_name)
            net, card = load_model(export)
            with torch.no_grad():
                expected = net(x)
                got = mlflow_net(x)
            assert got.shape == (3, card.num_classes, 16, 16)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
            assert list(info.signature.outputs.to_dict()[0]["tensor-spec"]["shape"]) == [-1, card.num_classes, 16, 16]
            # the card is also an artifact of the run
            files = [f.path for f in client.list_artifacts(run.info.run_id, "model_card")]
            assert files == ["model_card/model.json"]
    finally:
        mlflow.set_tracking_uri(saved)


@pytest.mark.ray
def test_register_makes_a_version_from_the_best_job_by_validation(served):
    _, _, children = _pipeline_runs(served["uri"])
    by_val = sorted(children, key=lambda r: (-r.data.metrics["best/val/dice_2d"], int(r.data.params["seed"])))
    best = by_val[0]
    (version,) = _client(served["uri"]).search_model_versions("name = 'tiny-random-1'")
    assert version.run_id == best.info.run_id
    assert version.source == f"models:/{best.data.tags['medcl.model_id']}"
    assert version.tags["medcl.selection_metric"] == "best/val/dice_2d"
    assert f"registered tiny-random-1 version 1: job {best.info.run_name}" in served["stdout"]


@pytest.mark.ray
def test_run_prints_direct_links_to_the_runs_the_parent_and_the_curve(served):
    exp_id, parent, _ = _pipeline_runs(served["uri"])
    base = f"{served['uri']}/#/experiments/{exp_id}/runs"
    out = served["stdout"]
    assert f"runs:   {base}\n" in out
    assert f"parent: {base}/{parent.info.run_id}\n" in out
    assert f"curve:  {base}/{parent.info.run_id}/artifacts/{CURVE}\n" in out


# ----------------------------------------------------------------------------- item 8: a real browser
def _chromium(url: str, *args: str, budget_ms: int = 20000) -> str:
    cmd = [shutil.which("chromium"), "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars",
           f"--virtual-time-budget={budget_ms}", "--window-size=1400,900", *args, url]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.ray
@pytest.mark.browser
@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="no `chromium` binary: install Debian's chromium (apt-get install -y chromium; .ci/run does)")
def test_mlflow_ui_shows_the_child_runs_and_the_curve(served, tmp_path, capsys):
    exp_id, parent, children = _pipeline_runs(served["uri"])
    printed = dict(re.findall(r"^\s+(parent|curve):\s+(\S+)$", served["stdout"], re.M))

    page = _chromium(printed["parent"], "--dump-dom")
    assert "Child runs" in page
    for run in children:
        assert run.info.run_name in page

    curve = _chromium(printed["curve"], "--dump-dom")
    # the artifact viewer fetched the PNG from the server and shows it as an image
    assert re.search(rf'<img alt="{re.escape(CURVE)}" src="blob:', curve), curve[-3000:]

    shot = tmp_path / "mlflow-ui-curve.png"
    _chromium(printed["curve"], f"--screenshot={shot}")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    kept = Path(tempfile.gettempdir()) / "medcl-test-artifacts" / "mlflow-ui-curve.png"
    kept.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shot, kept)
    with capsys.disabled():
        print(f"\nMLflow UI screenshot of {printed['curve']}: {kept}")


# ----------------------------------------------------------------------------- no Ray
def test_links_of_a_local_store_come_with_the_mlflow_ui_command():
    from medcl.tracking.links import format_run_links, run_links

    text = format_run_links(run_links("sqlite:////w/mlflow.db", "3", "abc", "report/c.png"))
    assert text.splitlines() == [
        "MLflow UI: start it with `mlflow ui --backend-store-uri sqlite:////w/mlflow.db --port 5000`, then open",
        "  runs:   http://127.0.0.1:5000/#/experiments/3/runs",
        "  parent: http://127.0.0.1:5000/#/experiments/3/runs/abc",
        "  curve:  http://127.0.0.1:5000/#/experiments/3/runs/abc/artifacts/report/c.png",
    ]
    server = run_links("http://mlflow:5000/", "3", "abc")
    assert (server.command, server.parent, server.curve) == (None, "http://mlflow:5000/#/experiments/3/runs/abc", None)


def test_register_with_a_bad_name_exits_2_before_anything_runs(tmp_path, capsys):
    from medcl.cli import main

    path = tmp_path / "tiny.yaml"
    path.write_text(textwrap.dedent(PIPELINE.format(root=tmp_path, uri=f"sqlite:///{tmp_path}/mlflow.db")))
    assert main(["run", str(path), "--register", "a/b", "-q"]) == 2
    assert "'/'" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()


def test_a_model_that_cannot_be_logged_is_a_warning_and_leaves_the_checkpoint(tmp_path, caplog):
    from medcl import tracking as mlt
    from medcl.model_logging import log_job_models

    target = mlt.configure_tracking(experiment="x", workdir=tmp_path)
    parent = mlt.start_parent_run(target, "p")
    key = "finetune@seed=0,fraction=1"
    run_id = mlt.child_run_id(target, parent, key, params={"kind": "seg_finetune"})
    checkpoint = tmp_path / "checkpoint_000000"
    checkpoint.mkdir()
    (checkpoint / "meta.json").write_text('{"epoch": 0}')  # not exportable: records no stage kind
    (checkpoint / "model.pt").write_bytes(b"weights")
    before = {p.name: p.read_bytes() for p in checkpoint.iterdir()}

    assert log_job_models(target, parent, {key: str(checkpoint)}, [key], str(tmp_path)) == {}
    assert f"could not log the MLflow model of job {key}" in caplog.text
    assert {p.name: p.read_bytes() for p in checkpoint.iterdir()} == before
    assert "medcl.model_id" not in target.client().get_run(run_id).data.tags


def test_medcl_log_models_0_skips_model_logging_unless_registering(monkeypatch):
    from medcl.cli_register import log_job_models, model_hook

    monkeypatch.setenv("MEDCL_LOG_MODELS", "0")
    assert model_hook(None) is None and model_hook("tiny") is log_job_models
    monkeypatch.setenv("MEDCL_LOG_MODELS", "1")
    assert model_hook(None) is log_job_models
