"""Label-efficiency reports from runs in a real MLflow sqlite store."""
from __future__ import annotations

import csv
import math
import re
import statistics
import struct

import pandas as pd
import pytest

from medcl.report import format_table, label_efficiency_table, plot_label_efficiency, write_report
from medcl.tracking import child_run, configure_tracking, end_parent_run, start_parent_run

# (method, fraction as MLflow stores params) -> test Dice of each seed.
KNOWN = {
    ("random-init", "0.05"): [0.41, 0.45, 0.50],
    ("random-init", "0.2"): [0.60, 0.62, 0.67],
    ("random-init", "1.0"): [0.80, 0.82, 0.81],
    ("global+local", "0.05"): [0.55, 0.58, 0.52],
    ("global+local", "0.2"): [0.70, 0.71, 0.75],
    ("global+local", "1.0"): [0.84],  # a single seed: std undefined
}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module", autouse=True)
def _no_user_tracking_uri():
    """Tests choose their store explicitly; a user's MLFLOW_TRACKING_URI must not leak in."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        yield


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A parent with one FINISHED child per (method, fraction, seed), plus runs the report must skip."""
    target = configure_tracking(workdir=tmp_path_factory.mktemp("store"), experiment="report-test")
    parent = start_parent_run(target, "label-efficiency-sweep")
    for (method, fraction), values in KNOWN.items():
        for seed, value in enumerate(values):
            params = {"method": method, "label_fraction": fraction, "seed": seed}
            with child_run(target, parent, f"{method}-{fraction}-{seed}", params=params,
                           tags={"medcl.role": "final"}, resume=False) as run:
                run.log_metrics({"val/dice": 0.0}, step=0)
                run.log_metrics({"test/dice": value})
    # Killed by ASHA after logging an outlier: not FINISHED, so left out.
    with pytest.raises(KeyboardInterrupt):
        with child_run(target, parent, "killed", params={"method": "random-init", "label_fraction": "0.05"},
                       resume=False) as run:
            run.log_metrics({"test/dice": 0.01})
            raise KeyboardInterrupt
    # A FINISHED run of another role with the metric: left out only by the role filter.
    with child_run(target, parent, "pretrain", params={"method": "random-init", "label_fraction": "1.0"},
                   tags={"medcl.role": "pretrain"}, resume=False) as run:
        run.log_metrics({"test/dice": 0.0})
    # Finished without the metric: left out.
    with child_run(target, parent, "no-metric", params={"method": "random-init", "label_fraction": "0.2"},
                   resume=False):
        pass
    end_parent_run(target, parent)
    return target, parent


def _expected(method: str, fraction: str) -> tuple[float, float, int]:
    values = KNOWN[(method, fraction)]
    std = statistics.stdev(values) if len(values) > 1 else math.nan
    return statistics.fmean(values), std, len(values)


def test_write_report_csv_png_and_parent_artifacts(sweep, tmp_path):
    target, parent = sweep
    csv_path, png_path, table = write_report(target, parent, "test/dice", tmp_path / "report",
                                             filter="tags.`medcl.role` = 'final'")
    assert csv_path == tmp_path / "report" / "label_efficiency_test_dice.csv"

    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["method", "label_fraction", "mean", "std", "n"]
    assert {(r["method"], float(r["label_fraction"])) for r in rows} == {(m, float(p)) for m, p in KNOWN}
    for r in rows:
        fraction = next(p for m, p in KNOWN if m == r["method"] and float(p) == float(r["label_fraction"]))
        mean, std, n = _expected(r["method"], fraction)
        assert float(r["mean"]) == pytest.approx(mean, abs=1e-12)
        assert int(r["n"]) == n
        if math.isnan(std):
            assert r["std"] == ""
        else:
            assert float(r["std"]) == pytest.approx(std, abs=1e-12)
    assert len(table) == len(KNOWN)

    data = png_path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 1000
    width, height = struct.unpack(">II", data[16:24])  # IHDR chunk
    assert width > 100 and height > 100

    client = target.client()
    logged = {f.path: f.file_size for f in client.list_artifacts(parent, "report")}
    assert logged == {"report/label_efficiency_test_dice.csv": csv_path.stat().st_size,
                      "report/label_efficiency_test_dice.png": len(data)}
    assert not list((tmp_path / "report").glob(".*tmp"))  # no temp files left


