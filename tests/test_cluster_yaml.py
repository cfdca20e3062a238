"""Checks of cluster.yaml, the Ray cluster launcher config, with Ray's own loader and config
checks (no network, no cluster start)."""

from __future__ import annotations

import json
import pathlib
import re

import jsonschema
import pytest
import ray.autoscaler
import yaml
from ray.util import accelerators

ROOT = pathlib.Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"
RAY_SCHEMA = pathlib.Path(ray.autoscaler.__file__).parent / "ray-schema.json"
HEAD = "head"


# The required inputs as shipped: YAML tags no loader knows, so reading the file fails. Each
# is `KEY: [&anchor ]!required-input "..."` on a line of its own; the user replaces the value.
REQUIRED_INPUT = re.compile(r'(?m)^(\s*(\w+): (?:&\w+ )?)!required-input "[^"\n]*"$')
EXAMPLE_AMI = "ami-0123456789abcdef0"  # well-formed, stands for the user's DLAMI id
EXAMPLE_IMAGE = "111122223333.dkr.ecr.us-west-2.amazonaws.com/selma-ray:2.60.0"  # a pushed image
EXAMPLE_INPUTS = {"image": EXAMPLE_IMAGE, "ImageId": EXAMPLE_AMI}


def fill_required_inputs(text: str) -> str:
    """cluster.yaml with its required inputs set, as the header tells the user to."""
    found = [m.group(2) for m in REQUIRED_INPUT.finditer(text)]
    assert sorted(found) == sorted(EXAMPLE_INPUTS), f"required inputs: {found}"
    return REQUIRED_INPUT.sub(lambda m: m.group(1) + EXAMPLE_INPUTS[m.group(2)], text)


@pytest.fixture(scope="module")
def text() -> str:
    return CLUSTER_YAML.read_text(encoding="utf-8")


@pytest.fixture
def config(text: str) -> dict:
    """The config a user deploys: cluster.yaml with its inputs filled in (fresh per test)."""
    cfg = yaml.safe_load(fill_required_inputs(text))
    assert isinstance(cfg, dict)
    return cfg


def header(text: str) -> str:
    """The comment block at the top of cluster.yaml, without the leading '# '."""
    lines = text.split("cluster_name:")[0].splitlines()
    return "\n".join(line.removeprefix("#").removeprefix(" ") for line in lines)


def _gpu_types(config: dict) -> dict[str, dict]:
    return {n: t for n, t in config["available_node_types"].items() if n != HEAD}


def _all_setup_commands(config: dict) -> list[str]:
    cmds: list[str] = []
    for key in (
        "initialization_commands",
        "setup_commands",
        "head_setup_commands",
        "worker_setup_commands",
    ):
        cmds += config.get(key) or []
    for node_type in config["available_node_types"].values():
        for key in ("initialization_commands", "worker_setup_commands"):
            cmds += node_type.get(key) or []
    return cmds


def test_cluster_yaml_validates_against_ray_autoscaler_schema(config: dict) -> None:
    schema = json.loads(RAY_SCHEMA.read_text(encoding="utf-8"))
    jsonschema.validate(config, schema)


def test_cluster_is_named_and_bounded(config: dict) -> None:
    assert config["cluster_name"] == "selma-ray"
    assert config["max_workers"] >= sum(t["max_workers"] for t in _gpu_types(config).values())
    assert config["idle_timeout_minutes"] == 10
    assert config["upscaling_speed"] == 1.0


def test_provider_is_aws_and_terminates_nodes(config: dict) -> None:
    provider = config["provider"]
    assert provider["type"] == "aws"
    assert provider["region"] == "us-west-2"
    assert provider["cache_stopped_nodes"] is False


def test_head_node_has_no_ray_cpus_and_is_never_scaled(config: dict) -> None:
    """num-cpus 0 on the head: drivers stay there, tasks, trials and merges go to workers."""
    assert config["head_node_type"] == HEAD
    head = config["available_node_types"][HEAD]
    assert head["resources"] == {"CPU": 0}
    assert head["min_workers"] == 0
    assert head["max_workers"] == 0
    (start,) = [c for c in config["head_start_ray_commands"] if "ray start" in c]
    assert "--num-cpus=0" in start.split()


