"""Stage hand-over across a ``TorchTrainer``'s workers and across storage: local disk and S3 (a real S3 API).

With workers (``--num-workers N``), Tune sees a Train checkpoint only as the
metric ``checkpoint_path`` (``TuneReportCallback``); each job's trial reports a
tag-only checkpoint that points at it, and the next wave starts from that.
With ``storage_path: s3://...``, Ray's ``Checkpoint.path`` is a path on
``Checkpoint.filesystem`` (``s3://bucket/x`` becomes ``bucket/x``); medcl carries
full URIs across stages (:func:`medcl.storage.location`) and reads them through
pyarrow. S3 is a local moto server on a free loopback port, reached through
``AWS_ENDPOINT_URL``; Ray workers take their environment from the Ray instance,
so the S3 pipeline test starts Ray again after setting it.

The cohort is 8 synthetic patients of 4 slices at 16 px; each stage runs one epoch
on 2 gloo CPU workers.
"""
from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest
import torch

from medcl.config.pipeline import load_pipeline

BUCKET = "medcl-test"

PIPELINE = """\
name: {name}
dataset: {{path: {root}/data, source: synthetic, options: {{num_patients: 8, images_per_patient: 4, size: 16, seed: 0}}}}
metric: test/dice_2d
label_fractions: [1.0]
seeds: [0]
stages:
  global:
    kind: global_pretrain
    temperature: 0.5
    max_epochs: 1
    batch_size_per_worker: 4
    model: &unet {{features: [4, 8, 16], norm: instance}}
  finetune:
    kind: seg_finetune
    max_epochs: 1
    batch_size_per_worker: 4
    augment: false
    model: *unet
methods:
  global: [global, finetune]
scaling: {{num_workers: 2, cpus_per_worker: 0.5, max_failures: 0}}
max_concurrent_trials: 1
tracking: {{experiment: runs, workdir: {root}}}
storage_path: {storage}
"""

GLOBAL, FINETUNE = "global@seed=0", "global>finetune@seed=0,fraction=1"


def _pipeline(root: Path, name: str = "two-workers", storage: str | None = None):
    path = root / f"{name}.yaml"
    path.write_text(textwrap.dedent(PIPELINE.format(root=root, name=name, storage=storage or f"{root}/runs")))
    return load_pipeline(path)


def test_a_parent_without_a_checkpoint_is_an_error_naming_both_jobs(tmp_path):
    from medcl.runner.plan import plan_jobs
    from medcl.runner.trial import parent_checkpoint

    first, second = plan_jobs(_pipeline(tmp_path))
    assert parent_checkpoint(first, {}) is None
    assert parent_checkpoint(second, {GLOBAL: "/runs/ckpt"}) == Path("/runs/ckpt")
    assert parent_checkpoint(second, {GLOBAL: "s3://bucket/runs/ckpt"}) == "s3://bucket/runs/ckpt"
    with pytest.raises(RuntimeError, match=r"job 'global>finetune@seed=0,fraction=1' cannot start: its parent "
                                           r"job 'global@seed=0' finished without a checkpoint"):
        parent_checkpoint(second, {GLOBAL: None})


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_two_stage_method_hands_over_across_two_gloo_workers(ray_session, tmp_path):
    from medcl import tracking as mlt
    from medcl.runner.pipeline import run_pipeline

    from medcl.model_logging import log_job_models
    from medcl.tracking.models import MODEL_ID_TAG

    # With the MLflow model hook of `medcl run` (run in a background thread while the next wave trains).
    result = run_pipeline(_pipeline(tmp_path), report=False, after_wave=log_job_models)

    # Each job handed over its Train run's final checkpoint (under <storage>/<name>/train/<trial id>).
    train_root = tmp_path / "runs" / "two-workers" / "train"
    assert set(result.checkpoints) == {GLOBAL, FINETUNE}
    for key, checkpoint in result.checkpoints.items():
        assert Path(checkpoint).parent.parent == train_root, key
        assert (Path(checkpoint) / "model.pt").is_file() and (Path(checkpoint) / "meta.json").is_file(), key

    # Fine-tuning started from the pretraining job's checkpoint: its saved config says so.
    meta = json.loads((Path(result.checkpoints[FINETUNE]) / "meta.json").read_text())
    assert meta["config"]["init_from"] == result.checkpoints[GLOBAL]
    assert meta["config"]["kind"] == "seg_finetune" and meta["epoch"] == 0

    # MLflow: both jobs FINISHED with their stage's metrics, no hand-over bookkeeping among them.
    target = mlt.configure_tracking(experiment="runs", workdir=tmp_path)
    children = mlt.search_runs(target, parent_run_id=result.parent_run_id)
    assert set(children["run_name"]) == {GLOBAL, FINETUNE}
    assert set(children["status"]) == {"FINISHED"}
    assert "metrics.stage_index" not in children.columns
    final = children[children["run_name"] == FINETUNE].iloc[0]
    assert 0.0 <= final["metrics.test/dice_2d"] <= 1.0

    # The fine-tune job's 2-worker checkpoint became a READY logged model of its run; pretraining got none.
    tags = dict(zip(children["run_name"], children[f"tags.{MODEL_ID_TAG}"]))
    assert not isinstance(tags[GLOBAL], str)
    model = target.client().get_logged_model(tags[FINETUNE])
    assert str(model.status).endswith("READY")
    assert model.source_run_id == final["run_id"]


