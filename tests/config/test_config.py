"""Typed config loader: every problem named by its key path, all at once; YAML overrides; stage kinds."""
from __future__ import annotations

from pathlib import Path

import pytest

from medcl.config import (
    ClsFinetuneConfig,
    GlobalPretrainConfig,
    LocalPretrainConfig,
    ResNetSpec,
    ScalingSpec,
    SegFinetuneConfig,
    UNetSpec,
    stage_config_from_dict,
    to_dict,
)
from medcl.config.binder import ConfigError, apply_overrides, build, load_yaml


def _problems(exc_info) -> list[str]:
    return exc_info.value.problems


def test_valid_dict_builds_the_typed_config_with_coercions():
    cfg = stage_config_from_dict({
        "kind": "seg_finetune", "max_epochs": 3, "lr": 1,  # int accepted for a float field
        "init_from": "runs/global/ckpt", "model": {"features": [8, 16, 32], "norm": "batch"},
    })
    assert isinstance(cfg, SegFinetuneConfig)
    assert cfg.max_epochs == 3 and cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert cfg.init_from == Path("runs/global/ckpt")
    assert cfg.model == UNetSpec(features=(8, 16, 32), norm="batch")  # list -> tuple
    assert cfg.label_fraction == 1.0 and cfg.augment is True  # defaults kept
    # to_dict is the plain form: tuples as lists, paths as strings
    plain = to_dict(cfg)
    assert plain["model"] == {"features": [8, 16, 32], "norm": "batch", "embed_dim": 128}
    assert plain["init_from"] == "runs/global/ckpt" and plain["kind"] == "seg_finetune"
    assert stage_config_from_dict(plain) == cfg  # what a Ray worker rebuilds


def test_unknown_key_suggests_the_closest_known_key():
    with pytest.raises(ConfigError, match=r"max_epoch: unknown key \(did you mean 'max_epochs'\?\)") as e:
        stage_config_from_dict({"kind": "seg_finetune", "max_epoch": 1})
    assert len(_problems(e)) == 1
    with pytest.raises(ConfigError, match=r"batch-size-per-worker: unknown key \(did you mean 'batch_size_per_worker'"):
        stage_config_from_dict({"kind": "global_pretrain", "batch-size-per-worker": 8})
    # nothing close: the known keys are listed instead
    with pytest.raises(ConfigError, match=r"zzz: unknown key; known keys: .*dice_weight.*max_epochs") as e:
        stage_config_from_dict({"kind": "seg_finetune", "zzz": 1})
    assert "did you mean" not in str(e.value)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"max_epochs": 1.5}, "max_epochs: expected an integer, got 1.5"),
        ({"max_epochs": True}, "max_epochs: expected an integer, got True"),
        ({"lr": "fast"}, "lr: expected a number, got 'fast'"),
        ({"augment": "yes"}, "augment: expected true/false, got 'yes'"),
        ({"init_from": 3}, "init_from: expected a path, got 3"),
        ({"model": [8, 16]}, "model: expected a mapping, got list [8, 16]"),
        ({"model": {"features": 8}}, "model.features: expected a list, got int 8"),
        ({"model": {"norm": "layer"}}, "model.norm: must be one of 'instance', 'batch', got 'layer'"),
    ],
)
def test_wrong_types_name_key_and_value(data, expected):
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace("[", r"\[")) as e:
        stage_config_from_dict({"kind": "seg_finetune", **data})
    assert _problems(e) == [expected]


