"""medcl.tracking against a real embedded sqlite store and a real `mlflow server`."""
from __future__ import annotations

import base64
import json
import os
import pickle
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from medcl.tracking import (
    RunLogger,
    TrackingError,
    attach_run_logger,
    child_run,
    child_run_id,
    close_open_children,
    configure_tracking,
    end_parent_run,
    find_parent_run,
    finish_run,
    log_new_metrics,
    log_text,
    parent_run_id,
    reopen_run,
    run_role,
    search_runs,
    start_parent_run,
)

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", autouse=True)
def _no_user_tracking_uri():
    """Tests choose their store explicitly; a user's MLFLOW_TRACKING_URI must not leak in."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        yield


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("embedded")


@pytest.fixture(scope="module")
def embedded(workdir):
    """One embedded store for the module (creating a sqlite store costs seconds)."""
    return configure_tracking(workdir=workdir, experiment="medcl-test")


# ----------------------------------------------------------- embedded store ----
def test_default_store_is_sqlite_in_workdir_with_absolute_artifacts(workdir, embedded, monkeypatch, tmp_path):
    assert embedded.tracking_uri == f"sqlite:///{workdir.resolve()}/mlflow.db"
    assert not embedded.is_remote
    # Read the store with sqlite3 itself: the experiment row holds an absolute location.
    with sqlite3.connect(workdir / "mlflow.db") as db:
        (location,) = db.execute(
            "SELECT artifact_location FROM experiments WHERE name = ?", ("medcl-test",)
        ).fetchone()
    assert location == str(workdir.resolve() / "mlruns" / "medcl-test")
    # A run logged after the working directory moved (as Ray does to trials) still
    # puts its artifacts under the workdir.
    monkeypatch.chdir(tmp_path)
    parent = start_parent_run(embedded, "moved-cwd")
    with child_run(embedded, parent, "trial-0") as run:
        run.log_text("hello", "notes/hello.txt")
    end_parent_run(embedded, parent)
    assert (workdir / "mlruns" / "medcl-test" / run.run_id / "artifacts" / "notes" / "hello.txt").read_text() == "hello"
    assert list(tmp_path.iterdir()) == []


def test_uri_precedence_and_relative_sqlite(workdir, embedded, monkeypatch):
    # MLFLOW_TRACKING_URI is used when no argument is given; a relative sqlite path is made absolute.
    monkeypatch.chdir(workdir)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
    target = configure_tracking(experiment="medcl-test")
    assert target.tracking_uri == embedded.tracking_uri
    assert target.experiment_id == embedded.experiment_id
    # The explicit argument beats the environment (the env points at a dead server).
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{_free_port()}")
    target = configure_tracking(embedded.tracking_uri, experiment="medcl-test")
    assert target.tracking_uri == embedded.tracking_uri


def test_telemetry_disabled_by_default_but_user_choice_kept(embedded, monkeypatch):
    monkeypatch.delenv("MLFLOW_DISABLE_TELEMETRY", raising=False)
    configure_tracking(embedded.tracking_uri, experiment="medcl-test")
    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "true"
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "false")
    configure_tracking(embedded.tracking_uri, experiment="medcl-test")
    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "false"


def test_parent_and_children_statuses_params_metrics(embedded):
    client = embedded.client()
    parent = start_parent_run(embedded, "sweep", tags={"kind": "sweep"}, params={"space": {"lr": [1e-3, 1e-4]}})
    long_value = "x" * 7000
    with child_run(embedded, parent, "trial-ok", params={"opt": {"lr": 1e-3, "betas": (0.9, 0.99)}, "note": long_value},
                   tags={"seed": 3}) as run:
        for step in range(3):
            run.log_metrics({"train/loss": 1.0 / (step + 1), "val": {"dice": 0.1 * step}}, step=step)
    with pytest.raises(RuntimeError, match="boom"):
        with child_run(embedded, parent, "trial-crash") as crashed:
            raise RuntimeError("boom")
    with pytest.raises(KeyboardInterrupt):
        with child_run(embedded, parent, "trial-interrupted") as interrupted:
            raise KeyboardInterrupt

    got = client.get_run(run.run_id)
    assert got.info.status == "FINISHED" and got.info.run_name == "trial-ok"
    assert got.data.tags["mlflow.parentRunId"] == parent and got.data.tags["seed"] == "3"
    assert got.data.params["opt.lr"] == "0.001" and got.data.params["opt.betas"] == "(0.9, 0.99)"
    assert got.data.params["note"] == "x" * 6000
    history = client.get_metric_history(run.run_id, "train/loss")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [(0, 1.0), (1, 0.5), (2, 1 / 3)]
    assert [m.value for m in client.get_metric_history(run.run_id, "val.dice")] == pytest.approx([0.0, 0.1, 0.2])
    assert client.get_run(crashed.run_id).info.status == "FAILED"
    assert client.get_run(interrupted.run_id).info.status == "KILLED"
    assert client.get_run(parent).data.params["space.lr"] == "[0.001, 0.0001]"

    df = search_runs(embedded, parent_run_id=parent)
    assert sorted(df["run_name"]) == ["trial-crash", "trial-interrupted", "trial-ok"]
    assert set(df["tags.mlflow.parentRunId"]) == {parent}
    ok = df.set_index("run_name").loc["trial-ok"]
    assert ok["metrics.train/loss"] == pytest.approx(1 / 3) and ok["status"] == "FINISHED"
    finished = search_runs(embedded, parent_run_id=parent, filter="attributes.status = 'FINISHED'")
    assert list(finished["run_id"]) == [run.run_id]
    assert end_parent_run(embedded, parent) == []
    assert client.get_run(parent).info.status == "FINISHED"


def test_artifact_kinds_land_in_the_run_directory(workdir, embedded, tmp_path):
    from matplotlib.figure import Figure

    figure = Figure()
    figure.add_subplot().plot([0, 1], [1, 0])
    figure.savefig(tmp_path / "curve.png", format="png")
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "model.pt").write_bytes(b"\x00" * 10)
    parent = start_parent_run(embedded, "artifacts")
    with child_run(embedded, parent, "trial") as run:
        run.log_text(yaml.safe_dump({"lr": 0.001, "stages": ["global", "local"], "data": str(tmp_path)}),
                     "config/resolved.yaml")
        run.log_artifact(tmp_path / "curve.png", artifact_path="plots")
        run.log_artifact(folder, artifact_path="best")
        run.set_tags({"best": {"epoch": 7}, "long": "t" * 9000})
    end_parent_run(embedded, parent)
    root = workdir / "mlruns" / "medcl-test" / run.run_id / "artifacts"
    assert yaml.safe_load((root / "config" / "resolved.yaml").read_text()) == {
        "lr": 0.001, "stages": ["global", "local"], "data": str(tmp_path)}
    assert (root / "plots" / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (root / "best" / "model.pt").read_bytes() == b"\x00" * 10
    tags = embedded.client().get_run(run.run_id).data.tags
    assert tags["best.epoch"] == "7" and tags["long"] == "t" * 8000


def test_resume_reuses_unfinished_child_only(embedded):
    parent = start_parent_run(embedded, "restored-sweep")
    with pytest.raises(ValueError):
        with child_run(embedded, parent, "trial-a") as first:
            raise ValueError("crash before restore")
    with child_run(embedded, parent, "trial-a") as second:
        second.log_metrics({"loss": 0.5}, step=1)
    assert second.run_id == first.run_id
    assert embedded.client().get_run(first.run_id).info.status == "FINISHED"
    with child_run(embedded, parent, "trial-a") as third:  # previous one FINISHED: a new run
        pass
    assert third.run_id != first.run_id
    with pytest.raises(ValueError):
        with child_run(embedded, parent, "trial-b") as b1:
            raise ValueError("crash")
    with child_run(embedded, parent, "trial-b", resume=False) as b2:
        pass
    assert b1.run_id != b2.run_id


def test_child_run_final_metrics_and_tracking_errors(embedded, monkeypatch):
    client = embedded.client()
    parent = start_parent_run(embedded, "final-metrics", tags={"medcl.role": "sweep"})
    with child_run(embedded, parent, "stage", tags={"medcl.role": "stage"}) as run:
        for epoch in range(2):
            run.log_metrics({"val/dice": 0.5 + 0.1 * epoch}, step=epoch)
        run.final_metrics = {"val/dice": 0.9, "test": {"dice": 0.8}, "checkpoint_dir_name": "ckpt",
                             "done": True, "epoch": 1}
    got = client.get_run(run.run_id)
    assert got.info.status == "FINISHED"
    assert got.data.metrics == pytest.approx({"val/dice": 0.6, "test.dice": 0.8, "epoch": 1.0})
    assert len(client.get_metric_history(run.run_id, "val/dice")) == 2  # the loop's history is kept as it is

    def store_down(self, status="FINISHED"):
        raise ConnectionError("store down")

    with monkeypatch.context() as mp:  # the training error is raised, not the tracking error
        mp.setattr(RunLogger, "end", store_down)
        with pytest.raises(RuntimeError, match="training diverged"):
            with child_run(embedded, parent, "diverged") as diverged:
                raise RuntimeError("training diverged")
    assert client.get_run(diverged.run_id).info.status == "RUNNING"  # left for end_parent_run to close
    with pytest.raises(ValueError, match=r"invalid MLflow key 'bad\|key'"):
        with child_run(embedded, parent, "bad-final") as bad:
            bad.final_metrics = {"bad|key": 1.0}
    assert client.get_run(bad.run_id).info.status == "FAILED"

    assert run_role(embedded, parent) == "sweep" and run_role(embedded, run.run_id) == "stage"
    assert run_role(embedded, bad.run_id) == "child"
    reopen_run(embedded, run.run_id)
    assert client.get_run(run.run_id).info.status == "RUNNING"
    log_new_metrics(embedded, run.run_id, {"test": {"dice": 0.1}, "stage/test/dice": 0.7, "note": "text"})
    assert client.get_run(run.run_id).data.metrics == pytest.approx(
        {"val/dice": 0.6, "test.dice": 0.8, "epoch": 1.0, "stage/test/dice": 0.7})
    assert sorted(end_parent_run(embedded, parent)) == sorted([diverged.run_id, run.run_id])


def test_pipeline_api_resumes_parent_and_children(embedded):
    """The non-context API the pipeline uses: trial processes get (uri, run_id) only."""
    client = embedded.client()
    params = {"pipeline": "demo", "seeds": [0, 1]}
    parent = parent_run_id(embedded, "demo-pipeline", params=params, tags={"medcl.role": "pipeline"})
    assert parent_run_id(embedded, "demo-pipeline", params=params) == parent  # interrupted: same parent
    assert find_parent_run(embedded, "demo-pipeline") == parent
    assert client.get_run(parent).data.tags["medcl.role"] == "pipeline"
    with pytest.raises(TrackingError, match="has different parameters"):
        parent_run_id(embedded, "demo-pipeline", params={"pipeline": "demo", "seeds": [0, 1, 2]})
    log_text(embedded, parent, "name: demo\n", "pipeline.yaml")

    run_id = child_run_id(embedded, parent, "finetune-p0.1-s0", params={"label_fraction": 0.1},
                          tags={"medcl.role": "final"})
    worker = attach_run_logger(embedded.tracking_uri, run_id)  # what rank 0 builds in a Ray worker
    for epoch in range(2):
        worker.log_metrics({"val/dice": 0.5 + 0.1 * epoch}, step=epoch)
    finish_run(embedded, run_id, metrics={"val/dice": 0.6, "test/dice_2d": 0.8, "checkpoint_dir_name": "ckpt",
                                          "done": True, "epoch": 1})
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["medcl.role"] == "final"
    assert run.data.metrics == pytest.approx({"val/dice": 0.6, "test/dice_2d": 0.8, "epoch": 1.0})
    assert len(client.get_metric_history(run_id, "val/dice")) == 2  # not logged a third time
    failed = child_run_id(embedded, parent, "pretrain-s0")
    finish_run(embedded, failed, status="FAILED")
    assert child_run_id(embedded, parent, "pretrain-s0") == failed  # a retried trial reuses its run
    assert client.get_run(failed).info.status == "RUNNING"

    assert end_parent_run(embedded, parent) == [failed]
    assert client.get_run(failed).info.status == "KILLED"
    assert [f.path for f in client.list_artifacts(parent)] == ["pipeline.yaml"]
    again = parent_run_id(embedded, "demo-pipeline", params=params)  # finished: a new parent
    assert again != parent and find_parent_run(embedded, "demo-pipeline") == again
    assert find_parent_run(embedded, "no-such-pipeline") is None
    with pytest.raises(ValueError, match="tracking_uri must be a non-empty string, got None"):
        attach_run_logger(None, run_id)
    end_parent_run(embedded, again)


def test_runs_left_running_are_closed_with_the_parent(embedded):
    client = embedded.client()
    parent = start_parent_run(embedded, "asha-sweep")
    # What a trial killed by ASHA leaves behind: a child that nobody ended.
    orphan = client.create_run(embedded.experiment_id, tags={"mlflow.parentRunId": parent}).info.run_id
    with child_run(embedded, parent, "survivor"):
        pass
    assert client.get_run(orphan).info.status == "RUNNING"
    assert close_open_children(embedded, parent) == [orphan]
    assert client.get_run(orphan).info.status == "KILLED"
    orphan2 = client.create_run(embedded.experiment_id, tags={"mlflow.parentRunId": parent}).info.run_id
    assert end_parent_run(embedded, parent, "FAILED") == [orphan2]
    assert client.get_run(parent).info.status == "FAILED"


def test_child_run_in_fresh_process_with_telemetry_off(embedded):
    """A trial process (fresh interpreter, pickled target, no CI markers) logs a child run,
    and MLflow never builds its telemetry client there."""
    parent = start_parent_run(embedded, "cross-process")
    code = (
        "import base64, os, pickle, sys\n"
        "import medcl.tracking as t\n"
        "assert 'mlflow' not in sys.modules\n"
        "target = pickle.loads(base64.b64decode(sys.argv[1]))\n"
        "with t.child_run(target, sys.argv[2], 'spawned-trial', params={'where': 'subprocess'}) as run:\n"
        "    run.log_metrics({'acc': 0.75}, step=0)\n"
        "import mlflow.telemetry.client as c\n"
        "print(run.run_id, os.environ['MLFLOW_DISABLE_TELEMETRY'], c.get_telemetry_client())\n"
    )
    env = {k: v for k, v in os.environ.items()
           if k not in {"MLFLOW_DISABLE_TELEMETRY", "PYTEST_CURRENT_TEST", "CI", "DO_NOT_TRACK"}}
    blob = base64.b64encode(pickle.dumps(embedded)).decode()
    out = subprocess.run([sys.executable, "-c", code, blob, parent], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    run_id, telemetry_env, telemetry_client = out.stdout.split()
    assert (telemetry_env, telemetry_client) == ("true", "None")
    run = embedded.client().get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == parent
    assert run.data.metrics == {"acc": 0.75} and run.data.params == {"where": "subprocess"}
    end_parent_run(embedded, parent)


def test_rank_zero_logger_logs_from_rank_zero_only(embedded):
    """What a stage loop gets: a logger on rank 0 when the stage has a run, else None (nothing logged)."""
    from types import SimpleNamespace

    from medcl.train.tracking_hook import rank_zero_logger

    parent = start_parent_run(embedded, "ranks")
    tracking = {"tracking_uri": embedded.tracking_uri, "run_id": parent}
    rank0 = rank_zero_logger(SimpleNamespace(is_rank_zero=True), SimpleNamespace(tracking=tracking))
    assert isinstance(rank0, RunLogger) and (rank0.tracking_uri, rank0.run_id) == (embedded.tracking_uri, parent)
    assert rank_zero_logger(SimpleNamespace(is_rank_zero=False), SimpleNamespace(tracking=tracking)) is None
    assert rank_zero_logger(SimpleNamespace(is_rank_zero=True), SimpleNamespace(tracking=None)) is None
    rank0.log_metrics({"m": 1.0}, step=2)
    assert [(m.step, m.value) for m in embedded.client().get_metric_history(parent, "m")] == [(2, 1.0)]
    end_parent_run(embedded, parent)


def test_input_errors(embedded, tmp_path):
    parent = start_parent_run(embedded, "errors")
    run = RunLogger(embedded, parent)
    with pytest.raises(ValueError, match=r"invalid MLflow key 'bad\|key'"):
        run.log_metrics({"bad|key": 1.0})
    with pytest.raises(ValueError, match="invalid MLflow key 'a//b'"):
        run.log_params({"a//b": 1})
    with pytest.raises(TypeError, match="metric 'loss' must be a real scalar, got 'high'"):
        run.log_metrics({"loss": "high"})
    with pytest.raises(TypeError, match="step must be an int, got 1.5"):
        run.log_metrics({"loss": 1.0}, step=1.5)
    with pytest.raises(ValueError, match="status must be one of .*got 'DONE'"):
        run.end("DONE")
    with pytest.raises(FileNotFoundError, match="artifact path .*missing.txt does not exist"):
        run.log_artifact(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="parent_run_id must be an MLflow run id string, got 'x y'"):
        with child_run(embedded, "x y", "t"):
            pass
    with pytest.raises(TrackingError, match="run 0123abcd not found"):
        with child_run(embedded, "0123abcd", "t"):
            pass
    with pytest.raises(ValueError, match="experiment must be a non-empty string, got ''"):
        configure_tracking(experiment="", workdir=tmp_path)
    with pytest.raises(TrackingError, match="not a file-backed sqlite URI"):
        configure_tracking("sqlite:///:memory:")
    with pytest.raises(ValueError, match="experiment 'nope' not found"):
        search_runs(embedded, experiment="nope")
    client = embedded.client()
    client.delete_experiment(client.create_experiment("to-delete"))
    with pytest.raises(TrackingError, match="experiment 'to-delete' is deleted .*mlflow experiments restore"):
        configure_tracking(embedded.tracking_uri, experiment="to-delete")
    assert end_parent_run(embedded, parent) == []


# ----------------------------------------------------------------- server ----
@pytest.fixture(scope="module", autouse=True)
def _server_starts_early(mlflow_server_process):
    """The session's ``mlflow server`` (tests/conftest.py) starts with this module: its start overlaps the
    embedded-store tests above."""


def test_server_roundtrip(mlflow_server, tmp_path):
    uri, root = mlflow_server
    target = configure_tracking(uri, experiment="server-exp", workdir=tmp_path)
    assert target.is_remote and target.tracking_uri == uri
    assert not (tmp_path / "mlflow.db").exists()  # nothing local when a server is used
    config_file = tmp_path / "pipeline.yaml"
    config_file.write_text("stage: finetune\n")
    parent = start_parent_run(target, "server-sweep", params={"protocol": "hippocampus"})
    child_ids = []
    for i, method in enumerate(["random-init", "global+local"]):
        with child_run(target, parent, f"trial-{i}", params={"method": method, "label_fraction": 0.1}) as run:
            run.log_metrics({"test/dice": 0.6 + 0.1 * i}, step=0)
            run.log_artifact(config_file, artifact_path="config")
            run.log_text(json.dumps({"seed": i}), "resolved.json")
            child_ids.append(run.run_id)
    end_parent_run(target, parent)

    df = search_runs(target, parent_run_id=parent).set_index("run_name")
    assert sorted(df["run_id"]) == sorted(child_ids)
    assert df.loc["trial-1", "params.method"] == "global+local"
    assert df.loc["trial-1", "metrics.test/dice"] == pytest.approx(0.7)
    assert set(df["status"]) == {"FINISHED"}
    client = target.client()
    assert client.get_run(parent).data.params == {"protocol": "hippocampus"}
    for run_id in child_ids:
        assert sorted(f.path for f in client.list_artifacts(run_id)) == ["config", "resolved.json"]
        assert [f.path for f in client.list_artifacts(run_id, "config")] == ["config/pipeline.yaml"]
    # The bytes really went through the server into its artifacts destination.
    art = root / "art" / target.experiment_id  # the server is the session's: other tests use other experiments
    stored = sorted(p.relative_to(art).parts[-2:] for p in art.rglob("pipeline.yaml"))
    assert stored == [("config", "pipeline.yaml")] * 2


def test_unreachable_server_fails_fast(tmp_path):
    uri = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    start = time.monotonic()
    with pytest.raises(TrackingError, match=f"MLflow tracking server {uri} is unreachable.*MLFLOW_TRACKING_URI"):
        configure_tracking(uri, workdir=tmp_path)
    assert time.monotonic() - start < 10
    assert list(tmp_path.iterdir()) == []
