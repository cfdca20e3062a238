"""The serving engine without Ray: adapter discovery and per-request switching."""

from __future__ import annotations

from pathlib import Path

import pytest

from selma_ray.config import load_config
from selma_ray.core.lora_io import save_adapter
from selma_ray.core.rundir import RunDir
from selma_ray.diffusion.engine import (
    DiffusionService,
    MergeSpec,
    find_adapters,
    parse_adapter_spec,
)
from selma_ray.merge.files import merge_adapters


def _random_adapter(out: Path, seed: int) -> None:
    import torch
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from selma_ray.models import TINY_SD, resolve

    unet = UNet2DConditionModel.from_pretrained(resolve(TINY_SD), subfolder="unet")
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    unet.add_adapter(config)
    gen = torch.Generator().manual_seed(seed)
    state = {
        k: torch.randn(v.shape, generator=gen) * 0.5
        for k, v in get_peft_model_state_dict(unet).items()
    }
    save_adapter(out, state, config.to_dict())


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("serving") / "run"
    cfg = load_config("tiny", [f"run.dir={root}", "prompts.skills=[counting, everyday_scenes]"])
    run = RunDir(root)
    run.write_text(cfg.to_yaml(), "config.yaml")
    for i, skill in enumerate(cfg.prompts.skills):
        _random_adapter(run.path("experts", skill), seed=i)
        run.write_manifest("fp", "experts", skill)
    merge_adapters(
        {s: str(run.path("experts", s)) for s in cfg.prompts.skills}, None, str(run.path("merged"))
    )
    run.write_manifest("fp", "merged")
    _random_adapter(run.path("experts", "unfinished"), seed=9)  # no manifest: not served
    return root


def test_find_adapters_lists_finished_experts_merged_and_base(run_dir):
    found = find_adapters(run_dir)
    assert set(found) == {"base", "counting", "everyday_scenes", "merged"}
    assert found["merged"].kind == "merged" and found["counting"].kind == "expert"
    assert found["counting"].rank == 4 and found["base"].path is None


@pytest.fixture(scope="module")
def service(run_dir) -> DiffusionService:
    return DiffusionService(run_dir)


def _png(service, adapter, seed=1):
    return service.generate(
        "two red apples", adapter, seed=seed, steps=2, guidance_scale=7.5, size=32
    )


def test_each_adapter_gives_a_different_image(service):
    images = {a: _png(service, a) for a in ["base", "counting", "everyday_scenes", "merged"]}
    assert len(set(images.values())) == 4


def test_switching_back_gives_the_same_image_as_before(service):
    first = _png(service, "counting")
    _png(service, "merged")
    _png(service, "base")
    assert _png(service, "counting") == first


def test_unknown_adapter_error_lists_valid_names(service):
    with pytest.raises(KeyError, match="valid: .*counting.*merged"):
        _png(service, "nope")


def test_a_weighted_mix_differs_from_each_of_its_parts(service):
    mix = service.generate(
        "two red apples",
        {"counting": 0.7, "everyday_scenes": 0.3},
        seed=1,
        steps=2,
        guidance_scale=7.5,
        size=32,
    )
    assert mix not in {_png(service, "counting"), _png(service, "everyday_scenes")}


def test_batched_generation_equals_one_by_one(service):
    spec = (("merged", 1.0),)
    batched = service.generate_many(spec, ["a cat", "a dog", "a cat"], [1, 2, 3], 2, 7.5, 32, 32)
    alone = [
        service.generate_many(spec, [p], [s], 2, 7.5, 32, 32)[0]
        for p, s in [("a cat", 1), ("a dog", 2), ("a cat", 3)]
    ]
    # Same seeds, same images: every image has its own generator. Batched kernels round
    # differently in the last bit, so pixels may differ by 1/255, never more.
    for x, y in zip(batched, alone, strict=True):
        assert _pixels(x).shape == (32, 32, 3)
        assert abs(_pixels(x) - _pixels(y)).max() <= 1


def _pixels(png: bytes):
    import io

    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)), dtype=np.int16)


@pytest.mark.parametrize(
    ("adapter", "error", "match"),
    [
        ("nope", KeyError, "valid"),
        ({"counting": 0.5, "nope": 0.5}, KeyError, "nope"),
        ({"base": 1.0}, ValueError, "cannot be mixed"),
        ({}, ValueError, "non-empty"),
        ({"counting": -1.0}, ValueError, "weights"),
        ({"counting": 0.0}, ValueError, "at least one"),
    ],
)
def test_bad_adapter_specs_are_refused_with_a_message(adapter, error, match):
    with pytest.raises(error, match=match):
        parse_adapter_spec(adapter, {"base", "merged", "counting"})