def test_missing_required_key_is_reported():
    from medcl.config.pipeline import DatasetSpec, PipelineConfig

    with pytest.raises(ConfigError, match="dataset.path: required key is missing") as e:
        build(PipelineConfig, {"name": "x", "dataset": {"source": "synthetic"}, "stages": {}, "methods": {}})
    assert _problems(e) == ["dataset.path: required key is missing"]
    with pytest.raises(ConfigError, match="name: required key is missing") as e:
        build(PipelineConfig, {"dataset": {"path": "d"}})
    assert sorted(_problems(e)) == ["methods: required key is missing", "name: required key is missing",
                                    "stages: required key is missing"]
    assert build(DatasetSpec, {"path": "d"}) == DatasetSpec(path=Path("d"))


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5])
def test_label_fraction_out_of_range(fraction):
    for kind in ("local_pretrain", "seg_finetune", "cls_finetune"):
        with pytest.raises(ConfigError, match=rf"stages\.s\.label_fraction: must be in \(0, 1\], got {fraction}") as e:
            stage_config_from_dict({"kind": kind, "label_fraction": fraction}, path="stages.s")
        assert len(_problems(e)) == 1
    # the edges of (0, 1]
    assert SegFinetuneConfig(label_fraction=1.0).label_fraction == 1.0
    assert SegFinetuneConfig(label_fraction=1e-3).label_fraction == 1e-3


@pytest.mark.parametrize("kind", ["global_pretrain", "local_pretrain", "cls_pretrain"])
@pytest.mark.parametrize("temperature", [0, -0.5])
def test_temperature_must_be_positive(kind, temperature):
    with pytest.raises(ConfigError, match=rf"^invalid configuration:\n  temperature: must be > 0, got {float(temperature)}$"):
        stage_config_from_dict({"kind": kind, "temperature": temperature})
    with pytest.raises(ValueError, match="temperature must be > 0"):  # the dataclass itself checks too
        GlobalPretrainConfig(temperature=temperature)


def test_range_checks_of_the_shared_stage_fields():
    cases = [
        ({"max_epochs": 0}, "max_epochs: must be >= 1, got 0"),
        ({"batch_size_per_worker": 0}, "batch_size_per_worker: must be >= 1, got 0"),
        ({"lr": 0}, "lr: must be > 0, got 0.0"),
        ({"weight_decay": -1}, "weight_decay: must be >= 0, got -1.0"),
        ({"warmup_steps": -1}, "warmup_steps: must be >= 0, got -1"),
        ({"min_lr_ratio": 1.5}, "min_lr_ratio: must be in [0, 1], got 1.5"),
        ({"checkpoint_every": 0}, "checkpoint_every: must be >= 1, got 0"),
    ]
    for data, expected in cases:
        with pytest.raises(ConfigError) as e:
            stage_config_from_dict({"kind": "seg_finetune", **data})
        assert _problems(e) == [expected]
    with pytest.raises(ConfigError, match=r"stride: must be >= 1, got 0"):
        stage_config_from_dict({"kind": "local_pretrain", "stride": 0})
    with pytest.raises(ConfigError, match=r"scaling\.cpus_per_worker: must be > 0, got 0\.0"):
        from medcl.config.pipeline import PipelineConfig

        build(PipelineConfig, {"name": "x", "dataset": {"path": "d"}, "stages": {}, "methods": {},
                               "scaling": {"cpus_per_worker": 0}})


def test_nested_model_spec_errors_carry_the_full_key_path():
    data = {"kind": "seg_finetune", "model": {"features": [8, "x"], "norm": "layer", "widths": [1]}}
    with pytest.raises(ConfigError) as e:
        stage_config_from_dict(data, path="stages.finetune", source="p.yaml")
    assert sorted(_problems(e)) == [
        "stages.finetune.model.features[1]: expected an integer, got 'x'",
        "stages.finetune.model.norm: must be one of 'instance', 'batch', got 'layer'",
        "stages.finetune.model.widths: unknown key; known keys: embed_dim, features, norm",
    ]
    assert str(e.value).startswith("invalid configuration in p.yaml:\n  ")
    with pytest.raises(ConfigError, match=r"stages\.finetune\.model\.features: must list at least 2 widths, got \[8\]"):
        stage_config_from_dict({"kind": "seg_finetune", "model": {"features": [8]}}, path="stages.finetune")
    with pytest.raises(ConfigError, match=r"stages\.cls\.model\.arch: must be one of 'resnet18', 'resnet50', got 'vit'"):
        stage_config_from_dict({"kind": "cls_finetune", "model": {"arch": "vit"}}, path="stages.cls")


