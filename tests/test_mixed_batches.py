"""Mixed-adapter batches: images of different adapters, mixes and ``base`` in one forward pass,
each equal to the same request rendered alone, on the tiny model with random adapters."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from selma_ray.config import load_config
from selma_ray.core.rundir import RunDir
from selma_ray.diffusion.engine import DiffusionService
from selma_ray.diffusion.mixed import UnsupportedMix, lora_layers, per_sample_adapters
from selma_ray.serving.app import pass_groups
from selma_ray.testing import make_run

SKILLS = ["counting", "everyday_scenes", "dense_detail"]
MIX = (("counting", 0.7), ("everyday_scenes", 0.3))
# Single adapters, a weighted mix, base, and a repeat, in one batch.
SPECS = [
    (("counting", 1.0),),
    (("base", 1.0),),
    MIX,
    (("merged", 1.0),),
    (("everyday_scenes", 1.0),),
    (("counting", 1.0),),
]
PROMPTS = ["two red apples", "a cat", "a dog on a sofa", "a cat", "three birds", "a red car"]
NEGATIVES = [None, "blurry", None, "", "dark", None]
SEEDS = [1, 2, 3, 4, 5, 6]
STEPS = 3


def _pixels(png: bytes):
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)), dtype=np.int16)


@pytest.fixture(scope="module")
def service(tmp_path_factory, one_thread) -> DiffusionService:
    return DiffusionService(make_run(tmp_path_factory.mktemp("mixed") / "run", SKILLS))


def _alone(service: DiffusionService, guidance: float, specs=SPECS) -> list[bytes]:
    """Each request on the single-spec path (``set_adapters`` / ``disable_lora``)."""
    return [
        service.generate_many(spec, [p], [s], STEPS, guidance, 32, 32, negative)[0]
        for spec, p, s, negative in zip(specs, PROMPTS, SEEDS, NEGATIVES, strict=True)
    ]


@pytest.mark.parametrize("guidance", [7.5, 1.0], ids=["cfg", "no-cfg"])
def test_each_image_of_a_mixed_batch_equals_its_request_alone(service, guidance):
    mixed = service.generate_mixed(SPECS, PROMPTS, SEEDS, STEPS, guidance, 32, 32, NEGATIVES)
    alone = _alone(service, guidance)
    for spec, together, single in zip(SPECS, mixed, alone, strict=True):
        diff = abs(_pixels(together) - _pixels(single)).max()
        assert diff <= 1, f"{spec}: {diff}/255 off the image rendered alone"
    # Each adapter really acted: the same prompt and seed differ by adapter.
    by_spec = service.generate_mixed(SPECS, ["a cat"] * 6, [7] * 6, STEPS, guidance, 32, 32)
    assert len(set(by_spec)) == 5  # six images, five distinct specs


def test_a_mixed_batch_is_one_pipeline_call_with_one_unet_pass_per_step(service, monkeypatch):
    pipe_calls, unet_batches = [], []
    call = type(service.pipe).__call__

    def counted(pipe, *args, **kwargs):
        pipe_calls.append(len(kwargs["prompt"]))
        return call(pipe, *args, **kwargs)

    monkeypatch.setattr(type(service.pipe), "__call__", counted)
    handle = service.pipe.unet.register_forward_pre_hook(
        lambda module, args: unet_batches.append(args[0].shape[0])
    )
    try:
        service.generate_mixed(SPECS, PROMPTS, SEEDS, STEPS, 7.5, 32, 32, NEGATIVES)
    finally:
        handle.remove()
    assert pipe_calls == [len(SPECS)]
    # Classifier-free guidance: every UNet pass carries both halves of all six images.
    assert unet_batches == [2 * len(SPECS)] * STEPS


def test_no_lora_layer_is_left_hooked_after_a_mixed_batch(service):
    service.generate_mixed(SPECS, PROMPTS, SEEDS, 1, 7.5, 32, 32)
    assert not any(layer._forward_hooks for layer in lora_layers(service.pipe).values())
    # and the single-spec path after it is unaffected
    assert (
        service.generate_many(SPECS[0], PROMPTS[:1], SEEDS[:1], STEPS, 7.5, 32, 32, None)[0]
        == _alone(service, 7.5)[0]
    )


def test_a_layer_fed_rows_that_are_not_blocks_of_the_samples_raises(service):
    import torch

    internal = service._internal
    specs = [((internal["counting"], 1.0),), (), ((internal["merged"], 1.0),)]
    path, layer = next(iter(lora_layers(service.pipe).items()))
    with per_sample_adapters(service.pipe, specs):
        layer(torch.zeros(6, 4, layer.in_features))  # two blocks of three samples
        with pytest.raises(RuntimeError, match=f"{path} got a batch of 4 rows for 3 samples"):
            layer(torch.zeros(4, 4, layer.in_features))


class _OneLayerPipe:
    """What ``per_sample_adapters`` needs of a pipeline, around one PEFT LoRA Linear."""

    def __init__(self, model):
        self.components = {"net": model}

    def disable_lora(self) -> None:
        for layer in lora_layers(self).values():
            layer.enable_adapters(False)


@pytest.mark.parametrize("rank", [2, 64], ids=["factors", "dense"])
def test_each_sample_gets_its_own_adapters_update_at_any_rank(rank):
    """One Linear (32 -> 24) with two adapters: per sample, the hooked layer's output equals
    PEFT's with that adapter alone, a weighted mix of both, or none (base). At rank 64 the
    update runs as one (in, out) matrix per sample (fewer multiply-adds than the factors);
    at rank 2 as the two factors."""
    import torch
    from peft import LoraConfig, inject_adapter_in_model

    from selma_ray.diffusion.mixed import gather

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 24))
    for name, r in (("hi", rank), ("lo", 2)):
        config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0"], init_lora_weights=False)
        model = inject_adapter_in_model(config, model, adapter_name=name)
    layer = model[0]
    x = torch.randn(4, 5, 32)

    def peft_alone(name: str | None, i: int):
        layer.enable_adapters(name is not None)
        if name is not None:
            layer.set_adapter(name)
        with torch.no_grad():
            return layer(x[i : i + 1])

    mix = (("hi", 0.25), ("lo", 0.5))
    specs = [(("hi", 1.0),), (), mix, (("lo", 1.0),)]
    want = [peft_alone("hi", 0), peft_alone(None, 1), None, peft_alone("lo", 3)]
    base = peft_alone(None, 2)
    want[2] = base + sum(w * (peft_alone(n, 2) - base) for n, w in mix)
    chain = gather(layer, specs).rows(4, "net.0")
    assert len(chain) == (1 if rank == 64 else 2)
    with per_sample_adapters(_OneLayerPipe(model), specs), torch.no_grad():
        got = layer(x)
        doubled = layer(torch.cat([x, x]))  # classifier-free guidance's two blocks
    for i, spec in enumerate(specs):
        torch.testing.assert_close(got[i : i + 1], want[i], msg=f"sample {i}: {spec}")
        torch.testing.assert_close(doubled[i + 4 : i + 5], want[i], msg=f"block 2, {spec}")


def test_mixed_batch_arguments_must_line_up(service):
    with pytest.raises(ValueError, match="2 specs, 1 prompts"):
        service.generate_mixed(SPECS[:2], PROMPTS[:1], SEEDS[:1], 1, 7.5, 32, 32)
    with pytest.raises(KeyError, match="unknown adapters"):
        service.generate_mixed([(("nope", 1.0),)], ["x"], [1], 1, 7.5, 32, 32)


def _write_expert(run: RunDir, skill: str, seed: int, unet_targets: list[str], te: bool) -> None:
    """A random expert with LoRA on the UNet's ``unet_targets`` and, with ``te``, on the text
    encoder's attention projections, saved as the experts stage saves one."""
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from transformers import CLIPTextModel

    from selma_ray.models import TINY_SD, resolve

    gen = torch.Generator().manual_seed(seed)

    def random_lora(model, targets):
        config = LoraConfig(r=4, lora_alpha=4, target_modules=targets)
        model.add_adapter(config)
        state = get_peft_model_state_dict(model)
        return {k: torch.randn(v.shape, generator=gen) * 0.2 for k, v in state.items()}, config

    unet = UNet2DConditionModel.from_pretrained(resolve(TINY_SD), subfolder="unet")
    unet_state, unet_config = random_lora(unet, unet_targets)
    te_state = te_config = None
    if te:
        encoder = CLIPTextModel.from_pretrained(resolve(TINY_SD), subfolder="text_encoder")
        te_state, te_config = random_lora(encoder, ["q_proj", "k_proj", "v_proj", "out_proj"])

    def meta(config):
        return {k: sorted(v) if isinstance(v, set) else v for k, v in config.to_dict().items()}

    StableDiffusionPipeline.save_lora_weights(
        run.path("experts", skill),
        unet_lora_layers=unet_state,
        text_encoder_lora_layers=te_state,
        unet_lora_adapter_metadata=meta(unet_config),
        text_encoder_lora_adapter_metadata=te_config and meta(te_config),
        safe_serialization=True,
    )
    run.write_manifest("synthetic", "experts", skill)