def test_adapter_specs_are_canonical():
    valid = {"base", "merged", "counting"}
    assert parse_adapter_spec("merged", valid) == (("merged", 1.0),)
    assert parse_adapter_spec(
        {
            "merged": 0.3,
            "counting": 0.7,
        },
        valid,
    ) == parse_adapter_spec({"counting": 0.7, "merged": 0.3}, valid)
    assert parse_adapter_spec({"merged": 1, "counting": 0}, valid) == (("merged", 1.0),)


def test_reload_swaps_adapters_without_rebuilding_the_pipeline(run_dir, tmp_path):
    other = tmp_path / "other"
    cfg = load_config("tiny", [f"run.dir={other}", "prompts.skills=[counting]"])
    run = RunDir(other)
    run.write_text(cfg.to_yaml(), "config.yaml")
    _random_adapter(run.path("experts", "counting"), seed=42)
    run.write_manifest("fp", "experts", "counting")
    service = DiffusionService(run_dir)
    pipe, before = service.pipe, _png(service, "counting")
    service.reload(other)
    assert service.pipe is pipe
    assert {a["name"] for a in service.describe()} == {"base", "counting"}
    assert _png(service, "counting") != before
    with pytest.raises(KeyError):
        _png(service, "merged")


def test_reload_refuses_a_run_of_another_base_model(run_dir, tmp_path):
    other = tmp_path / "sd14"
    other.mkdir()
    (other / "config.yaml").write_text(load_config("sd14").to_yaml())
    with pytest.raises(ValueError, match="deploy a new application"):
        DiffusionService(run_dir).reload(other)


def test_a_failed_reload_keeps_the_old_adapters_serving(run_dir, tmp_path, monkeypatch):
    """The new set loads in full before the old one goes: an adapter that fails its check
    part-way through a reload leaves the old set loaded, serving the same images."""
    monkeypatch.setenv("SELMA_CACHE", str(tmp_path / "cache"))  # nothing cached yet
    other = tmp_path / "broken"
    cfg = load_config("tiny", [f"run.dir={other}", "prompts.skills=[counting, dense_detail]"])
    run = RunDir(other)
    run.write_text(cfg.to_yaml(), "config.yaml")
    for i, skill in enumerate(cfg.prompts.skills):
        _random_adapter(run.path("experts", skill), seed=50 + i)
        rel = f"experts/{skill}/pytorch_lora_weights.safetensors"
        run.write_manifest("fp", "experts", skill, outputs=run.outputs([rel]))
    # dense_detail's file no longer matches the SHA-256 its manifest recorded.
    manifest = run.read_manifest("experts", "dense_detail")
    manifest["outputs"]["files"]["experts/dense_detail/pytorch_lora_weights.safetensors"][
        "sha256"
    ] = "0" * 64
    run.write_json(manifest, "experts", "dense_detail", "manifest.json")

    service = DiffusionService(run_dir)
    before = {a: _png(service, a) for a in ("counting", "merged")}
    loaded = set(service.pipe.get_list_adapters()["unet"])
    with pytest.raises(ValueError, match="does not match its manifest"):
        service.reload(other)
    assert set(service.pipe.get_list_adapters()["unet"]) == loaded  # nothing half-loaded
    assert {a["name"] for a in service.describe()} == {
        "base",
        "counting",
        "everyday_scenes",
        "merged",
    }
    assert {a: _png(service, a) for a in ("counting", "merged")} == before


def test_adapters_are_fetched_once_into_a_cache_keyed_by_content(run_dir, tmp_path, monkeypatch):
    from selma_ray.diffusion.engine import fetch_adapter

    monkeypatch.setenv("SELMA_CACHE", str(tmp_path / "cache"))
    run = RunDir(run_dir)
    info = find_adapters(run)["counting"]
    first = fetch_adapter(run, info)
    stamp = (first / "pytorch_lora_weights.safetensors").stat().st_mtime_ns
    again = fetch_adapter(run, info)
    assert again == first and first.parent == tmp_path / "cache" / "adapters"
    assert (again / "pytorch_lora_weights.safetensors").stat().st_mtime_ns == stamp
    assert (first / "pytorch_lora_weights.safetensors").read_bytes() == run.read_bytes(info.path)