def test_several_errors_are_reported_at_once_one_per_line():
    data = {"kind": "local_pretrain", "lrr": 1, "max_epochs": "ten", "mode": "dense", "stride": 2.5,
            "temperature": -1, "model": {"features": [8, 16], "embed_dim": "big"}}
    with pytest.raises(ConfigError) as e:
        stage_config_from_dict(data, path="stages.local")
    expected = {
        "stages.local.lrr: unknown key (did you mean 'lr'?)",
        "stages.local.max_epochs: expected an integer, got 'ten'",
        "stages.local.mode: must be one of 'exact', 'stride', 'block', got 'dense'",
        "stages.local.stride: expected an integer, got 2.5",
        "stages.local.model.embed_dim: expected an integer, got 'big'",
        # the range check of a well-typed field still runs next to the type errors
        "stages.local.temperature: must be > 0, got -1.0",
    }
    assert set(_problems(e)) == expected and len(_problems(e)) == len(expected)
    lines = str(e.value).splitlines()
    assert lines[0] == "invalid configuration:" and {line.strip() for line in lines[1:]} == expected


def test_stage_config_from_dict_unknown_or_missing_kind():
    with pytest.raises(ConfigError, match=r"stages\.x\.kind: must be one of 'global_pretrain', 'local_pretrain', "
                                          r"'seg_finetune', 'cls_pretrain', 'cls_finetune', got 'finetune'"):
        stage_config_from_dict({"kind": "finetune"}, path="stages.x")
    with pytest.raises(ConfigError, match=r"^invalid configuration:\n  kind: must be one of .* got None$"):
        stage_config_from_dict({"lr": 1e-3})
    with pytest.raises(ConfigError, match="kind: must be one of"):
        stage_config_from_dict(["not", "a", "mapping"])  # type: ignore[arg-type]
    for kind, cls in (("global_pretrain", GlobalPretrainConfig), ("local_pretrain", LocalPretrainConfig),
                      ("cls_finetune", ClsFinetuneConfig)):
        assert type(stage_config_from_dict({"kind": kind})) is cls
    assert stage_config_from_dict({"kind": "cls_finetune"}).model == ResNetSpec()


def test_overrides_are_parsed_as_yaml_into_a_copy():
    data = {"a": {"b": 1, "keep": "x"}, "top": 0}
    out = apply_overrides(data, ["a.b=[1, 2]", "a.c.d=0.5", "e=true", "f=null", "g=hello", "h=1e-3", "i=3",
                                 "j={k: 1}", " top =7"])
    assert out == {"a": {"b": [1, 2], "keep": "x", "c": {"d": 0.5}}, "top": 7, "e": True, "f": None,
                   "g": "hello", "h": "1e-3", "i": 3, "j": {"k": 1}}
    # YAML 1.1 reads "1e-3" (no dot) as a string, "1.0e-3" as a float; a float field takes both
    assert apply_overrides({}, ["lr=1.0e-3"]) == {"lr": 0.001}
    for text in ("lr=1e-3", "lr=1.0e-3", "lr=5E-4"):
        cfg = stage_config_from_dict(apply_overrides({"kind": "seg_finetune"}, [text]))
        assert cfg.lr == float(text.split("=")[1])
    with pytest.raises(ConfigError, match=r"lr: expected a number, got 'e-3'"):
        stage_config_from_dict(apply_overrides({"kind": "seg_finetune"}, ["lr=e-3"]))
    with pytest.raises(ConfigError, match=r"max_epochs: expected an integer, got '1e2'"):  # only float fields
        stage_config_from_dict(apply_overrides({"kind": "seg_finetune"}, ["max_epochs=1e2"]))
    assert data == {"a": {"b": 1, "keep": "x"}, "top": 0}  # the input is untouched
    # an override's value then goes through the typed loader like any other
    cfg = stage_config_from_dict(apply_overrides({"kind": "seg_finetune"}, ["model.features=[4, 8]", "lr=0.01"]))
    assert cfg.model.features == (4, 8) and cfg.lr == 0.01