def test_gpu_worker_types_autoscale_from_zero(config: dict) -> None:
    gpu_types = _gpu_types(config)
    assert {"gpu_a10g", "gpu_a100"} <= set(gpu_types)
    for name, node_type in gpu_types.items():
        assert node_type["resources"].get("GPU", 0) >= 1, name
        assert node_type["min_workers"] == 0, name
        assert node_type["max_workers"] >= 1, name


def test_gpu_worker_types_declare_their_gpus_and_accelerator_type(config: dict) -> None:
    """The resources Ray gives such a node on AWS (GPU count, and accelerator_type:<EC2 GPU
    name> as Ray spells it), declared so the autoscaler can start the type from zero."""
    types = config["available_node_types"]
    assert types["gpu_a10g"]["node_config"]["InstanceType"] == "g5.2xlarge"
    a10g = f"accelerator_type:{accelerators.NVIDIA_TESLA_A10G}"
    assert types["gpu_a10g"]["resources"] == {"CPU": 8, "GPU": 1, a10g: 1}
    assert types["gpu_a100"]["node_config"]["InstanceType"] == "p4d.24xlarge"
    a100 = f"accelerator_type:{accelerators.NVIDIA_A100}"
    assert types["gpu_a100"]["resources"] == {"CPU": 96, "GPU": 8, a100: 1}


def test_every_node_type_uses_the_one_required_image_id(config: dict) -> None:
    for name, node_type in config["available_node_types"].items():
        assert node_type["node_config"]["ImageId"] == EXAMPLE_AMI, name


def test_the_required_inputs_are_documented_at_the_top(text: str) -> None:
    top = header(text)
    assert top.startswith("Ray cluster launcher config")
    assert "REQUIRED INPUTS" in top
    assert "'!required-input'" in top and "aws ec2 describe-images" in top
    assert 'docker build -t "$REGISTRY/selma-ray:' in top  # its tag: tests/test_deploy.py
    assert "docker push" in top
    lines = [x.strip() for x in text.splitlines() if REQUIRED_INPUT.search(x)]
    assert len(lines) == 2
    assert lines[0].startswith('image: !required-input "selma-ray:')
    assert lines[1].startswith("ImageId: &dlami_image_id !required-input")


def test_nodes_run_the_project_image_and_workers_get_the_gpus(config: dict) -> None:
    docker = config["docker"]
    assert docker["image"] == EXAMPLE_IMAGE
    assert docker["pull_before_run"] is True
    assert "--gpus all" in docker["worker_run_options"]
    # the head has no GPU: `--gpus all` there would keep its container from starting
    assert "--gpus all" not in docker.get("run_options", []) + docker.get("head_run_options", [])
    for node_type in config["available_node_types"].values():
        assert "docker" not in node_type  # no per-type override of the image or its options


def test_every_node_logs_in_to_ecr_of_the_provider_region(config: dict) -> None:
    (login,) = config["initialization_commands"]
    region = config["provider"]["region"]
    assert f"aws ecr get-login-password --region {region} | docker login" in login
    assert f".dkr.ecr.{region}.amazonaws.com" in login


def test_nothing_is_installed_at_boot(config: dict) -> None:
    """The image carries every package: no node pip-installs (Ray's defaults replaced too)."""
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands"):
        assert config[key] == [], key
    assert not any("pip" in c or "apt" in c for c in _all_setup_commands(config))


def test_ray_is_started_from_the_image(config: dict) -> None:
    head = " ".join(config["head_start_ray_commands"])
    worker = " ".join(config["worker_start_ray_commands"])
    assert "ray start --head --port=6379" in head
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head
    assert "ray start --address=$RAY_HEAD_IP:6379" in worker
    assert "venv" not in head + worker


