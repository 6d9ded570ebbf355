"""Pipeline files: validation before any training (all problems at once, with key paths) and job planning."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from medcl.config.binder import ConfigError
from medcl.config.pipeline import load_pipeline
from medcl.runner.plan import plan_jobs

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "pipelines" / "quickstart.yaml"

UNET = {"features": [8, 16], "norm": "instance"}
BASE = {
    "name": "t",
    "dataset": {"path": "data/t", "source": "synthetic", "options": {"num_patients": 6}},
    "stages": {
        "global": {"kind": "global_pretrain", "max_epochs": 1, "model": UNET},
        "local": {"kind": "local_pretrain", "loss": "supervised", "model": UNET},
        "ssl_local": {"kind": "local_pretrain", "loss": "self_supervised", "model": UNET},
        "finetune": {"kind": "seg_finetune", "model": UNET},
    },
    "methods": {"random": ["finetune"], "global": ["global", "finetune"]},
    "label_fractions": [0.1, 0.5],
    "seeds": [0, 1, 2],
}


def _write(tmp_path: Path, data: dict, name: str = "p.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _pipeline(tmp_path: Path, **changes) -> dict:
    data = copy.deepcopy(BASE)
    data.update(changes)
    return data


def _problems(exc_info) -> set[str]:
    return set(exc_info.value.problems)


# ----------------------------------------------------------------------------- validation
def test_quickstart_file_is_valid():
    cfg = load_pipeline(QUICKSTART)
    assert cfg.name == "quickstart" and cfg.dataset.source == "synthetic"
    assert cfg.label_fractions == [0.05, 0.25, 1.0] and cfg.seeds == [0, 1]
    assert set(cfg.methods) == {"random", "global", "global+local"}
    assert cfg.stage("global").kind == "global_pretrain" and cfg.stage("global").temperature == 0.5
    assert cfg.stage("finetune").model.features == (8, 16, 32, 64)  # the YAML anchor is shared
    assert cfg.stage("local").lr == 1.0e-3


def test_typed_problems_in_a_file_are_listed_together(tmp_path):
    data = _pipeline(tmp_path, label_fraction=[0.1], seeds=[0, "one"], max_concurrent_trials="2",
                     scaling={"num_workers": 2, "gpus": 1})
    data["dataset"]["source"] = "dicom"
    path = _write(tmp_path, data)
    with pytest.raises(ConfigError, match=r"invalid configuration in .*p\.yaml:\n  ") as e:
        load_pipeline(path)
    assert _problems(e) == {
        "label_fraction: unknown key (did you mean 'label_fractions'?)",
        "seeds[1]: expected an integer, got 'one'",
        "max_concurrent_trials: expected an integer, got '2'",
        "scaling.gpus: unknown key; known keys: cpus_per_worker, max_failures, num_workers, use_gpu",
        "dataset.source: must be one of 'synthetic', 'msd', 'medmnist', 'folder', 'existing', got 'dicom'",
    }


def test_problems_of_every_kind_in_one_file_are_reported_together(tmp_path):
    data = _pipeline(tmp_path, label_fractions=[0.5, 1.5], sedes=[1])
    data["stages"]["global"]["seed"] = 1
    data["stages"]["finetune"]["temperature"] = 0.1
    data["stages"]["local"]["model"] = {"features": [8, 16, 32]}
    data["methods"] = {"a": ["global", "nosuch", "finetune"], "b": ["local", "finetune"]}
    with pytest.raises(ConfigError) as e:
        load_pipeline(_write(tmp_path, data))
    problems = _problems(e)
    expected = {
        "sedes: unknown key (did you mean 'seeds'?)",
        "label_fractions: must be in (0, 1], got [1.5]",
        "stages.global.seed: set by the pipeline (seeds, label_fractions, methods); remove it here",
        "methods.a[1]: unknown stage 'nosuch'; defined: ['finetune', 'global', 'local', 'ssl_local']",
    }
    assert expected <= problems
    assert any(p.startswith("stages.finetune.temperature: unknown key") for p in problems)
    assert any(p.startswith("methods.b: stages ['local', 'finetune'] must share one model shape") for p in problems)
    assert len(problems) == len(expected) + 2


@pytest.mark.parametrize(("fractions", "bad"), [([0.5, 1.5], [1.5]), ([0.0, 0.2], [0.0]), ([-1, 2], [-1.0, 2.0])])
def test_label_fractions_out_of_range(tmp_path, fractions, bad):
    path = _write(tmp_path, _pipeline(tmp_path, label_fractions=fractions))
    with pytest.raises(ConfigError, match=r"label_fractions: must be in \(0, 1\]") as e:
        load_pipeline(path)
    assert _problems(e) == {f"label_fractions: must be in (0, 1], got {bad}"}


def test_semantic_problems_are_listed_together_with_their_paths(tmp_path):
    data = _pipeline(tmp_path)
    data["dataset"] = {"path": str(tmp_path / "nowhere")}  # source "existing" by default
    data["stages"] = {
        "global": {"kind": "global_pretrain", "seed": 3, "temperature": 0},
        "finetune": {"kind": "seg_finetune", "label_fraction": 0.5, "lrr": 1},
        "local": {"kind": "local_pretrain", "label_fraction": 2.0, "init_from": "x"},
        "what": {"kind": "finetune"},
    }
    data["methods"] = {"a": ["global", "nosuch", "finetune"], "b": ["global"], "c": []}
    path = _write(tmp_path, data)
    with pytest.raises(ConfigError) as e:
        load_pipeline(path)
    defined = "['finetune', 'global', 'local', 'what']"
    assert _problems(e) == {
        "stages.global.temperature: must be > 0, got 0.0",
        "stages.finetune.lrr: unknown key (did you mean 'lr'?)",
        "stages.local.label_fraction: must be in (0, 1], got 2.0",
        "stages.what.kind: must be one of 'global_pretrain', 'local_pretrain', 'seg_finetune', 'cls_pretrain', "
        "'cls_finetune', got 'finetune'",
        f"methods.a[1]: unknown stage 'nosuch'; defined: {defined}",
        "methods.b: must end with a fine-tuning stage, ends with 'global_pretrain'",
        "methods.c: must list at least one stage",
        "stages.global.seed: set by the pipeline (seeds, label_fractions, methods); remove it here",
        "stages.finetune.label_fraction: set by the pipeline (seeds, label_fractions, methods); remove it here",
        "stages.local.label_fraction: set by the pipeline (seeds, label_fractions, methods); remove it here",
        "stages.local.init_from: set by the pipeline (seeds, label_fractions, methods); remove it here",
        f"dataset.path: no dataset at {tmp_path / 'nowhere'} (manifest.json missing); "
        "ingest one first or set dataset.source",
    }
    assert str(e.value).count("\n  ") == len(e.value.problems)  # one line each


def test_ingest_source_problems(tmp_path):
    data = _pipeline(tmp_path)
    data["dataset"] = {"path": "d", "source": "msd", "options": {"size": 32, "bogus": 1, "num_patients": 4}}
    with pytest.raises(ConfigError) as e:
        load_pipeline(_write(tmp_path, data))
    problems = _problems(e)
    assert "dataset.source_path: required for source 'msd'" in problems
    unknown = sorted(p for p in problems if p.startswith("dataset.options."))
    assert [p.split(":")[0] for p in unknown] == ["dataset.options.bogus", "dataset.options.num_patients"]
    assert all("unknown msd ingest option; known: [" in p and "'size'" in p for p in unknown)
    assert len(problems) == 3

    data["dataset"] = {"path": "d", "source": "medmnist", "source_path": str(tmp_path / "no.npz")}
    with pytest.raises(ConfigError, match=r"dataset\.source_path: .*no\.npz does not exist") as e:
        load_pipeline(_write(tmp_path, data))
    assert len(e.value.problems) == 1

    data["dataset"] = {"path": "d", "source": "synthetic", "source_path": str(tmp_path),
                       "options": {"num_patient": 3}}
    with pytest.raises(ConfigError) as e:
        load_pipeline(_write(tmp_path, data))
    assert _problems(e) == {"dataset.source_path: the synthetic source takes no source_path",
                            next(p for p in e.value.problems if p.startswith("dataset.options.num_patient:"))}
    assert "unknown synthetic ingest option; known: [" in str(e.value)


def test_existing_dataset_with_manifest_is_accepted(tmp_path):
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "manifest.json").write_text("{}")
    data = _pipeline(tmp_path)
    data["dataset"] = {"path": str(tmp_path / "ds"), "source": "existing"}
    assert load_pipeline(_write(tmp_path, data)).dataset.path == tmp_path / "ds"


def test_overrides_and_smoke_overrides_apply(tmp_path):
    cfg = load_pipeline(QUICKSTART, overrides=["seeds=[4]", "stages.finetune.lr=1e-2", "scaling.num_workers=2"])
    assert cfg.seeds == [4] and cfg.stage("finetune").lr == 0.01 and cfg.scaling.num_workers == 2
    smoke = load_pipeline(QUICKSTART, smoke=True)
    assert smoke.label_fractions == [0.25] and smoke.seeds == [0]
    assert [smoke.stage(s).max_epochs for s in ("global", "local", "finetune")] == [1, 1, 1]
    # 3 methods, 1 fraction, 1 seed: finetune, global, global>finetune, global>local, global>local>finetune
    assert len(plan_jobs(smoke)) == 5
    # --set wins over the smoke list
    assert load_pipeline(QUICKSTART, overrides=["seeds=[7, 8]"], smoke=True).seeds == [7, 8]
    with pytest.raises(ConfigError, match=r"smoke: --smoke needs a non-empty list of key=value overrides"):
        load_pipeline(_write(tmp_path, _pipeline(tmp_path)), smoke=True)
    with pytest.raises(ConfigError, match=r"stages\.finetune\.max_epoch: unknown key \(did you mean 'max_epochs'"):
        load_pipeline(QUICKSTART, overrides=["stages.finetune.max_epoch=3"])


# ----------------------------------------------------------------------------- planning
def _check_dag(jobs) -> None:
    index = {job.key: i for i, job in enumerate(jobs)}
    assert len(index) == len(jobs), "job keys must be unique"
    for i, job in enumerate(jobs):
        assert job.config.seed == job.seed and job.config.init_from is None
        if job.parent is None:
            assert job.depth == 0
        else:
            assert index[job.parent] < i, f"{job.parent} must precede {job.key}"
            parent = jobs[index[job.parent]]
            assert parent.depth == job.depth - 1 and parent.seed == job.seed
            assert job.key.startswith(parent.key.split("@")[0] + ">")


def test_quickstart_plan_counts_and_order():
    cfg = load_pipeline(QUICKSTART)
    jobs = plan_jobs(cfg)
    _check_dag(jobs)
    seeds, fractions = 2, 3
    expected = (
        seeds * fractions      # random: finetune per (seed, fraction)
        + seeds                # global pretraining: once per seed, shared by two methods and all fractions
        + seeds * fractions    # global>finetune
        + seeds * fractions    # global>local (supervised: uses labels) per (seed, fraction)
        + seeds * fractions    # global>local>finetune
    )
    assert len(jobs) == expected == 26
    by_key = {job.key: job for job in jobs}
    assert sorted(k for k in by_key if k.startswith("global@")) == ["global@seed=0", "global@seed=1"]
    g = by_key["global@seed=0"]
    assert g.label_fraction is None and g.methods == () and g.parent is None
    local = by_key["global>local@seed=1,fraction=0.25"]
    assert local.parent == "global@seed=1" and local.label_fraction == 0.25
    assert local.config.label_fraction == 0.25 and local.config.seed == 1 and local.methods == ()
    final = by_key["global>local>finetune@seed=1,fraction=0.25"]
    assert final.parent == local.key and final.depth == 2 and final.methods == ("global+local",)
    assert final.config.label_fraction == 0.25 and final.config.max_epochs == 12
    assert by_key["finetune@seed=0,fraction=0.05"].methods == ("random",)
    assert by_key["global>finetune@seed=0,fraction=1"].methods == ("global",)
    # every method has one final job per (seed, fraction), and only final jobs carry methods
    for method in cfg.methods:
        finals = [j for j in jobs if method in j.methods]
        assert sorted((j.seed, j.label_fraction) for j in finals) == sorted(
            (s, f) for s in cfg.seeds for f in cfg.label_fractions)
        assert all(j.stage == cfg.methods[method][-1] and j.depth == len(cfg.methods[method]) - 1 for j in finals)
    assert sum(bool(j.methods) for j in jobs) == 3 * seeds * fractions


def test_self_supervised_local_is_shared_across_fractions_supervised_is_not(tmp_path):
    methods = {"sup": ["global", "local", "finetune"], "ssl": ["global", "ssl_local", "finetune"],
               "ssl_only": ["ssl_local", "finetune"]}
    cfg = load_pipeline(_write(tmp_path, _pipeline(tmp_path, methods=methods)))
    jobs = plan_jobs(cfg)
    _check_dag(jobs)
    keys = [job.key for job in jobs]
    S, F = 3, 2
    count = lambda prefix: sum(k.split("@")[0] == prefix for k in keys)  # noqa: E731
    assert count("global") == S  # one per seed
    assert count("global>local") == S * F  # supervised local uses labels
    assert count("global>ssl_local") == S  # self-supervised: per seed only
    assert count("ssl_local") == S
    assert count("global>local>finetune") == count("global>ssl_local>finetune") == count("ssl_local>finetune") == S * F
    assert len(jobs) == S + S * F + S + S + 3 * S * F
    ssl = next(j for j in jobs if j.key == "global>ssl_local@seed=2")
    assert ssl.label_fraction is None and ssl.parent == "global@seed=2"
    # the fine-tuning after a shared self-supervised job still runs per fraction and points at it
    ft = next(j for j in jobs if j.key == "global>ssl_local>finetune@seed=2,fraction=0.1")
    assert ft.parent == ssl.key and ft.label_fraction == 0.1 and ft.config.label_fraction == 0.1


def test_a_job_final_for_two_methods_runs_once_and_carries_both(tmp_path):
    methods = {"b": ["finetune"], "a": ["finetune"], "g": ["global", "finetune"]}
    cfg = load_pipeline(_write(tmp_path, _pipeline(tmp_path, methods=methods, seeds=[5], label_fractions=[0.5])))
    jobs = plan_jobs(cfg)
    assert [(j.key, j.methods) for j in jobs] == [
        ("finetune@seed=5,fraction=0.5", ("a", "b")),
        ("global@seed=5", ()),
        ("global>finetune@seed=5,fraction=0.5", ("g",)),
    ]


def test_classification_chain(tmp_path):
    data = _pipeline(tmp_path, label_fractions=[0.01, 1.0], seeds=[0])
    data["stages"] = {"simclr": {"kind": "cls_pretrain", "method": "micle"},
                      "probe": {"kind": "cls_finetune", "protocol": "linear"}}
    data["methods"] = {"micle": ["simclr", "probe"], "scratch": ["probe"]}
    data["metric"] = "test/auc"
    jobs = plan_jobs(load_pipeline(_write(tmp_path, data)))
    _check_dag(jobs)
    assert [j.key for j in jobs] == ["probe@seed=0,fraction=0.01", "probe@seed=0,fraction=1", "simclr@seed=0",
                                     "simclr>probe@seed=0,fraction=0.01", "simclr>probe@seed=0,fraction=1"]
    assert jobs[2].config.method == "micle" and jobs[3].config.protocol == "linear"


# ----------------------------------------------------------------------------- the shipped files
_SHIPPED = {  # file: (source_path under shared data or None, jobs planned, jobs planned with --smoke)
    # 3 x (global, global_micle, global_partition) + 3 self-supervised local (shared by fractions)
    # + 3 supervised local x 4 fractions x 3 seeds + 8 methods x 4 fractions x 3 seeds fine-tunes;
    # smoke: 5%, seed 0
    "hippocampus": ("Task04_Hippocampus", 9 + 3 + 36 + 96, 3 + 1 + 3 + 8),
    # 2 pretrains x 3 seeds + 5 methods (3 fine-tunes, 2 linear probes) x 3 fractions x 3 seeds
    "micle": (None, 2 * 3 + 5 * 3 * 3, 2 + 5),
    "pneumonia": ("pneumoniamnist/pneumoniamnist.npz", 3 + 3 * 3 * 3, 1 + 3),  # + the SimCLR linear probe
}


@pytest.mark.parametrize("name", sorted(_SHIPPED))
def test_shipped_pipelines_load_and_plan(name, shared_data):
    source, jobs, smoke_jobs = _SHIPPED[name]
    overrides = [f"dataset.source_path={shared_data / source}"] if source else []
    path = REPO / "pipelines" / f"{name}.yaml"
    assert len(plan_jobs(load_pipeline(path, overrides))) == jobs
    assert len(plan_jobs(load_pipeline(path, overrides, smoke=True))) == smoke_jobs


def test_hippocampus_cpu_run_gives_every_fraction_the_same_budgets(shared_data):
    cfg = load_pipeline(REPO / "pipelines" / "hippocampus.yaml",
                        [f"dataset.source_path={shared_data / 'Task04_Hippocampus'}"], smoke=True)
    finetune = cfg.stage("finetune")
    assert finetune.max_epochs * finetune.max_steps_per_epoch == 600 == finetune.max_epochs * finetune.min_steps_per_epoch
    local = [cfg.stage(s) for s in ("local_ssl", "local_stride", "local_block", "local_exact")]
    assert {(s.max_epochs, s.min_steps_per_epoch, s.max_steps_per_epoch, s.batch_size_per_worker, s.lr)
            for s in local} == {(2, 100, 100, 4, 1e-3)}  # 200 steps of 4 for every local mode
    assert {cfg.stage(s).model.features for s in cfg.stages} == {(16, 32, 64, 128, 256)}  # the CPU preset
    paper = load_pipeline(REPO / "pipelines" / "hippocampus.yaml",
                          [f"dataset.source_path={shared_data / 'Task04_Hippocampus'}"])
    assert paper.stage("global").max_epochs == 100 and paper.stage("finetune").max_steps_per_epoch == 0
    assert paper.stage("finetune").model.features == (64, 128, 256, 512, 1024)