def test_bad_overrides_are_all_reported():
    with pytest.raises(ConfigError, match="command-line overrides") as e:
        apply_overrides({"a": 1}, ["a.b=2", "noequals", "=3"])
    assert _problems(e) == ["override 'a.b=2': a is not a mapping",
                            "override 'noequals' must look like key.path=value",
                            "override '=3' has an empty key"]


def test_load_yaml_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"invalid configuration in .*nope\.yaml:\n  file not found: .*nope\.yaml"):
        load_yaml(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:\n  not valid YAML"):
        load_yaml(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping, got list"):
        load_yaml(lst)
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing\n")
    assert load_yaml(empty) == {}


def test_scaling_spec_validation():
    with pytest.raises(ConfigError, match=r"^invalid configuration:\n  num_workers: must be >= 1, got 0$"):
        build(ScalingSpec, {"num_workers": 0})
    with pytest.raises(ValueError, match="max_failures must be >= 0, got -1"):
        ScalingSpec(max_failures=-1)
    assert build(ScalingSpec, {"num_workers": 2, "cpus_per_worker": 0.5}) == ScalingSpec(num_workers=2,
                                                                                        cpus_per_worker=0.5)


@pytest.mark.parametrize(("data", "expected"), [
    ({"kind": "global_pretrain"}, False),
    ({"kind": "cls_pretrain"}, False),
    ({"kind": "local_pretrain"}, True),  # supervised by default
    ({"kind": "local_pretrain", "loss": "both"}, True),
    ({"kind": "local_pretrain", "loss": "self_supervised"}, False),
    ({"kind": "seg_finetune"}, True),
    ({"kind": "cls_finetune", "protocol": "linear"}, True),
])
def test_uses_labels_says_which_stages_train_on_labels(data, expected):
    assert stage_config_from_dict(data).uses_labels is expected


def test_pipeline_templates_are_parsed_once_and_typed():
    import dataclasses

    from medcl.config.pipeline import PipelineConfig

    cfg = build(PipelineConfig, {"name": "x", "dataset": {"path": "d"}, "methods": {},
                                 "stages": {"g": {"kind": "global_pretrain", "lr": 1}, "f": {"kind": "seg_finetune"}}})
    assert cfg.stage("g") == GlobalPretrainConfig(lr=1.0) and cfg.stage("f") == SegFinetuneConfig()
    assert cfg.stage("g") is cfg.stage("g")  # the same object every time: no re-parsing per job
    assert cfg.stages["g"] == {"kind": "global_pretrain", "lr": 1}  # the file's form stays
    copy = dataclasses.replace(cfg, stages={"g": {"kind": "cls_pretrain"}})
    assert copy.stage("g") == stage_config_from_dict({"kind": "cls_pretrain"})  # a copy parses its own
    bad = dataclasses.replace(cfg, stages={"g": {"kind": "global_pretrain", "lr": 0}})
    with pytest.raises(ConfigError, match=r"stages\.g\.lr: must be > 0, got 0\.0"):
        bad.stage("g")
    with pytest.raises(ValueError, match=r"label_fractions must be in \(0, 1\], got \[0\.0, 2\.0\]"):
        dataclasses.replace(cfg, label_fractions=[0.5, 0.0, 2.0])


def test_a_uri_path_field_keeps_its_scheme():
    # Path("s3://bucket/run/ckpt") would fold "//" and lose the scheme (issue 13: remote storage).
    cfg = stage_config_from_dict({"kind": "seg_finetune", "init_from": "s3://bucket/run/checkpoint_000001"})
    assert cfg.init_from == "s3://bucket/run/checkpoint_000001"
    assert stage_config_from_dict({"kind": "seg_finetune", "init_from": "runs/ckpt"}).init_from == Path("runs/ckpt")