def test_without_role_filter_other_finished_runs_count(sweep, tmp_path):
    target, parent = sweep
    _, _, table = write_report(target, parent, "test/dice", tmp_path)
    cell = table[(table["method"] == "random-init") & (table["label_fraction"] == 1.0)].iloc[0]
    values = KNOWN[("random-init", "1.0")] + [0.0]
    assert cell["n"] == 4 and cell["mean"] == pytest.approx(statistics.fmean(values))


def test_format_table(sweep):
    target, parent = sweep
    from medcl.tracking import search_runs

    runs = search_runs(target, parent_run_id=parent, filter="attributes.status = 'FINISHED' and tags.`medcl.role` = 'final'")
    text = format_table(label_efficiency_table(runs, "test/dice"))
    lines = text.splitlines()
    assert lines[0].split() == ["method", "label_fraction", "mean", "±", "std", "n"]
    assert set(lines[1]) == {"-", " "} and len(lines) == 2 + len(KNOWN)
    cells = {tuple(re.split(r"\s{2,}", line.strip())) for line in lines[2:]}
    mean, std, n = _expected("random-init", "0.05")
    assert ("random-init", "5%", f"{mean:.3f} ± {std:.3f}", str(n)) in cells
    assert ("global+local", "100%", f"{_expected('global+local', '1.0')[0]:.3f} ± n/a", "1") in cells


def test_table_from_plain_frame_and_group_order():
    runs = pd.DataFrame({
        "params.method": ["a", "a", "b", "a"],
        "params.label_fraction": ["0.1", "0.1", "0.1", "0.5"],
        "params.arch": ["unet"] * 4,
        "metrics.acc": [0.5, 0.7, 0.9, None],
    })
    table = label_efficiency_table(runs, "acc", group_by=("method", "arch"))
    assert list(table.columns) == ["method", "arch", "label_fraction", "mean", "std", "n"]
    assert table.to_dict("records")[0] == pytest.approx(
        {"method": "a", "arch": "unet", "label_fraction": 0.1, "mean": 0.6, "std": math.sqrt(0.02), "n": 2})
    assert len(table) == 2  # the run without the metric is dropped
    pooled = label_efficiency_table(runs, "acc", group_by=())
    (record,) = pooled.to_dict("records")
    assert record == pytest.approx({"label_fraction": 0.1, "mean": 0.7, "std": statistics.stdev([0.5, 0.7, 0.9]), "n": 3})


def test_table_input_errors():
    runs = pd.DataFrame({"run_id": ["r1", "r2"], "params.method": ["a", "b"],
                         "params.label_fraction": ["0.1", "ten"], "metrics.acc": [0.5, 0.6]})
    with pytest.raises(ValueError, match="label_fraction must be a positive number; got \\['ten'\\] in runs \\['r2'\\]"):
        label_efficiency_table(runs, "acc")
    with pytest.raises(ValueError, match="group_by key 'encoder' not found .*available: \\['params.label_fraction', 'params.method'\\]"):
        label_efficiency_table(runs, "acc", group_by="encoder")
    with pytest.raises(ValueError, match="metric 'dice' not found"):
        label_efficiency_table(runs, "dice")
    with pytest.raises(ValueError, match="no run has a value for metric 'acc'"):
        label_efficiency_table(runs.assign(**{"metrics.acc": [None, None]}), "acc")
    zero = runs.assign(**{"params.label_fraction": ["0", "0.1"]})
    with pytest.raises(ValueError, match="label_fraction must be a positive number; got \\['0'\\]"):
        label_efficiency_table(zero, "acc")


