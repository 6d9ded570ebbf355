"""The ``medcl`` command line: verbs, help with examples, ingest, and user errors as one message with exit 2."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from medcl.cli import main

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "pipelines" / "quickstart.yaml"
VERBS = ("ingest", "pretrain", "finetune", "run", "sweep", "report", "validate", "export")


def _run(argv, capsys) -> tuple[int, str, str]:
    """``main(argv)`` -> (exit status, stdout, stderr); argparse's own exits included."""
    try:
        code = main(argv)
    except SystemExit as exc:  # --help, --version and argparse usage errors
        code = exc.code if isinstance(exc.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err


def _assert_user_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, f"{needle!r} not in {err!r}"


def test_top_level_help_lists_every_verb(capsys):
    code, out, _ = _run(["--help"], capsys)
    assert code == 0
    assert "usage: medcl" in out
    listed = {line.split()[0] for line in out.splitlines() if line.startswith("    ") and line.split()}
    assert set(VERBS) <= listed
    assert "medcl VERB --help" in out


@pytest.mark.parametrize("verb", VERBS)
def test_each_verb_help_shows_a_worked_example(capsys, verb):
    code, out, _ = _run([verb, "--help"], capsys)
    assert code == 0
    assert f"usage: medcl {verb}" in out
    examples = out.split("examples:", 1)[1]
    assert f"medcl {verb} " in examples  # at least one full command line of this verb


def test_ingest_source_help_lists_its_options(capsys):
    code, out, _ = _run(["ingest", "synthetic", "--help"], capsys)
    assert code == 0
    for flag in ("--out", "--num-patients", "--images-per-patient", "--size", "--shifted-patients", "--seed"):
        assert flag in out
    assert "examples:" in out
    code, out, _ = _run(["ingest", "medmnist", "--help"], capsys)
    options = out.split("examples:", 1)[0]
    assert code == 0 and "source" in options and "--class-names" in options and "--num-patients" not in options


def test_version(capsys):
    from medcl import __version__

    code, out, _ = _run(["--version"], capsys)
    assert code == 0 and out.strip() == f"medcl {__version__}"


def test_ingest_synthetic_writes_a_dataset(tmp_path, capsys):
    out_dir = tmp_path / "synth"
    code, out, err = _run(["ingest", "synthetic", "--out", str(out_dir), "--num-patients", "6",
                           "--images-per-patient", "3", "--size", "16", "--seed", "1", "-q"], capsys)
    assert code == 0, err
    assert out.startswith(f"{out_dir}: 6 patients, 18 images")
    assert "image shape [1, 16, 16]" in out
    manifest = json.loads((out_dir / "manifest.json").read_text())
    assert manifest["source"]["kind"] == "synthetic"
    assert manifest["source"]["options"]["num_patients"] == 6 and manifest["source"]["options"]["seed"] == 1
    assert sorted(out_dir.glob("shard-*.parquet")) and (out_dir / "bags.parquet").is_file()
    import pyarrow.parquet as pq

    rows = sum(pq.read_metadata(p).num_rows for p in out_dir.glob("shard-*.parquet"))
    assert rows == 18
    # the same command again is a no-op that still succeeds
    code, out2, _ = _run(["ingest", "synthetic", "--out", str(out_dir), "--num-patients", "6",
                          "--images-per-patient", "3", "--size", "16", "--seed", "1", "-q"], capsys)
    assert code == 0 and out2 == out


def test_validate_a_good_pipeline(capsys):
    code, out, err = _run(["validate", str(QUICKSTART), "-q"], capsys)
    assert code == 0, err
    assert out.strip() == f"{QUICKSTART}: valid; 26 stage jobs"


def test_unknown_pipeline_key_exits_2_with_one_message(tmp_path, capsys):
    data = yaml.safe_load(QUICKSTART.read_text())
    data["label_fraction"] = [0.5]
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    code, out, err = _run(["validate", str(bad), "-q"], capsys)
    _assert_user_error(code, err, f"medcl validate: error: invalid configuration in {bad}:",
                       "label_fraction: unknown key (did you mean 'label_fractions'?)")
    assert out == "" and err.count("error:") == 1


def test_fraction_out_of_range_exits_2(tmp_path, capsys):
    code, _, err = _run(["finetune", "--data", str(tmp_path), "--stage", "seg_finetune",
                         "--set", "label_fraction=1.5", "max_epochs=1", "-q"], capsys)
    _assert_user_error(code, err, "medcl finetune: error:", "label_fraction: must be in (0, 1], got 1.5")
    code, _, err = _run(["run", str(QUICKSTART), "--set", "label_fractions=[0.5, 2]", "-q"], capsys)
    _assert_user_error(code, err, "medcl run: error:", "label_fractions: must be in (0, 1], got [2.0]")


def test_missing_files_exit_2(tmp_path, capsys):
    missing = tmp_path / "nope.yaml"
    code, _, err = _run(["validate", str(missing), "-q"], capsys)
    _assert_user_error(code, err, f"file not found: {missing}")
    code, _, err = _run(["pretrain", "--data", str(tmp_path), "--stage", "global_pretrain",
                         "--config", str(missing), "-q"], capsys)
    _assert_user_error(code, err, "medcl pretrain: error:", f"file not found: {missing}")
    code, _, err = _run(["pretrain", "--data", str(tmp_path / "no-data"), "--stage", "global_pretrain", "-q"], capsys)
    _assert_user_error(code, err, "medcl pretrain: error:", f"--data: no medcl dataset at {tmp_path / 'no-data'}")
    code, _, err = _run(["ingest", "medmnist", str(tmp_path / "x.npz"), "--out", str(tmp_path / "o"), "-q"], capsys)
    _assert_user_error(code, err, "medcl ingest: error:", "x.npz: MedMNIST .npz file not found")
    assert not (tmp_path / "o").exists()


def test_unknown_ingest_option_exits_2(tmp_path, capsys):
    # on the command line: argparse rejects the flag
    code, _, err = _run(["ingest", "synthetic", "--out", str(tmp_path / "o"), "--bogus-option", "3"], capsys)
    _assert_user_error(code, err, "unrecognized arguments: --bogus-option 3")
    # in a pipeline file: validation names the key path
    data = yaml.safe_load(QUICKSTART.read_text())
    data["dataset"]["options"]["bogus_option"] = 3
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    code, _, err = _run(["validate", str(bad), "-q"], capsys)
    _assert_user_error(code, err, "dataset.options.bogus_option: unknown synthetic ingest option")
    # a bad option value reaches the ingest and is named there
    code, _, err = _run(["ingest", "synthetic", "--out", str(tmp_path / "o"), "--num-classes", "9", "-q"], capsys)
    _assert_user_error(code, err, "medcl ingest: error: num_classes=9 must lie in [2, 4]")
    assert not (tmp_path / "o").exists()


def test_unknown_verb_and_stage_exit_2(capsys):
    code, _, err = _run(["train"], capsys)
    _assert_user_error(code, err, "invalid choice: 'train'")
    code, _, err = _run(["finetune", "--data", "d", "--stage", "global_pretrain"], capsys)
    _assert_user_error(code, err, "argument --stage: invalid choice: 'global_pretrain'")


def test_console_script_runs(tmp_path):
    script = Path(sys.executable).with_name("medcl")
    assert script.is_file(), f"console script missing at {script}; pip install -e ."
    done = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert all(verb in done.stdout for verb in VERBS)
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\n")
    done = subprocess.run([str(script), "validate", str(bad)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert "dataset: required key is missing" in done.stderr and done.stdout == ""


# ------------------------------------------------------------------ runtime failures (issue 13) ----
def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_runtime_failure_is_one_line_with_exit_1_and_verbose_adds_the_traceback(tmp_path, capsys):
    server = f"http://127.0.0.1:{_free_port()}"  # nothing listens there: an unreachable MLflow server
    argv = ["report", "--pipeline", "p", "--tracking-uri", server, "--out", str(tmp_path / "r")]
    code, out, err = _run([*argv, "-q"], capsys)
    assert code == 1 and out == ""
    assert err.splitlines() == [err.strip()]  # exactly one line
    assert err.startswith(f"medcl report: error: MLflow tracking server {server} is unreachable")
    assert "Traceback" not in err
    code, _, err = _run([*argv, "--verbose"], capsys)
    assert code == 1
    assert "Traceback (most recent call last)" in err and "TrackingError" in err
    assert err.strip().splitlines()[-1].startswith("medcl report: error: MLflow tracking server")


def test_a_full_disk_says_what_to_do_and_ray_wrappers_are_taken_off():
    from ray.exceptions import RayTaskError
    from ray.train import WorkerGroupError

    from medcl.runner.failures import describe_error

    with open("/dev/full", "wb", buffering=0) as fh, pytest.raises(OSError) as info:
        fh.write(b"x")  # every write to /dev/full fails with ENOSPC
    message = describe_error(info.value)
    assert message.startswith("no space left on device") and "run the same command again to resume" in message
    # a trial's error (Tune) and a Train worker's error arrive wrapped, with a remote traceback in their text
    task = RayTaskError("train", "Traceback (most recent call last):\n  ...", KeyError("image"))
    assert describe_error(task) == "KeyError: 'image'"
    group = WorkerGroupError("Training failed due to worker errors", {1: info.value})
    assert describe_error(group).startswith("no space left on device")


# ------------------------------------------------------------------ single-stage run names (issue 13) ----
STAGE_YAML = """\
temperature: 0.5
max_epochs: 1
batch_size_per_worker: 4
model: {features: [8, 16], norm: batch}
"""


@pytest.fixture
def tiny_dataset(tmp_path) -> Path:
    from medcl.data.ingest import ingest

    ingest("synthetic", None, tmp_path / "data", {"num_patients": 6, "images_per_patient": 4, "size": 16, "seed": 0})
    return tmp_path / "data"


def test_a_stage_run_is_named_after_its_settings_and_refuses_other_settings_under_its_name(tiny_dataset, tmp_path,
                                                                                           capsys):
    from medcl.config import GlobalPretrainConfig
    from medcl.train.run_record import check_stage_resumable, stage_run_name, write_stage_record

    cfg = GlobalPretrainConfig(lr=1e-3)
    name = stage_run_name(cfg, tiny_dataset)
    assert name.startswith("global_pretrain-") and name == stage_run_name(GlobalPretrainConfig(lr=1e-3), tiny_dataset)
    assert stage_run_name(GlobalPretrainConfig(lr=1e-2), tiny_dataset) != name
    assert stage_run_name(GlobalPretrainConfig(lr=1e-3, init_from=tmp_path / "ckpt"), tiny_dataset) != name
    other = tmp_path / "other"
    other.mkdir()
    (other / "manifest.json").write_bytes((tiny_dataset / "manifest.json").read_bytes())
    assert stage_run_name(cfg, other) != name  # another dataset

    # a run records its settings; the same settings resume, other ones are refused naming what changed
    out = tmp_path / "runs"
    assert check_stage_resumable(cfg, tiny_dataset, out, name) is False
    write_stage_record(cfg, tiny_dataset, out, name)
    assert check_stage_resumable(GlobalPretrainConfig(lr=1e-3), tiny_dataset, out, name) is True
    with pytest.raises(ValueError, match=r"lr 0\.001 -> 0\.01"):
        check_stage_resumable(GlobalPretrainConfig(lr=1e-2), tiny_dataset, out, name)
    # the command line refuses before Ray starts (exit 2)
    code, _, err = _run(["pretrain", "--data", str(tiny_dataset), "--stage", "global_pretrain", "--name", name,
                         "--out", str(out), "--set", "lr=0.01", "-q"], capsys)
    _assert_user_error(code, err, f"stage run {name!r} at {out / name} was started with other settings",
                       "lr 0.001 -> 0.01", "leave --name out")


@pytest.mark.ray
def test_two_stage_runs_with_other_settings_do_not_share_a_result(ray_session, tiny_dataset, tmp_path, capsys):
    config = tmp_path / "stage.yaml"
    config.write_text(STAGE_YAML)
    base = ["pretrain", "--data", str(tiny_dataset), "--stage", "global_pretrain", "--config", str(config),
            "--out", str(tmp_path / "runs"), "-q"]
    code, out, err = _run(base, capsys)
    assert code == 0, err
    first = json.loads(out)
    code, out, err = _run([*base, "--set", "temperature=0.2"], capsys)
    assert code == 0, err
    second = json.loads(out)
    # each run trained its own model in its own directory, named after its settings
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert len(runs) == 2 and all(r.startswith("global_pretrain-") for r in runs)
    assert Path(first["checkpoint"]).parent.name != Path(second["checkpoint"]).parent.name
    assert {Path(first["checkpoint"]).parent.name, Path(second["checkpoint"]).parent.name} == set(runs)
    assert first["metrics"]["train/loss"] != second["metrics"]["train/loss"]
    stage = json.loads((Path(second["checkpoint"]).parent / "stage.json").read_text())
    assert stage["config"]["temperature"] == 0.2
