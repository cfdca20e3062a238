"""The device follows the GPUs Ray assigned to a task or actor, not the run's config: a replica
deployed with ``num_gpus: 1`` renders on its GPU even if ``resources.serve.num_gpus`` is 0.
The cluster here has logical GPUs (no CUDA), so Ray's assignment is real and CUDA is faked."""

from __future__ import annotations

import pytest
import ray
import torch

from selma_ray.core import devices


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=1, num_gpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@ray.remote(num_cpus=0)
class Probe:
    def assigned(self) -> float | None:
        return devices.assigned_gpus()


def test_assigned_gpus_are_what_ray_gave_the_actor(cluster):
    assert ray.get(Probe.options(num_gpus=1).remote().assigned.remote()) == 1.0
    assert ray.get(Probe.options(num_gpus=0.5).remote().assigned.remote()) == 0.5
    assert ray.get(Probe.remote().assigned.remote()) == 0.0
    assert devices.assigned_gpus() is None  # the driver holds nothing


@pytest.mark.parametrize(
    ("assigned", "configured", "cuda"),
    [
        (1.0, 0.0, True),  # deployed with a GPU on a CPU run's config: the GPU is used
        (0.0, 1.0, False),  # the config asks for a GPU, Ray gave none: CPU
        (0.5, 0.0, True),
        (None, 1.0, True),  # outside Ray: the config decides
        (None, 0.0, False),
    ],
)
def test_cuda_follows_the_assignment_and_the_config_only_outside_ray(
    monkeypatch, assigned, configured, cuda
):
    monkeypatch.setattr(devices, "assigned_gpus", lambda: assigned)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert devices.use_cuda(configured) is cuda
    device, dtype = devices.torch_device_and_dtype(configured, "auto")
    assert (device, dtype) == (("cuda", torch.float16) if cuda else ("cpu", torch.float32))


def test_no_cuda_means_cpu_whatever_was_assigned(monkeypatch):
    monkeypatch.setattr(devices, "assigned_gpus", lambda: 1.0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert devices.torch_device_and_dtype(1, "bfloat16") == ("cpu", torch.bfloat16)
