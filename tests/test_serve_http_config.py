"""serve/config.yaml is a valid Serve config whose import_path and args build the app."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml

from selma_ray.testing import SERVE_CONFIG, make_run


@pytest.fixture(scope="module")
def spec() -> dict:
    return yaml.safe_load(SERVE_CONFIG.read_text())


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("serve_config") / "run", ["counting"])


def test_config_validates_against_serves_own_schema(spec):
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(spec)
    (app,) = schema.applications
    assert app.import_path == "selma_ray.serving.app:build_app"
    deployments = {d.name: d for d in app.deployments}
    diffusion = deployments["Diffusion"]
    auto = diffusion.autoscaling_config
    assert auto["min_replicas"] <= auto["max_replicas"] and auto["target_ongoing_requests"] > 0
    assert diffusion.max_ongoing_requests >= 1
    # One full batch per replica is the load to scale on.
    assert auto["target_ongoing_requests"] == app.args["limits"]["max_batch_size"]
    assert diffusion.max_ongoing_requests >= app.args["limits"]["max_batch_size"]
    assert "num_gpus" in diffusion.ray_actor_options.model_dump(exclude_unset=True)
    assert app.args["run_dir"] and app.args["limits"]["max_n"] >= 1


def test_deployment_names_match_the_app(spec):
    from selma_ray.serving.app import Diffusion, Ingress

    names = {d["name"] for d in spec["applications"][0]["deployments"]}
    assert names == {Diffusion.name, Ingress.name}  # Serve rejects unknown names


def test_import_path_and_args_build_the_app(spec, run_dir):
    from ray.serve import Application

    module, attr = spec["applications"][0]["import_path"].split(":")
    builder = getattr(importlib.import_module(module), attr)
    args = {**spec["applications"][0]["args"], "run_dir": str(run_dir)}
    assert isinstance(builder(args), Application)


@pytest.mark.parametrize(
    ("args", "says"),
    [
        ({}, "args.run_dir"),
        ({"run_dir": "R", "limit": {}}, "unknown args ['limit']"),
        ({"run_dir": "R", "limits": {"max_n": 0}}, "max_n"),
        ({"run_dir": "R", "limits": {"max_steps": 1}}, "default_steps"),
        ({"run_dir": "R", "limits": {"no_such": 1}}, "no_such"),
        ({"run_dir": "R", "limits": [1]}, "mapping"),
        ({"run_dir": "R", "limits": {"max_batch_size": 64}}, "could never fill a batch"),
    ],
)
def test_bad_args_are_refused_with_a_message(run_dir, args, says):
    from selma_ray.serving.app import build_app

    args = {k: (str(run_dir) if v == "R" else v) for k, v in args.items()}
    with pytest.raises(ValueError, match=None) as err:
        build_app(args)
    assert says in str(err.value)


def test_the_app_autoscales_on_one_full_batch_per_replica(run_dir):
    from selma_ray.serving.app import build_app

    app = build_app({"run_dir": str(run_dir), "limits": {"max_batch_size": 4}})
    ingress = app._bound_deployment  # what serve.run deploys: the ingress, bound to Diffusion
    diffusion = ingress.init_args[0]._bound_deployment
    auto = diffusion._deployment_config.autoscaling_config
    assert auto.target_ongoing_requests == 4
    assert (auto.upscale_delay_s, auto.downscale_delay_s) == (30.0, 600.0)  # the run's config
