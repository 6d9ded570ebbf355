"""cluster.yaml against the launcher schema shipped with the installed Ray, and README's cluster recipe against both.

The recipe's commands are read from README.md's "Running on a Ray cluster" section and parsed
with the parsers that will run them (``ray job submit``'s click command, medcl's argparse),
then checked with Ray's own code: how ``ray up`` hashes file mounts, how ``ray job submit``
packs the working directory.
"""
from __future__ import annotations

import copy
import fnmatch
import json
import re
import shlex
import zipfile
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
# Local state that must never leave this machine: not hashed by `ray up`, not synced, not uploaded.
LOCAL_STATE = (".venv", "medcl_runs", "medcl_data", "mlruns", "mlflow.db")
# How a head command names the head's private address (MLflow's bind and tracking URI).
PRIVATE_ADDRESS = "$(hostname -I | awk '{print $1}')"
DATA_COPY = re.compile(r"aws s3 sync (s3://\S+) (/\S+)")


@pytest.fixture(scope="module")
def config() -> dict:
    with open(REPO / "cluster.yaml") as f:
        return yaml.safe_load(f)


@pytest.fixture(scope="module")
def schema() -> dict:
    import ray.autoscaler

    with open(Path(ray.autoscaler.__file__).parent / "ray-schema.json") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def readme_commands() -> list[list[str]]:
    """Every shell command in the cluster section's ``bash`` blocks, as shell words (comments dropped).

    Lines joined with ``&&`` or ``;`` count as separate commands.
    """
    text = (REPO / "README.md").read_text()
    start = text.index("## Running on a Ray cluster")
    section = text[start:text.index("\n## ", start + 1)]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            command: list[str] = []
            for word in [*shlex.split(line, comments=True), "&&"]:
                if word in ("&&", ";", "||"):
                    commands += [command] if command else []
                    command = []
                else:
                    command.append(word)
    return commands


def _after(commands: list[list[str]], *head: str) -> list[list[str]]:
    """The words after ``head`` in each command that contains it (``export X=1 medcl run ...`` too)."""
    found = []
    for words in commands:
        for i in range(len(words) - len(head) + 1):
            if tuple(words[i:i + len(head)]) == head:
                found.append(words[i + len(head):])
                break
    return found


def _data_copy(config: dict) -> tuple[str, str]:
    """(S3 prefix, local folder) of the data copy in the head's start commands."""
    match = DATA_COPY.search(" ".join(config["head_start_ray_commands"]))
    assert match, "head_start_ray_commands copy no data to the node"
    return match.group(1), match.group(2)


def _medcl_runs(readme_commands: list[list[str]]):
    from medcl.cli import build_parser

    parser = build_parser()
    return [parser.parse_args(["run", *words]) for words in _after(readme_commands, "medcl", "run")]


# ----------------------------------------------------------------------------- schema and Ray's validation
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
    assert config["file_mounts"]["/home/ray/medcl/medcl"] == "./medcl"
    assert config["file_mounts"]["/home/ray/medcl/pyproject.toml"] == "./pyproject.toml"
    setup = " ".join(config["setup_commands"])
    assert "cp -r /home/ray/medcl /tmp/medcl-src" in setup and "pip install --quiet /tmp/medcl-src" in setup
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


# ----------------------------------------------------------------------------- file mounts and sync
def test_file_mounts_come_from_tracked_repository_paths(config):
    """`ray up` fails on a missing local path and hashes all of it: sources exist in a clone and hold no local state."""
    from ray._private.thirdparty.pathspec import PathSpec

    ignored = PathSpec.from_lines("gitwildmatch", (REPO / ".gitignore").read_text().splitlines())
    for remote, local in config["file_mounts"].items():
        if local.startswith("~"):
            continue  # a folder in your home (the Ray token), made by README's token step
        path = (REPO / local).resolve()
        for name in LOCAL_STATE:
            assert not (REPO / name).resolve().is_relative_to(path), f"{remote}: {local} holds {name}"
        assert path.exists(), f"{remote}: {local} does not exist in a fresh clone; `ray up` would fail"
        rel = path.relative_to(REPO).as_posix() + ("/" if path.is_dir() else "")
        assert not ignored.match_file(rel), f"{remote}: {local} is in .gitignore (absent from a fresh clone)"


