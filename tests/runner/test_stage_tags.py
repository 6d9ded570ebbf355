"""Stage tags of chain-trial checkpoints (``medcl.runner.stage_tags``) and the hand-over a trial reports."""
from __future__ import annotations

import json
import math

from ray import tune

from medcl.runner.stage_tags import STAGE_TAG_FILE, numeric, read_tag, write_tag
from medcl.runner.trial import handover_path


def test_tag_round_trip_through_a_tune_checkpoint(tmp_path):
    tag = {"stage_index": 1, "stage": "finetune", "epoch": 0, "complete": False, "model_dir": None,
           "metrics": {"train/loss": 0.5}}
    write_tag(tmp_path, tag)
    assert json.loads((tmp_path / STAGE_TAG_FILE).read_text()) == tag
    assert not list(tmp_path.glob("*.tmp"))
    assert read_tag(tune.Checkpoint.from_directory(str(tmp_path))) == tag
    assert read_tag(tune.Checkpoint.from_directory(str(tmp_path / "missing"))) is None


def test_numeric_keeps_finite_real_numbers_only():
    metrics = {"a": 1, "b": 2.5, "flag": True, "name": "x", "nan": math.nan, "inf": math.inf, "none": None}
    assert numeric(metrics) == {"a": 1.0, "b": 2.5}


def test_handover_is_the_tagged_model_dir_or_the_checkpoint_itself(tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    assert handover_path(None) is None
    assert handover_path(tune.Checkpoint.from_directory(str(plain))) == str(plain)
    tagged = tmp_path / "tagged"
    tagged.mkdir()
    write_tag(tagged, {"stage_index": 0, "stage": "global", "epoch": 1, "complete": True,
                       "model_dir": "/runs/train/t-0-global/checkpoint_000001", "metrics": {}})
    assert handover_path(tune.Checkpoint.from_directory(str(tagged))) == "/runs/train/t-0-global/checkpoint_000001"
