"""cluster.yaml against the launcher schema shipped with the installed Ray."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def config() -> dict:
    with open(REPO / "cluster.yaml") as f:
        return yaml.safe_load(f)


@pytest.fixture(scope="module")
def schema() -> dict:
    import ray.autoscaler

    with open(Path(ray.autoscaler.__file__).parent / "ray-schema.json") as f:
        return json.load(f)


def test_validates_against_ray_schema(config, schema):
    jsonschema.validate(config, schema)


def test_ray_prepare_and_validate_config(config):
    """What `ray up` runs before launching anything (offline for AWS)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    assert prepared["head_node_type"] == "head"
    assert prepared["worker_setup_commands"][: len(config["setup_commands"])] == config["setup_commands"]


def test_node_types(config):
    types = config["available_node_types"]
    head, gpu = types[config["head_node_type"]], types["gpu_worker"]
    assert "GPU" not in head["resources"] and head["resources"]["CPU"] >= 1
    assert head["min_workers"] == head["max_workers"] == 0
    assert gpu["resources"]["GPU"] >= 1 and gpu["resources"]["CPU"] >= 1
    assert 0 <= gpu["min_workers"] <= gpu["max_workers"] <= config["max_workers"]
    assert gpu["node_config"]["InstanceType"].startswith(("g5.", "g6.", "p4d.", "p5."))


def test_container_and_setup(config):
    assert config["provider"]["type"] == "aws" and config["provider"]["cache_stopped_nodes"] is True
    assert "--shm-size=16g" in config["docker"]["run_options"]
    assert config["docker"]["image"].startswith("rayproject/ray") and config["docker"]["image"].endswith("-gpu")
    assert config["file_mounts"]["/home/ray/medcl"] == "."
    assert "pip install --quiet -e /home/ray/medcl" in config["setup_commands"]
    head_cmds = " ".join(config["head_start_ray_commands"])
    assert "ray start --head --port=6379" in head_cmds and "--autoscaling-config=~/ray_bootstrap_config.yaml" in head_cmds
    assert "mlflow server" in head_cmds and "MLFLOW_TRACKING_URI=" in head_cmds
    worker_cmds = " ".join(config["worker_start_ray_commands"])
    assert "--address=$RAY_HEAD_IP:6379" in worker_cmds and "MLFLOW_TRACKING_URI=http://$RAY_HEAD_IP:5000" in worker_cmds


def test_typo_in_top_level_key_is_rejected(config, schema):
    bad = copy.deepcopy(config)
    bad["max_worker"] = bad.pop("max_workers")
    with pytest.raises(jsonschema.ValidationError, match="Additional properties are not allowed .*'max_worker'"):
        jsonschema.validate(bad, schema)


def test_fractional_gpu_resource_is_rejected(config, schema):
    bad = copy.deepcopy(config)
    bad["available_node_types"]["gpu_worker"]["resources"]["GPU"] = 0.5
    with pytest.raises(jsonschema.ValidationError, match="0.5 is not of type 'integer'"):
        jsonschema.validate(bad, schema)
