"""``medcl report`` finds a pipeline's experiment and store itself, and never creates either (issue 16, item 6)."""
from __future__ import annotations

import csv

import pytest
import yaml

from medcl.cli import main
from medcl.tracking import child_run, configure_tracking, end_parent_run, start_parent_run

DICE = {("random", "0.05"): [0.40, 0.50], ("global", "0.05"): [0.60, 0.62]}


@pytest.fixture(scope="module", autouse=True)
def _no_user_tracking_uri():
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        yield


def _pipeline_record(target, name: str, dice: dict) -> None:
    parent = start_parent_run(target, name)
    for (method, fraction), values in dice.items():
        for seed, value in enumerate(values):
            with child_run(target, parent, f"{method}-{fraction}-{seed}", resume=False,
                           params={"method": method, "label_fraction": fraction, "seed": seed},
                           tags={"medcl.role": "final"}) as run:
                run.log_metrics({"test/dice": value})
    end_parent_run(target, parent)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Experiments exp-a (pipelines 'pipe' and 'dup') and exp-b ('dup' too) in one sqlite store."""
    root = tmp_path_factory.mktemp("store")
    a = configure_tracking(workdir=root, experiment="exp-a")
    b = configure_tracking(workdir=root, experiment="exp-b")
    _pipeline_record(a, "pipe", DICE)
    _pipeline_record(a, "dup", DICE)
    _pipeline_record(b, "dup", DICE)
    return a.tracking_uri


def _experiments(uri: str) -> list[str]:
    from mlflow import MlflowClient

    return sorted(e.name for e in MlflowClient(uri).search_experiments())


def _means(path) -> dict[str, float]:
    return {row["method"]: float(row["mean"]) for row in csv.DictReader(open(path))}


def test_a_pipeline_name_finds_its_experiment(store, tmp_path, capsys):
    code = main(["report", "pipe", "--tracking-uri", store, "--metric", "test/dice", "--out", str(tmp_path)])
    assert code == 0, capsys.readouterr().err
    means = _means(tmp_path / "label_efficiency_test_dice.csv")
    assert means == pytest.approx({"random": 0.45, "global": 0.61})


def test_a_pipeline_file_gives_name_experiment_store_and_metric(store, tmp_path, capsys):
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(yaml.safe_dump({"name": "renamed-later", "metric": "test/dice",
                                        "tracking": {"experiment": "exp-a", "tracking_uri": store}}))
    code = main(["report", str(pipeline), "--set", "name=pipe", "--out", str(tmp_path / "r")])
    assert code == 0, capsys.readouterr().err
    assert _means(tmp_path / "r" / "label_efficiency_test_dice.csv") == pytest.approx({"random": 0.45, "global": 0.61})


def test_a_name_in_two_experiments_asks_which(store, tmp_path, capsys):
    code = main(["report", "dup", "--tracking-uri", store, "--metric", "test/dice", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "'exp-a', 'exp-b'" in err and "--experiment" in err
    assert main(["report", "dup", "--experiment", "exp-b", "--tracking-uri", store, "--metric", "test/dice",
                 "--out", str(tmp_path)]) == 0


def test_nothing_is_created_by_a_report(store, tmp_path, capsys, monkeypatch):
    before = _experiments(store)
    code = main(["report", "pipe", "--experiment", "nope", "--tracking-uri", store, "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code != 0 and "no experiment 'nope'" in err and "'exp-a'" in err
    assert _experiments(store) == before  # no experiment created
    monkeypatch.chdir(tmp_path)
    code = main(["report", "pipe", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code != 0 and "no MLflow store at" in err
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()