def test_plot_input_errors_and_nan_std(tmp_path):
    table = pd.DataFrame({"method": ["a", "a"], "label_fraction": [0.2, 0.5],
                          "mean": [0.5, 0.6], "std": [0.1, float("nan")], "n": [2, 1]})
    with pytest.raises(ValueError, match="path must end in .png, got '.*curve.jpg'"):
        plot_label_efficiency(table, "acc", tmp_path / "curve.jpg")
    with pytest.raises(ValueError, match="table must have columns"):
        plot_label_efficiency(table.drop(columns="n"), "acc", tmp_path / "curve.png")
    path = plot_label_efficiency(table, "acc", tmp_path / "sub" / "curve.png")
    assert path.read_bytes()[:8] == PNG_MAGIC
    pooled = plot_label_efficiency(table.drop(columns="method"), "acc", tmp_path / "pooled.png")  # no groups
    assert pooled.read_bytes()[:8] == PNG_MAGIC


def test_write_report_without_finished_children(sweep, tmp_path):
    target, _ = sweep
    empty_parent = start_parent_run(target, "empty")
    with pytest.raises(ValueError, match=f"no FINISHED child runs under parent_run_id='{empty_parent}'"):
        write_report(target, empty_parent, "test/dice", tmp_path)
    end_parent_run(target, empty_parent)


def test_paired_differences_pair_by_seed_with_a_bootstrap_interval():
    from medcl.report import format_paired, paired_differences

    runs = pd.DataFrame({
        "params.method": ["random"] * 4 + ["global"] * 4 + ["local"] * 2,
        "params.label_fraction": ["0.01", "0.01", "0.05", "0.05"] * 2 + ["0.01", "0.01"],
        "params.seed": ["0", "1", "0", "1", "1", "0", "0", "1", "0", "7"],
        "metrics.test/dice_2d": [0.5, 0.6, 0.7, 0.7, 0.7, 0.5, 0.8, 0.8, 0.45, 0.9],
    })
    table = paired_differences(runs, "test/dice_2d", baseline="random").set_index(["method", "label_fraction"])
    # global at 1 %: seed 0 0.5-0.5 = 0, seed 1 0.7-0.6 = 0.1. The bootstrap means of two values
    # are 0, 0.05, 0.1 with probabilities 1/4, 1/2, 1/4, so the 95 % interval is [0, 0.1].
    row = table.loc[("global", 0.01)]
    assert row["mean_diff"] == pytest.approx(0.05) and row["n"] == 2 and row["wins"] == 1
    assert (row["ci_low"], row["ci_high"]) == pytest.approx((0.0, 0.1))
    row = table.loc[("global", 0.05)]  # equal differences: a zero-width interval
    assert (row["mean_diff"], row["ci_low"], row["ci_high"]) == pytest.approx((0.1, 0.1, 0.1))
    row = table.loc[("local", 0.01)]  # seed 7 has no random-init partner: left out
    assert row["n"] == 1 and row["mean_diff"] == pytest.approx(-0.05)
    assert "global  1%  +0.050 [+0.000, +0.100]  1/2" in format_paired(table.reset_index(), "random")
    with pytest.raises(ValueError, match="baseline 'none' is not a method of the runs"):
        paired_differences(runs, "test/dice_2d", baseline="none")


def test_cli_report_with_baseline_prints_and_writes_paired_differences(sweep, tmp_path, capsys):
    from medcl.cli import main

    target, _ = sweep
    code = main(["report", "--experiment", "report-test", "--pipeline", "label-efficiency-sweep",
                 "--metric", "test/dice", "--tracking-uri", target.tracking_uri, "--out", str(tmp_path),
                 "--baseline", "random-init"])
    out = capsys.readouterr().out
    assert code == 0
    # global+local - random-init at 5 %, seeds 0..2: +0.14, +0.13, +0.02
    assert "global+local  5%  +0.097 [" in out
    rows = list(csv.DictReader(open(tmp_path / "paired_test_dice_vs_random-init.csv")))
    by = {(r["method"], float(r["label_fraction"])): r for r in rows}
    assert float(by[("global+local", 0.05)]["mean_diff"]) == pytest.approx((0.14 + 0.13 + 0.02) / 3)
    assert int(by[("global+local", 1.0)]["n"]) == 1  # one seed at 100 %
    code = main(["report", "--experiment", "report-test", "--pipeline", "label-efficiency-sweep",
                 "--metric", "test/dice", "--tracking-uri", target.tracking_uri, "--out", str(tmp_path),
                 "--baseline", "nope"])
    assert code == 2 and "--baseline: baseline 'nope' is not a method" in capsys.readouterr().err