# ------------------------------------------------------------------ S3 ----
@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on 127.0.0.1 (free port) with one bucket; the AWS_* variables point pyarrow at it."""
    boto3 = pytest.importorskip("boto3")
    moto_server = pytest.importorskip("moto.server")

    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "medcl-test",
           "AWS_SECRET_ACCESS_KEY": "medcl-test", "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true"}
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        client = boto3.client("s3")
        client.create_bucket(Bucket=BUCKET)
        yield client
    server.stop()


def _keys(client, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))


def _fsspec_memory():
    fsspec = pytest.importorskip("fsspec")
    return fsspec.filesystem("memory")


# ------------------------------------------------------------------ S3: locations and loading (no Ray cluster) ----
def test_location_puts_the_scheme_back_on_a_ray_checkpoint_path(s3):
    import pyarrow.fs
    import ray.train

    from medcl.storage import location

    checkpoint = ray.train.Checkpoint(f"s3://{BUCKET}/run/checkpoint_000001")
    assert checkpoint.path == f"{BUCKET}/run/checkpoint_000001"  # what Ray keeps: no scheme
    assert location(checkpoint.filesystem, checkpoint.path) == f"s3://{BUCKET}/run/checkpoint_000001"
    assert location(pyarrow.fs.LocalFileSystem(), "/runs/checkpoint_000001") == "/runs/checkpoint_000001"
    with pytest.raises(ValueError, match="cannot name 'x' on a 'py::fsspec"):
        location(pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(_fsspec_memory())), "x")


def test_model_weights_and_handover_read_from_an_s3_uri(s3, tmp_path):
    import pyarrow.fs
    import ray.train

    from medcl.runner.stage_tags import write_tag
    from medcl.runner.trial import handover_path
    from medcl.train.checkpoints import load_model_weights, save_checkpoint

    model = torch.nn.Linear(3, 2)
    save_checkpoint(tmp_path / "ckpt", model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                    epoch=0, step=1, config={"kind": "test"})
    fs, _ = pyarrow.fs.FileSystem.from_uri(f"s3://{BUCKET}")
    pyarrow.fs.copy_files(str(tmp_path / "ckpt"), f"{BUCKET}/w/ckpt", destination_filesystem=fs)

    uri = f"s3://{BUCKET}/w/ckpt"
    for source in (uri, f"{uri}/model.pt"):
        state = load_model_weights(source)
        assert state.keys() == model.state_dict().keys()
        assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    with pytest.raises(FileNotFoundError, match=f"s3://{BUCKET}/w/missing does not exist"):
        load_model_weights(f"s3://{BUCKET}/w/missing")
    pyarrow.fs.copy_files(str(tmp_path / "ckpt" / "meta.json"), f"{BUCKET}/w/no-model/meta.json",
                          destination_filesystem=fs)
    with pytest.raises(FileNotFoundError, match=f"s3://{BUCKET}/w/no-model/model.pt does not exist"):
        load_model_weights(f"s3://{BUCKET}/w/no-model")

    # A Tune checkpoint on S3 hands over its URI; a tag-only one the Train checkpoint it names.
    assert handover_path(ray.train.Checkpoint(uri)) == uri
    write_tag(tmp_path, {"stage_index": 0, "stage": "global", "epoch": 0, "complete": True,
                         "model_dir": uri, "metrics": {}})
    pyarrow.fs.copy_files(str(tmp_path / "medcl_stage.json"), f"{BUCKET}/w/tag/medcl_stage.json",
                          destination_filesystem=fs)
    assert handover_path(ray.train.Checkpoint(f"s3://{BUCKET}/w/tag")) == uri


# ------------------------------------------------------------------ S3: a pipeline stored in the bucket ----
@pytest.fixture
def ray_with_s3(s3):
    """Ray started again with the AWS_* variables set, so that its workers reach the moto server.

    It stays up for the rest of the session (the variables are harmless to tests on local storage).
    """
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=4, object_store_memory=1_000_000_000, log_to_driver=False,
             _temp_dir=str(Path("/tmp") / f"medcl-ray-{os.getpid()}"))
    yield s3


@pytest.mark.ray
@pytest.mark.timeout(400)
def test_pipeline_on_s3_hands_over_and_resumes(ray_with_s3, tmp_path, monkeypatch):
    from medcl import tracking as mlt
    from medcl.runner.pipeline import run_pipeline

    client = ray_with_s3
    monkeypatch.chdir(tmp_path)  # the report of a remote run is written under ./medcl_reports
    cfg = _pipeline(tmp_path, "s3-run", f"s3://{BUCKET}/runs")
    first = run_pipeline(cfg)

    # Checkpoints are full URIs of Train checkpoints in the bucket; fine-tuning started from pretraining's.
    assert set(first.checkpoints) == {GLOBAL, FINETUNE}
    for key, uri in first.checkpoints.items():
        assert uri.startswith(f"s3://{BUCKET}/runs/s3-run/train/"), key
        assert f"{uri[len('s3://' + BUCKET) + 1:]}/model.pt" in _keys(client, "runs/s3-run/train/"), key
    meta = json.loads(client.get_object(Bucket=BUCKET, Key=first.checkpoints[FINETUNE][len(f"s3://{BUCKET}/"):]
                                        + "/meta.json")["Body"].read())
    assert meta["config"]["init_from"] == first.checkpoints[GLOBAL]

    # The run's own files are in the bucket, none on local disk.
    plan = json.loads(client.get_object(Bucket=BUCKET, Key="runs/s3-run/plan.json")["Body"].read())
    assert set(plan["jobs"]) == {GLOBAL, FINETUNE}
    assert not (tmp_path / "runs").exists() and not (tmp_path / "s3:").exists()

    # Running it again resumes: no Train run or MLflow run is added, the table is the same.
    objects = _keys(client, "runs/s3-run/train/")
    target = mlt.configure_tracking(experiment="runs", workdir=tmp_path)
    children = mlt.search_runs(target, parent_run_id=first.parent_run_id)
    assert set(children["run_name"]) == {GLOBAL, FINETUNE} and set(children["status"]) == {"FINISHED"}
    second = run_pipeline(cfg)
    assert second.checkpoints == first.checkpoints
    assert _keys(client, "runs/s3-run/train/") == objects
    again = mlt.search_runs(target, parent_run_id=first.parent_run_id)
    assert sorted(again["run_id"]) == sorted(children["run_id"])
    assert second.table.equals(first.table)
    assert len(first.table) == 1