def _run(root: Path, unet_targets: list[str], te: bool) -> Path:
    cfg = load_config("tiny", [f"run.dir={root}", "prompts.skills=[counting, everyday_scenes]"])
    run = RunDir(root)
    run.write_text(cfg.to_yaml(), "config.yaml")
    for i, skill in enumerate(cfg.prompts.skills):
        _write_expert(run, skill, i, unet_targets, te)
    return root


def test_text_encoder_lora_mixes_per_image_too(tmp_path, one_thread):
    service = DiffusionService(_run(tmp_path / "te", ["to_q", "to_k", "to_v", "to_out.0"], True))
    assert any(p.startswith("text_encoder.") for p in lora_layers(service.pipe))
    specs = [(("counting", 1.0),), (("base", 1.0),), MIX, (("everyday_scenes", 1.0),)]
    for guidance in (7.5, 1.0):
        mixed = service.generate_mixed(specs, PROMPTS[:4], SEEDS[:4], STEPS, guidance, 32, 32)
        for spec, p, s, image in zip(specs, PROMPTS, SEEDS, mixed, strict=False):
            alone = service.generate_many(spec, [p], [s], STEPS, guidance, 32, 32)[0]
            assert abs(_pixels(image) - _pixels(alone)).max() <= 1, (spec, guidance)