def test_ray_up_hash_does_not_read_local_state(config, tmp_path):
    """Ray hashes mounts with os.walk, rsync_exclude or not: changing .venv & co must not change the hash."""
    from ray.autoscaler._private.util import hash_runtime_conf

    for name in LOCAL_STATE:
        (tmp_path / name).mkdir()
        (tmp_path / name / "blob").write_text("v1")
    mounts = {}
    for remote, local in config["file_mounts"].items():
        if local.startswith("~"):
            continue
        src = (tmp_path / local).resolve()
        if not src.exists():
            src.parent.mkdir(parents=True, exist_ok=True)
            src.mkdir() if (REPO / local).is_dir() else src.write_text("x")
        mounts[remote] = str(src)

    def contents_hash() -> str:
        return hash_runtime_conf(mounts, None, {}, generate_file_mounts_contents_hash=True)[1]

    before = contents_hash()
    for name in LOCAL_STATE:
        (tmp_path / name / "blob").write_text("v2")
    assert contents_hash() == before, "a file mount's local path contains local state that `ray up` would hash"
    (Path(mounts["/home/ray/medcl/medcl"]) / "new.py").write_text("")  # the check can fail: code counts
    assert contents_hash() != before


def test_rsync_excludes_cover_local_state(config):
    patterns = [p.removeprefix("**/") for p in config.get("rsync_exclude", [])]
    for name in (*LOCAL_STATE, ".git", "__pycache__"):
        assert any(fnmatch.fnmatch(name, p) for p in patterns), f"rsync_exclude misses {name}"


# ----------------------------------------------------------------------------- what listens where, and auth
def _strings(node):
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield str(key)
            yield from _strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _strings(value)


def test_nothing_listens_on_all_interfaces(config):
    from gunicorn.config import Config as GunicornConfig

    assert not [s for s in _strings(config) if "0.0.0.0" in s or "[::]" in s]
    head = config["head_start_ray_commands"]
    ray_start = next(c for c in head if "ray start --head" in c)
    assert re.findall(r"--dashboard-host[= ](\S+)", ray_start) == ["127.0.0.1"]  # `ray dashboard` forwards to it
    server = next(c for c in head if "mlflow server" in c)
    words = shlex.split(server[server.rindex("mlflow server"):].replace(PRIVATE_ADDRESS, "HEAD_PRIVATE_IP"))

    def option(flag: str) -> str:
        return words[words.index(flag) + 1]

    assert option("--host") == "HEAD_PRIVATE_IP"  # reachable by the other nodes only
    binds = GunicornConfig().parser().parse_args(shlex.split(option("--gunicorn-opts"))).bind
    assert binds == [f"127.0.0.1:{option('--port')}"]  # what `ray attach -p PORT` forwards to
    assert f"MLFLOW_TRACKING_URI=http://{PRIVATE_ADDRESS}:{option('--port')}" in ray_start


def test_mlflow_database_outlives_the_container(config):
    """Ray runs the container with --rm: the sqlite file must sit in a host folder mounted into it."""
    server = next(c for c in config["head_start_ray_commands"] if "mlflow server" in c)
    database = Path(re.search(r"--backend-store-uri sqlite:///(\S+)", server).group(1))
    volumes = dict(reversed(o.split()[1].split(":")) for o in config["docker"].get("head_run_options", [])
                   if o.startswith("-v "))
    host = volumes.get(str(database.parent))
    assert host, f"{database} is inside the container only: `ray down` deletes it"
    assert f"mkdir -p {host}" in config.get("initialization_commands", [])  # made on the host, as ssh_user


def test_token_auth_on_every_node(config, readme_commands):
    assert "-e RAY_AUTH_MODE=token" in config["docker"]["run_options"]  # run_options: head and workers
    token_dir = config["file_mounts"].get("/home/ray/.ray")  # the image user's ~/.ray: Ray's default token path
    assert token_dir, "no file mount brings the token to /home/ray/.ray/auth_token"
    assert ["ray", "get-auth-token", "--generate"] in [w[:3] for w in readme_commands]
    assert any(w[0] == "cp" and w[-1] == f"{token_dir}/auth_token" for w in readme_commands)
    exports = [i for i, w in enumerate(readme_commands) if w == ["export", "RAY_AUTH_MODE=token"]]
    submits = [i for i, w in enumerate(readme_commands) if w[:3] == ["ray", "job", "submit"]]
    assert exports and submits and exports[0] < submits[0]


# ----------------------------------------------------------------------------- data
def test_data_copied_on_every_node_before_ray_starts(config):
    copies = set()
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        commands = config[key]
        at = [i for i, c in enumerate(commands) if DATA_COPY.search(c)]
        start = next(i for i, c in enumerate(commands) if "ray start" in c)
        assert at and at[0] < start, f"{key}: no data copy before `ray start`"
        copies.add(DATA_COPY.search(commands[at[0]]).groups())
    assert len(copies) == 1, f"head and workers copy different data: {copies}"


