"""What `medcl validate` catches before Ray starts, each problem at its key path and all at once (issue 13, item 9).

Negative seeds, non-finite numbers, a metric no stage logs, unsafe run names,
keys written twice, and text that YAML 1.1 reads as a boolean or a date. Every
case is a hand-written YAML file; the expected messages are written out.
"""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from medcl.config import stage_config_from_dict
from medcl.config.binder import ConfigError, load_yaml
from medcl.config.pipeline import load_pipeline
from medcl.config.sweep import load_sweep

PIPELINE = """\
name: tiny
dataset: {path: data/tiny, source: synthetic, options: {num_patients: 8, seed: 0}}
metric: test/dice_2d
label_fractions: [0.5, 1.0]
seeds: [0, 1]
stages:
  global:
    kind: global_pretrain
    temperature: 0.5
    model: {features: [8, 16]}
  local:
    kind: local_pretrain
    loss: both
    model: {features: [8, 16]}
  finetune:
    kind: seg_finetune
    lr: 1.0e-3
    model: {features: [8, 16]}
methods:
  random: [finetune]
  global: [global, finetune]
tracking: {experiment: medcl}
"""


def _pipeline(tmp_path: Path, text: str = PIPELINE, **replace: str) -> Path:
    for old, new in replace.items():
        assert old in text, old
        text = text.replace(old, new)
    path = tmp_path / "pipe.yaml"
    path.write_text(text)
    return path


def _problems(load, *args) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(*args)
    return info.value.problems


def _sweep(tmp_path: Path, body: str) -> Path:
    _pipeline(tmp_path)
    path = tmp_path / "sweep.yaml"
    path.write_text("name: s\npipeline: pipe.yaml\nspace:\n  stages.global.temperature: {grid: [0.1]}\n"
                    + textwrap.dedent(body))
    return path


# ----------------------------------------------------------------------------- seeds
def test_negative_seeds_are_refused_at_their_key_paths(tmp_path):
    path = _pipeline(tmp_path, **{"seeds: [0, 1]": "seeds: [0, -1, 2, -7]",
                                  "seed: 0}}": "seed: -3}}"})
    assert _problems(load_pipeline, path) == [
        "seeds[1]: must be an integer in [0, 2**31), got -1",
        "seeds[3]: must be an integer in [0, 2**31), got -7",
    ]
    # the dataset's ingest seed, reported once the rest of the file is valid
    path = _pipeline(tmp_path, **{"seed: 0}}": "seed: -3}}"})
    assert _problems(load_pipeline, path) == ["dataset.options.seed: must be an integer in [0, 2**31), got -3"]
    # a stage's own seed (medcl pretrain/finetune --set seed=...)
    with pytest.raises(ConfigError) as info:
        stage_config_from_dict({"kind": "seg_finetune", "seed": -1}, path="stages.finetune")
    assert info.value.problems == ["stages.finetune.seed: must be an integer in [0, 2**31), got -1"]
    with pytest.raises(ConfigError, match=r"seed: must be an integer in \[0, 2\*\*31\), got 2147483648"):
        stage_config_from_dict({"kind": "global_pretrain", "seed": 2**31})


def test_negative_seeds_in_a_sweep_are_refused(tmp_path):
    path = _sweep(tmp_path, "method: random\nmetric: best/val/dice_2d\nmode: max\nsearch_seed: -1\n")
    path.write_text(path.read_text().replace("stages.global.temperature: {grid: [0.1]}", "seed: {grid: [0, -1]}"))
    problems = _problems(load_sweep, path)
    assert "search_seed: must be an integer in [0, 2**31), got -1" in problems
    assert any(p.startswith("space.seed: seeds must be integers in [0, 2**31)") for p in problems), problems
    assert len(problems) == 2, problems


# ----------------------------------------------------------------------------- non-finite numbers
def test_nan_and_inf_are_refused_wherever_a_number_is_expected(tmp_path):
    path = _pipeline(tmp_path, **{"temperature: 0.5": "temperature: .inf",
                                  "lr: 1.0e-3": "lr: .nan",
                                  "label_fractions: [0.5, 1.0]": "label_fractions: [0.5, -.inf]"})
    assert _problems(load_pipeline, path) == [
        "label_fractions[1]: expected a finite number, got -inf",
        "stages.global.temperature: expected a finite number, got inf",
        "stages.finetune.lr: expected a finite number, got nan",
    ]
    # 1e999 (a YAML 1.1 string taken as a number) overflows to inf
    with pytest.raises(ConfigError) as info:
        stage_config_from_dict({"kind": "seg_finetune", "weight_decay": "1e999"})
    assert info.value.problems == ["weight_decay: expected a finite number, got inf"]


# ----------------------------------------------------------------------------- metrics
def test_a_pipeline_metric_that_no_last_stage_logs_is_refused(tmp_path):
    path = _pipeline(tmp_path, **{"metric: test/dice_2d": "metric: test/dice"})
    problems = _problems(load_pipeline, path)
    assert len(problems) == 1
    assert problems[0].startswith("metric: stage 'finetune' (seg_finetune), which ends method 'random', does not "
                                  "log 'test/dice' (did you mean 'test/dice_2d'?); it logs every epoch: epoch, ")
    # an evaluation metric of the other task
    path = _pipeline(tmp_path, **{"metric: test/dice_2d": "metric: test/auc"})
    assert "does not log 'test/auc'" in _problems(load_pipeline, path)[0]
    # every name the stage logs is accepted, per-class ones included
    for metric in ("test/dice_3d_class1_mean", "shifted/dice_2d", "train/loss", "epoch"):
        assert load_pipeline(_pipeline(tmp_path, **{"metric: test/dice_2d": f"metric: {metric}"})).metric == metric