def test_lora_on_a_convolution_cannot_mix_and_says_where(tmp_path, one_thread):
    service = DiffusionService(_run(tmp_path / "conv", ["to_q", "conv1"], False))
    assert "resnets.0.conv1 is a LoRA" in service.mixed_batches()
    specs = [(("counting", 1.0),), (("everyday_scenes", 1.0),)]
    with pytest.raises(UnsupportedMix, match="Linear layers only"):
        service.generate_mixed(specs, ["a", "b"], [1, 2], 1, 7.5, 32, 32)
    # One spec for the whole batch still runs, on the single-spec path.
    assert len(service.generate_mixed(specs[:1] * 2, ["a", "b"], [1, 2], 1, 7.5, 32, 32)) == 2


def _job(spec="merged", steps=2, guidance=7.5, size=32, negative=None) -> dict:
    return {
        "spec": ((spec, 1.0),),
        "steps": steps,
        "guidance_scale": guidance,
        "width": size,
        "height": size,
        "negative_prompt": negative,
    }


def test_requests_for_any_adapters_share_a_pass_unless_call_settings_differ():
    jobs = [
        _job("merged"),
        _job("counting", negative="blurry"),
        _job("base"),
        _job("counting", steps=3),
        _job("merged", guidance=1.0),
        _job("merged", size=48),
        _job("everyday_scenes", negative=""),
    ]
    assert pass_groups(jobs, lambda negative: None) == [[0, 1, 2, 6], [3], [4], [5]]
    # A pipeline that tells a missing negative prompt from a given one (SDXL) keeps them apart.
    assert pass_groups(jobs, lambda negative: bool(negative)) == [[0, 2, 6], [1], [3], [4], [5]]
    # Adapters that cannot mix: one pass per spec and negative prompt, as before.
    one_each = [[i] for i in range(len(jobs))]
    assert pass_groups(jobs, lambda negative: None, mix_adapters=False) == one_each


def test_an_on_demand_merge_shares_a_mixed_batch_with_the_run_adapters(service):
    """A merge the replica made on demand is one more adapter in the pipeline: it mixes with
    the run's own adapters in one pass, each image equal to its request alone."""
    from selma_ray.diffusion.engine import MergeSpec

    merge = MergeSpec("ties", ("counting", "everyday_scenes"), density=0.5)
    with service.holding(merge):
        merged = service.merge(merge)
        specs = [merged, (("counting", 1.0),), (("base", 1.0),)]
        mixed = service.generate_mixed(specs, ["a cat"] * 3, [5] * 3, STEPS, 7.5, 32, 32)
        alone = [
            service.generate_many(spec, ["a cat"], [5], STEPS, 7.5, 32, 32)[0] for spec in specs
        ]
    for spec, together, single in zip(specs, mixed, alone, strict=True):
        assert abs(_pixels(together) - _pixels(single)).max() <= 1, spec
    assert len(set(mixed)) == 3  # same prompt and seed: the merge is neither expert nor base