def test_readme_uploads_the_pipeline_dataset_where_nodes_copy_it(config, readme_commands):
    from medcl.cli import build_parser
    from medcl.data.ingest import ingest_options

    prefix, data_dir = _data_copy(config)
    (run,) = {args.pipeline for args in _medcl_runs(readme_commands)}
    dataset = yaml.safe_load((REPO / run).read_text())["dataset"]
    (ingest,) = [build_parser().parse_args(["ingest", *w]) for w in _after(readme_commands, "medcl", "ingest")]
    assert ingest.source_kind == dataset["source"] and ingest.out == dataset["path"]
    given = {k[4:]: v for k, v in vars(ingest).items() if k.startswith("opt_") and v is not None}
    defaults = ingest_options(ingest.source_kind)
    assert json.dumps({**defaults, **given}, default=list) == json.dumps({**defaults, **dataset["options"]},
                                                                         default=list)
    name = Path(ingest.out).name
    (upload,) = [w for w in _after(readme_commands, "aws", "s3", "sync") if w[0] == ingest.out]
    assert upload[1].replace("$BUCKET", "YOUR-BUCKET") == f"{prefix}/{name}"
    for args in _medcl_runs(readme_commands):
        assert f"dataset.path={data_dir}/{name}" in args.set


def test_readme_runs_read_the_cluster_copy_and_write_to_s3(config, readme_commands):
    from medcl.config.binder import apply_overrides, build, load_yaml
    from medcl.config.pipeline import PipelineConfig

    _, data_dir = _data_copy(config)
    runs = _medcl_runs(readme_commands)
    assert len(runs) >= 2 and any(args.address == "auto" for args in runs)  # the job, and on the head
    for args in runs:
        cfg = build(PipelineConfig, apply_overrides(load_yaml(REPO / args.pipeline), args.set), source=args.pipeline)
        assert cfg.dataset.source == "existing"  # an ingest inside the job would write on one node only
        assert cfg.dataset.path.parent == Path(data_dir)
        assert cfg.storage_path.startswith("s3://")
        assert args.use_gpu and args.num_workers >= 1


def test_readme_job_upload_leaves_out_local_state(readme_commands, tmp_path):
    from ray._private.runtime_env.packaging import create_package
    from ray.dashboard.modules.dashboard_sdk import parse_runtime_env_args
    from ray.dashboard.modules.job.cli import submit

    (words,) = _after(readme_commands, "ray", "job", "submit")
    params = submit.make_context("submit", list(words)).params
    exported = {w[1].split("=", 1)[0]: w[1].split("=", 1)[1] for w in readme_commands if w[0] == "export"}
    address = params["address"] or exported.get("RAY_API_SERVER_ADDRESS") or exported.get("RAY_ADDRESS")
    assert address == "http://localhost:8265"  # where `ray dashboard cluster.yaml` forwards
    assert params["entrypoint"][:2] == ("medcl", "run")
    runtime_env = parse_runtime_env_args(runtime_env=params["runtime_env"],
                                         runtime_env_json=params["runtime_env_json"],
                                         working_dir=params["working_dir"])
    assert runtime_env["working_dir"] == "."
    tree = tmp_path / "repo"
    for rel in ("medcl/__init__.py", "pipelines/hippocampus.yaml", ".git/HEAD",
                *(f"{name}/blob" for name in LOCAL_STATE if name != "mlflow.db"), "mlflow.db"):
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_text("x")
    create_package(str(tree), tmp_path / "pkg.zip", include_gitignore=False, excludes=runtime_env.get("excludes"))
    with zipfile.ZipFile(tmp_path / "pkg.zip") as pkg:
        assert {n.split("/")[0] for n in pkg.namelist()} == {"medcl", "pipelines"}


def test_readme_lets_the_head_pass_the_worker_role(config, readme_commands):
    profile = config["available_node_types"]["gpu_worker"]["node_config"]["IamInstanceProfile"]["Name"]
    (words,) = _after(readme_commands, "aws", "iam", "put-role-policy")
    assert words[words.index("--role-name") + 1] == profile  # the head runs with Ray's default role
    policy = json.loads(words[words.index("--policy-document") + 1].replace("$ACCOUNT", "123456789012"))
    (statement,) = policy["Statement"]
    assert statement["Action"] == "iam:PassRole" and statement["Resource"].endswith(f":role/{profile}")