def _render(service, spec):
    return service.generate_many(spec, ["two red apples"], [1], 2, 7.5, 32, 32)[0]


def _loaded_delta(pipe, module: str, internal: str):
    layer = pipe.unet.get_submodule(module)
    a, b = layer.lora_A[internal].weight, layer.lora_B[internal].weight
    return (b.flatten(1) @ a.flatten(1)) * layer.scaling[internal]


def test_an_on_demand_merge_loads_merge_maths_weights_and_the_lru_evicts(service, run_dir):
    import torch

    from selma_ray.lora import methods as merge_math
    from selma_ray.lora.files import read_lora

    experts = ("counting", "everyday_scenes")
    ties = MergeSpec("ties", experts, density=0.5)
    svd = MergeSpec("svd", experts, weights=(0.7, 0.3), rank=2)
    service.merge_cache_size = 1
    try:
        assert service.merge(ties) == ((ties.name, 1.0),)
        internal = service._internal[ties.name]
        inputs = [read_lora(Path(run_dir) / "experts" / e)[0] for e in experts]
        expected = merge_math.merge(inputs, merge_math.default_weights("ties", 2), "ties")
        for module, m in expected.items():
            want = merge_math.delta_weight(m).flatten(1)
            torch.testing.assert_close(_loaded_delta(service.pipe, module, internal), want)
        image = _render(service, ((ties.name, 1.0),))
        assert image != _png(service, "base") and image != _png(service, "merged")
        assert service.merge(ties) == ((ties.name, 1.0),)  # from the LRU: not merged again
        assert service.merge_stats == {"computed": 1, "reused": 1, "evicted": 0}

        service.merge(svd)  # the cache holds one: ties goes
        assert service.merge_stats == {"computed": 2, "reused": 1, "evicted": 1}
        assert [m["name"] for m in service.cached_merges()] == [svd.name]
        assert internal not in service.pipe.get_list_adapters()["unet"]
        with pytest.raises(KeyError, match="unknown adapters"):
            _render(service, ((ties.name, 1.0),))
        service.merge(ties)  # asked again: merged again, the same image
        assert _render(service, ((ties.name, 1.0),)) == image
    finally:
        service.merge_cache_size = 4


def test_a_merge_a_request_is_holding_is_not_evicted_until_it_lets_go(service):
    """Two requests merging at once with room for one: the first one's merge stays loaded
    while it renders, and the next merge after that evicts it."""
    experts = ("counting", "everyday_scenes")
    first, second = MergeSpec("cat", experts), MergeSpec("paper", experts)
    third = MergeSpec("svd", experts, rank=2)
    service.merge_cache_size = 1
    try:
        with service.holding(first):
            service.merge(first)
            service.merge(second)  # over the cache's size, but first is held
            assert [m["name"] for m in service.cached_merges()] == [first.name, second.name]
            image = _render(service, ((first.name, 1.0),))
        service.merge(third)  # nothing is held now: first and second go
        assert [m["name"] for m in service.cached_merges()] == [third.name]
        with pytest.raises(KeyError, match="unknown adapters"):
            _render(service, ((first.name, 1.0),))
        service.merge(first)  # merged again: the same image
        assert _render(service, ((first.name, 1.0),)) == image
    finally:
        service.merge_cache_size = 4


def test_requests_render_while_an_on_demand_merge_is_computed(service, monkeypatch):
    """The merge maths runs outside the pipeline's lock: a request for another adapter
    renders while a merge is still being computed, and the merge then loads and serves."""
    import threading

    from selma_ray.diffusion import engine

    spec = MergeSpec("paper", ("counting", "everyday_scenes"), weights=(0.4, 0.6))
    started, release = threading.Event(), threading.Event()
    write = engine._write_merge

    def slow_write(*args, **kwargs):
        started.set()
        if not release.wait(60):
            raise TimeoutError("the test never released the merge")
        return write(*args, **kwargs)

    monkeypatch.setattr(engine, "_write_merge", slow_write)
    merged: list = []
    worker = threading.Thread(target=lambda: merged.append(service.merge(spec)))
    worker.start()
    try:
        assert started.wait(60)
        rendered = _png(service, "counting")  # would wait for the merge under one lock
        assert worker.is_alive() and not merged  # the merge is still in progress
    finally:
        release.set()
        worker.join(60)
    assert rendered == _png(service, "counting")
    assert merged == [((spec.name, 1.0),)]
    assert _render(service, ((spec.name, 1.0),)) != rendered