def test_every_node_runs_ray_with_token_auth_and_the_submitters_token(
    config: dict, text: str
) -> None:
    """Ray 2.60 leaves auth off on a fresh node: each start command turns it on, with the
    token generated on the submitter's machine (copied to every node), which the header's
    commands generate and send."""
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        (start,) = [c for c in config[key] if "ray start" in c]
        assert re.search(r"export RAY_AUTH_MODE=token; ray start ", start), key
    assert config["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}
    top = " ".join(header(text).split())
    generate, export = top.find("ray get-auth-token --generate"), top.find("RAY_AUTH_MODE=token")
    assert 0 <= generate < export < top.find("ray job submit")


def test_workers_and_head_carry_iam_instance_profiles(config: dict, text: str) -> None:
    """Workers read and write the run bucket with their instance profile (no keys); the
    head's profile may pass the workers' role on. The header gives both policies."""
    types = config["available_node_types"]
    assert types[HEAD]["node_config"]["IamInstanceProfile"] == {"Name": "selma-ray-head"}
    for name in _gpu_types(config):
        profile = types[name]["node_config"]["IamInstanceProfile"]
        assert profile == {"Name": "selma-ray-worker"}, name
    top = header(text)
    for action in ("s3:ListBucket", "s3:GetObject", "s3:PutObject", "s3:DeleteObject"):
        assert action in top, action
    assert "iam:PassRole" in top and "AmazonEC2ContainerRegistryReadOnly" in top


def test_secrets_come_through_the_jobs_runtime_env(text: str) -> None:
    top = " ".join(header(text).split())
    assert "Secrets never go into this file or into the image" in top
    submit = """--runtime-env-json '{"env_vars": {"HF_TOKEN": "'"$HF_TOKEN"'"}}'"""
    assert submit in top
    assert "run.dir=s3://" in top


def _run_ray_up(monkeypatch, path: pathlib.Path) -> tuple[object, list[dict]]:
    """``ray up PATH -y`` through Ray's own CLI, stopped where it would first reach the cloud:
    the provider bootstrap (IAM role, key pair, security groups), then the head launch."""
    from click.testing import CliRunner
    from ray.autoscaler._private import commands
    from ray.scripts.scripts import up

    reached: list[dict] = []

    class CloudReached(Exception):
        pass

    def bootstrap(config: dict, no_config_cache: bool = False) -> dict:
        reached.append(config)
        raise CloudReached

    monkeypatch.setattr(commands, "_bootstrap_config", bootstrap)
    monkeypatch.setattr(commands, "get_or_create_head_node", bootstrap)
    result = CliRunner().invoke(up, [str(path), "-y", "--disable-usage-stats"])
    assert result.exit_code != 0
    if reached:
        assert isinstance(result.exception, CloudReached)
    return result.exception, reached


def test_ray_up_refuses_the_shipped_inputs_before_any_cloud_call(
    monkeypatch, tmp_path: pathlib.Path, text: str
) -> None:
    error, reached = _run_ray_up(monkeypatch, CLUSTER_YAML)
    assert reached == []  # nothing created, nothing launched
    assert isinstance(error, yaml.constructor.ConstructorError)
    assert "could not determine a constructor for the tag '!required-input'" in str(error)
    line = text.splitlines()[error.problem_mark.line]  # the error points at the line to edit
    assert REQUIRED_INPUT.search(line)
    # with the inputs filled in, the same command goes on to the cloud with them
    filled = tmp_path / "cluster.yaml"
    filled.write_text(fill_required_inputs(text), encoding="utf-8")
    error, reached = _run_ray_up(monkeypatch, filled)
    assert len(reached) == 1
    ids = {n: t["node_config"]["ImageId"] for n, t in reached[0]["available_node_types"].items()}
    assert ids == {"head": EXAMPLE_AMI, "gpu_a10g": EXAMPLE_AMI, "gpu_a100": EXAMPLE_AMI}
    assert reached[0]["docker"]["image"] == EXAMPLE_IMAGE


def test_filled_in_cluster_yaml_passes_rays_own_config_checks(config: dict) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(config)  # what `ray up` runs before the provider bootstrap
    validate_config(prepared)
    assert prepared["available_node_types"]["gpu_a100"]["node_config"]["ImageId"] == EXAMPLE_AMI
    assert prepared["setup_commands"] == [] and prepared["head_setup_commands"] == []


def test_cluster_yaml_contains_no_secrets(config: dict, text: str) -> None:
    lowered = text.lower()
    assert "aws_secret_access_key" not in lowered
    assert "aws_access_key_id" not in lowered
    assert "-----begin" not in lowered
    assert not re.search(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", text)
    assert not re.search(r"\bhf_[A-Za-z0-9]{20,}", text)
    assert set(config["auth"]) == {"ssh_user"}
    for name, node_type in config["available_node_types"].items():
        assert "KeyName" not in node_type["node_config"], name