@pytest.mark.parametrize("stage, metric, message", [
    ("global", "best/val/dice_2d", "metric: 'best/val/dice_2d' is reported by fine-tuning stages after their last "
                                   "epoch, but this sweep ends with stage 'global' (global_pretrain)"),
    ("local", "train/dense_los", "metric: stage 'local' (local_pretrain), which ends this sweep, does not log "
                                 "'train/dense_los' (did you mean 'train/dense_loss'?)"),
    ("finetune", "val/dice", "metric: stage 'finetune' (seg_finetune), which ends this sweep, does not log "
                             "'val/dice' (did you mean 'val/dice_2d'?)"),
])
def test_a_sweep_metric_that_the_swept_stage_does_not_log_is_refused(tmp_path, stage, metric, message):
    path = _sweep(tmp_path, f"stage: {stage}\nmetric: {metric}\nmode: min\n")
    path.write_text(path.read_text().replace("stages.global.temperature", f"stages.{stage}.lr"))
    problems = _problems(load_sweep, path)
    assert len(problems) == 1 and problems[0].startswith(message), problems


def test_a_loss_logged_only_by_some_settings_is_checked_against_them(tmp_path):
    path = _sweep(tmp_path, "stage: local\nmetric: train/dense_loss\nmode: min\n")
    path.write_text(path.read_text().replace("stages.global.temperature", "stages.local.lr"))
    assert load_sweep(path).metric == "train/dense_loss"  # loss: both logs it
    path.write_text(path.read_text() + "overrides: [stages.local.loss=supervised]\n")
    assert "does not log 'train/dense_loss'" in _problems(load_sweep, path)[0]


# ----------------------------------------------------------------------------- names
@pytest.mark.parametrize("name", ["../runs", "a/b", "a\\\\b", "..", "''", ".hidden", "/abs"])
def test_a_pipeline_name_that_is_not_one_safe_directory_name_is_refused(tmp_path, name):
    path = _pipeline(tmp_path, **{"name: tiny": f'name: "{name}"' if name != "''" else "name: ''"})
    problems = _problems(load_pipeline, path)
    assert len(problems) == 1 and problems[0].startswith(
        "name: must be letters, digits, '.', '_' or '-' starting with a letter or digit"), problems


# ----------------------------------------------------------------------------- duplicate keys
def test_keys_written_twice_are_reported_with_path_and_lines_together_with_other_problems(tmp_path):
    text = PIPELINE.replace("    lr: 1.0e-3\n", "    lr: 1.0e-3\n    max_epochs: 2\n    lr: 0.1\n")
    text = text.replace("seeds: [0, 1]\n", "seeds: [0, 1]\nmetric: test/dice_3d_mean\nseeds: [-1]\n")
    path = _pipeline(tmp_path, text)
    assert _problems(load_pipeline, path) == [
        "metric: key written twice (lines 3 and 6); YAML keeps only the last value: remove one",
        "seeds: key written twice (lines 5 and 7); YAML keeps only the last value: remove one",
        "stages.finetune.lr: key written twice (lines 19 and 21); YAML keeps only the last value: remove one",
        "seeds[0]: must be an integer in [0, 2**31), got -1",
    ]
    # load_yaml alone raises them; a list item's mapping is named by its index; merged keys may be overridden
    (tmp_path / "x.yaml").write_text("a: &base {k: 1}\nb: {<<: *base, k: 2}\nitems:\n  - {x: 1, x: 2}\n")
    with pytest.raises(ConfigError) as info:
        load_yaml(tmp_path / "x.yaml")
    assert info.value.problems == [
        "items[0].x: key written twice (line 4); YAML keeps only the last value: remove one"]


def test_keys_written_twice_in_a_sweep_file(tmp_path):
    path = _sweep(tmp_path, "method: global\nmetric: best/val/dice_2d\nmode: max\nmode: min\n")
    assert _problems(load_sweep, path) == [
        "mode: key written twice (lines 7 and 8); YAML keeps only the last value: remove one"]


# ----------------------------------------------------------------------------- YAML 1.1 booleans and dates
def test_text_that_yaml_reads_as_a_boolean_or_a_date_says_to_quote_it(tmp_path):
    path = _pipeline(tmp_path, **{"name: tiny": "name: 2024-01-01",
                                  "experiment: medcl": "experiment: no",
                                  "kind: global_pretrain\n": "kind: global_pretrain\n    positives: on\n",
                                  "  random: [finetune]": "  random: [finetune]\n  off: [finetune]"})
    bool_hint = "YAML 1.1 reads unquoted yes/no/on/off/true/false as booleans; quote it if you meant the text"
    assert _problems(load_pipeline, path) == [
        "name: expected a string, got datetime.date(2024, 1, 1): YAML reads an unquoted 2024-01-01 as a date; "
        "quote it ('2024-01-01')",
        f"methods.False: key read as False: {bool_hint}",
        f"tracking.experiment: expected a string, got False: {bool_hint}",
        f"stages.global.positives: must be one of 'simclr', 'micle', 'partition', got True: {bool_hint}",
    ]
    # quoted, the same values are text
    path = _pipeline(tmp_path, **{"name: tiny": "name: '2024-01-01'", "experiment: medcl": "experiment: 'no'"})
    cfg = load_pipeline(path)
    assert cfg.name == "2024-01-01" and cfg.tracking.experiment == "no"