def _copy_with_new_counting(run_dir: Path, root: Path, seed: int) -> Path:
    """A copy of the run whose "counting" expert has other weights."""
    import shutil

    shutil.copytree(run_dir, root)
    _random_adapter(root / "experts" / "counting", seed=seed)
    RunDir(root).write_manifest("fp", "experts", "counting")
    return root


def _assert_loaded_merge(service, internal: str, run: Path, spec: MergeSpec) -> None:
    """The merge loaded as ``internal`` has merge_math's weights for ``run``'s experts."""
    import torch

    from selma_ray.lora import methods as merge_math
    from selma_ray.lora.files import read_lora

    inputs = [read_lora(run / "experts" / e)[0] for e in spec.experts]
    weights = spec.weights or merge_math.default_weights(spec.method, len(inputs))
    expected = merge_math.merge(inputs, weights, spec.method)
    module = sorted(expected)[0]
    want = merge_math.delta_weight(expected[module]).flatten(1)
    torch.testing.assert_close(_loaded_delta(service.pipe, module, internal), want)


def test_a_reload_during_an_on_demand_merge_merges_the_new_runs_experts(
    service, run_dir, tmp_path, monkeypatch
):
    """Experts swapped by a reload while a merge is computed: the merge is made again from
    the new experts, never loaded from the old ones."""
    from selma_ray.diffusion import engine

    other = _copy_with_new_counting(run_dir, tmp_path / "other", seed=7)
    spec = MergeSpec("cat", ("counting", "everyday_scenes"), weights=(0.3, 0.9))
    calls: list = []
    write = engine._write_merge

    def reload_first(spec, run, *args, **kwargs):
        calls.append(run.uri)
        if len(calls) == 1:
            service.reload(other)
        return write(spec, run, *args, **kwargs)

    monkeypatch.setattr(engine, "_write_merge", reload_first)
    try:
        service.merge(spec)
        assert len(calls) == 2 and calls[1] == RunDir(other).uri
        _assert_loaded_merge(service, service._internal[spec.name], other, spec)
    finally:
        service.reload(run_dir)


def test_equal_merges_are_equal_specs_with_one_name():
    """Options the method ignores, ints for floats and lists for tuples do not make a new
    cache entry; the experts' order does (DARE's masks depend on it)."""
    base = MergeSpec("svd", ("counting", "everyday_scenes"), weights=(1.0, 2.0), rank=2)
    same = MergeSpec("svd", ["counting", "everyday_scenes"], [1, 2], density=0.3, rank=2, seed=5)
    assert same == base and same.name == base.name and hash(same) == hash(base)
    assert MergeSpec("svd", ("counting", "everyday_scenes"), rank=3).name != base.name
    ties = MergeSpec("ties", ("counting", "everyday_scenes"), density=0.3)
    assert ties.density == 0.3 and ties.seed == 0 and ties.rank is None
    dare = MergeSpec("dare_ties", ("counting", "everyday_scenes"), seed=1)
    swapped = MergeSpec("dare_ties", ("everyday_scenes", "counting"), seed=1)
    assert dare.name != swapped.name


@pytest.mark.parametrize(
    ("spec", "error", "match"),
    [
        (MergeSpec("ties", ("counting", "nope")), KeyError, "valid: \\['counting'"),
        (MergeSpec("ties", ("counting", "merged")), ValueError, "only experts"),
        (MergeSpec("ties", ("counting",)), ValueError, "two or more"),
        (MergeSpec("ties", ("counting", "counting")), ValueError, "two or more"),
        (MergeSpec("cat", ("counting", "everyday_scenes"), (1.0,)), ValueError, "1 weights"),
        (MergeSpec("cat", ("counting", "everyday_scenes"), (1.0, -1.0)), ValueError, ">= 0"),
        (MergeSpec("cat", ("counting", "everyday_scenes"), (0.0, 0.0)), ValueError, "all zero"),
        (MergeSpec("ties", ("counting", "everyday_scenes"), density=0), ValueError, "density"),
        (MergeSpec("mean", ("counting", "everyday_scenes")), ValueError, "merge method"),
    ],
)
def test_bad_on_demand_merges_are_refused_before_any_work(service, spec, error, match):
    before = dict(service.merge_stats)
    with pytest.raises(error, match=match):
        service.merge(spec)
    assert service.merge_stats == before


