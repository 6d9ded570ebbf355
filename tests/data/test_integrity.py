"""A training run checks its dataset's files against the manifest's SHA-256 once, when it opens it (issue 13, item 10).

Most single-byte corruptions of a Parquet shard still decode (into wrong
pixels), so the check is the only thing that notices them. One flipped byte in
a shard of a tiny synthetic dataset must stop a pipeline / sweep
(:func:`medcl.runner.datasets.prepare_dataset`) and a stage run on its own
(:func:`medcl.train.driver.run_stage`) before Ray starts, naming the file; an
intact dataset passes.
"""
from __future__ import annotations

import re
import textwrap

import pytest

from medcl.config import SegFinetuneConfig, UNetSpec
from medcl.config.pipeline import load_pipeline
from medcl.data.ingest import ingest
from medcl.data.manifest import ManifestError, read_manifest
from medcl.runner.datasets import prepare_dataset


@pytest.fixture()
def dataset(tmp_path):
    out = tmp_path / "tiny"
    ingest("synthetic", None, out, {"num_patients": 6, "images_per_patient": 2, "size": 8, "rows_per_shard": 4})
    return out


def _flip_one_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _pipeline(tmp_path, data):
    path = tmp_path / "pipe.yaml"
    path.write_text(textwrap.dedent(f"""\
        name: integrity
        dataset: {{path: {data}}}
        stages: {{finetune: {{kind: seg_finetune, model: {{features: [8, 16]}}}}}}
        methods: {{random: [finetune]}}
    """))
    return load_pipeline(path)


def test_a_pipeline_opens_an_intact_dataset_and_refuses_a_corrupted_one(tmp_path, dataset):
    cfg = _pipeline(tmp_path, dataset)
    assert prepare_dataset(cfg) == dataset
    shard = dataset / read_manifest(dataset).shards[1].file
    _flip_one_byte(shard)
    with pytest.raises(ManifestError, match=re.escape(str(shard)) + r": sha256 differs from the manifest"):
        prepare_dataset(cfg)


def test_a_stage_run_on_its_own_refuses_a_corrupted_dataset_before_ray_starts(tmp_path, dataset):
    import ray

    from medcl.train.driver import run_stage

    bags = dataset / "bags.parquet"
    _flip_one_byte(bags)
    cfg = SegFinetuneConfig(max_epochs=1, model=UNetSpec(features=(8, 16)))
    ray_was_up = ray.is_initialized()  # another test of the session may have started it
    with pytest.raises(ManifestError, match=re.escape(str(bags)) + r": sha256 differs"):
        run_stage(cfg, dataset, storage_path=tmp_path / "runs", name="x")
    assert ray.is_initialized() == ray_was_up  # refused before reading a stream (which would start Ray)
    (dataset / read_manifest(dataset).shards[0].file).unlink()
    bags.write_bytes(b"")
    with pytest.raises(ManifestError, match=r"shard-00000\.parquet: listed in the manifest but missing"):
        run_stage(cfg, dataset, storage_path=tmp_path / "runs", name="x")