# ---- several runs in one pipeline (what a multiplexed serving replica does) ------------------


def _one_expert_run(root: Path, seed: int) -> Path:
    cfg = load_config("tiny", [f"run.dir={root}", "prompts.skills=[counting]"])
    run = RunDir(root)
    run.write_text(cfg.to_yaml(), "config.yaml")
    _random_adapter(run.path("experts", "counting"), seed=seed)
    run.write_manifest("fp", "experts", "counting")
    return root


def _mixed(service, spec, run=None, seed=1):
    return service.generate_mixed(
        [((spec, 1.0),)], ["two red apples"], [seed], 2, 7.5, 32, 32, run=run
    )[0]


def test_an_added_run_renders_its_own_adapters_beside_the_default_run(run_dir, tmp_path):
    service = DiffusionService(run_dir)
    pipe, default = service.pipe, _mixed(service, "counting")
    token = service.add_run(_one_expert_run(tmp_path / "other", seed=77))
    assert service.pipe is pipe  # one pipeline: the run's adapters load into it
    assert {a["name"] for a in service.describe(token)} == {"base", "counting"}
    other = _mixed(service, "counting", run=token)
    assert other != default  # same public name, the other run's weights
    assert _mixed(service, "counting") == default  # the default run is untouched
    assert _mixed(service, "base", run=token) == _mixed(service, "base")
    with pytest.raises(KeyError, match="merged"):  # only the added run's adapters
        _mixed(service, "merged", run=token)


def test_dropping_a_run_unloads_its_adapters_but_not_while_a_request_holds_it(run_dir, tmp_path):
    service = DiffusionService(run_dir)
    loaded = set(service.pipe.get_list_adapters()["unet"])
    token = service.add_run(_one_expert_run(tmp_path / "other", seed=78))
    assert len(set(service.pipe.get_list_adapters()["unet"]) - loaded) == 1
    with service.holding_run(token):
        service.drop_run(token)  # an eviction while a request is rendering with it
        assert _mixed(service, "counting", run=token)  # still served
    assert set(service.pipe.get_list_adapters()["unet"]) == loaded  # gone once let go
    assert service.loaded_runs() == {}
    service.drop_run(token)  # twice: nothing happens
    with pytest.raises(KeyError, match="not loaded"):
        _mixed(service, "counting", run=token)


def test_adding_a_run_of_another_base_model_names_both_models(run_dir, tmp_path):
    from selma_ray.diffusion.engine import BaseModelMismatch

    other = tmp_path / "sd14"
    other.mkdir()
    (other / "config.yaml").write_text(load_config("sd14").to_yaml())
    service = DiffusionService(run_dir)
    loaded = set(service.pipe.get_list_adapters()["unet"])
    with pytest.raises(BaseModelMismatch) as err:
        service.add_run(other)
    assert load_config("sd14").models.base in str(err.value)
    assert service.config.models.base in str(err.value)
    assert set(service.pipe.get_list_adapters()["unet"]) == loaded


def test_an_added_runs_merge_on_demand_is_of_its_own_experts_and_goes_with_the_run(
    run_dir, tmp_path
):
    """The same merge spec asked of the default run and of an added run: two merges, each of
    its own run's experts; dropping the run unloads its merge and keeps the default's."""
    service = DiffusionService(run_dir)
    other = _copy_with_new_counting(run_dir, tmp_path / "other", seed=11)
    token = service.add_run(other)
    spec = MergeSpec("cat", ("counting", "everyday_scenes"))
    assert service.merge(spec, token) == service.merge(spec) == ((spec.name, 1.0),)
    assert service.merge_stats["computed"] == 2  # one per run, under one public name
    internal = service._runs[token].internal[spec.name]
    _assert_loaded_merge(service, internal, other, spec)
    _assert_loaded_merge(service, service._internal[spec.name], Path(run_dir), spec)
    on_default = _mixed(service, spec.name)
    assert _mixed(service, spec.name, run=token) != on_default
    runs = [m["run"] for m in service.cached_merges()]
    assert runs == [RunDir(other).uri, RunDir(run_dir).uri]  # least recently used first
    service.drop_run(token)
    assert internal not in service.pipe.get_list_adapters()["unet"]
    assert [m["run"] for m in service.cached_merges()] == [RunDir(run_dir).uri]
    assert _mixed(service, spec.name) == on_default
    with pytest.raises(KeyError, match="not loaded"):
        service.merge(spec, token)
