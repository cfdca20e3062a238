"""How the constants of selma_ray.plan's expert memory estimate were measured.

Builds the SD1.x / SD2 / SDXL UNets (and text encoders, VAE) from their published configs on
the meta device (no weights, no memory, no download), adds the rank-128 LoRA the presets train,
and runs one forward pass of one sample while counting what autograd saves for the backward
pass (``saved_tensors_hooks``), deduplicated by storage and without the parameters: in pure
fp16, as fp16 autocast runs it (``autocast_like``: the trainer's fp16/bf16 path) and in fp32
(``mixed_precision: "no"``), at the native resolution and at 3/4 of it (to check that the
activations scale with the pixel count). Attention is counted as flash attention saves it
(q, k, v, output and a float32 log-sum-exp per query), which is what SDPA runs on a GPU.

With gradient checkpointing (diffusers checkpoints every ResNet and transformer block), what
stays is: the tensors saved outside the checkpointed blocks, the inputs of every checkpointed
call, and, during the backward pass, the saved tensors of the one block being recomputed (the
largest is counted).

The VAE encoder's peak (no gradients) is measured on real tensors on the CPU: every new
storage an op allocates is counted until it is freed (``vae_encode_peak``).

Run: python scripts/measure_activation_memory.py
(about 2.5 minutes on 2 CPU cores, no GPU, no download)
"""

from __future__ import annotations

import contextlib

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, UNet2DConditionModel
from peft import LoraConfig
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

SD1 = dict(
    sample_size=64,
    cross_attention_dim=768,
    attention_head_dim=8,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)
SD2 = dict(SD1, sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20))
SD2["use_linear_projection"] = True
SDXL = dict(
    sample_size=128,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(5, 10, 20),
    use_linear_projection=True,
    transformer_layers_per_block=(1, 2, 10),
    cross_attention_dim=2048,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
TEXT = {
    "clip-l": dict(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12
    ),
    "openclip-h": dict(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16
    ),
    "openclip-bigg": dict(
        hidden_size=1280,
        intermediate_size=5120,
        num_hidden_layers=32,
        num_attention_heads=20,
        projection_dim=1280,
    ),
}
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


class FlashLike(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):  # never run
        raise NotImplementedError


def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kw):
    return FlashLike.apply(q, k, v)


@contextlib.contextmanager
def autocast_like():
    """What fp16 autocast does to the saved tensors, on the meta device (which has no autocast):
    group_norm and layer_norm run in float32 (their float32 input copies and outputs are what
    the next ops save), linear layers and convolutions cast their inputs to the weights' fp16."""
    import torch.nn.functional as F

    saved = F.group_norm, F.layer_norm, F.linear, F.conv2d

    def f32(t):
        return None if t is None else t.float()

    def group_norm(x, groups, weight=None, bias=None, eps=1e-5):
        return saved[0](x.float(), groups, f32(weight), f32(bias), eps)

    def layer_norm(x, shape, weight=None, bias=None, eps=1e-5):
        return saved[1](x.float(), shape, f32(weight), f32(bias), eps)

    def linear(x, weight, bias=None):
        return saved[2](x.to(weight.dtype), weight, bias)

    def conv2d(x, weight, bias=None, *args):
        return saved[3](x.to(weight.dtype), weight, bias, *args)

    F.group_norm, F.layer_norm, F.linear, F.conv2d = group_norm, layer_norm, linear, conv2d
    try:
        yield
    finally:
        F.group_norm, F.layer_norm, F.linear, F.conv2d = saved


def measure(cfg: dict, res: int, rank: int = 128, pooled: int = 0, mode: str = "autocast"):
    """Saved bytes of one sample: mode autocast (fp16 weights, fp16 autocast), fp32 (all fp32)."""
    dtype = torch.float32 if mode == "fp32" else torch.float16
    with init_empty_weights():
        unet = UNet2DConditionModel(**cfg)
    params = count(unet)
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS))
    lora = sum(p.numel() for n, p in unet.named_parameters() if "lora_" in n)
    unet.to(dtype)
    for n, p in unet.named_parameters():
        p.requires_grad_("lora_" in n)
    unet.enable_gradient_checkpointing()
    unet.train()
    param_storages = {p.untyped_storage()._cdata for p in unet.parameters()}

    seen: set[int] = set()
    buckets = {"outside": 0}
    stack = ["outside"]
    block_sizes: list[int] = []
    inputs: dict[int, int] = {}

    keep: list[torch.Tensor] = []  # counted storages stay alive: their ids are never reused

    def pack(t):
        keep.append(t)
        key = t.untyped_storage()._cdata
        if key not in param_storages and key not in seen:
            seen.add(key)
            buckets[stack[-1]] = buckets.get(stack[-1], 0) + t.untyped_storage().nbytes()
        return t

    def ckpt(fn, *args, **kwargs):
        for a in list(args) + list(kwargs.values()):
            if isinstance(a, torch.Tensor):
                keep.append(a)
                inputs.setdefault(a.untyped_storage()._cdata, a.untyped_storage().nbytes())
        name = f"block{len(block_sizes)}"
        stack.append(name)
        try:
            return fn(*args, **kwargs)
        finally:
            stack.pop()
            block_sizes.append(buckets.get(name, 0))

    for m in unet.modules():
        if hasattr(m, "_gradient_checkpointing_func"):
            m._gradient_checkpointing_func = ckpt
    lat = res // 8
    sample = torch.empty(1, 4, lat, lat, device="meta", dtype=dtype)
    t = torch.empty(1, device="meta", dtype=torch.long)
    hidden = torch.empty(1, 77, cfg["cross_attention_dim"], device="meta", dtype=dtype)
    added = None
    if cfg.get("addition_embed_type") == "text_time":
        added = {
            "text_embeds": torch.empty(1, pooled, device="meta", dtype=dtype),
            "time_ids": torch.empty(1, 6, device="meta", dtype=dtype),
        }
    cast = autocast_like() if mode == "autocast" else contextlib.nullcontext()
    original = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = sdpa
    try:
        with cast, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = unet(sample, t, encoder_hidden_states=hidden, added_cond_kwargs=added).sample
    finally:
        torch.nn.functional.scaled_dot_product_attention = original
    assert out.requires_grad
    everything = sum(buckets.values())
    checkpointed = buckets["outside"] + sum(inputs.values()) + max(block_sizes)
    return params, lora, everything, checkpointed


def vae_encode_peak(res: int) -> float:
    """Peak bytes the SD/SDXL VAE encoder allocates for one image (no gradients), in units of
    one 128-channel float32 map of the image's size."""
    import weakref

    from torch.utils._python_dispatch import TorchDispatchMode

    class Peak(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.live = self.peak = 0
            self.seen: set[int] = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, tuple | list) else [out]:
                if not isinstance(t, torch.Tensor) or t._base is not None:
                    continue
                key = t.untyped_storage().data_ptr()
                if key in self.seen:
                    continue
                self.seen.add(key)
                n = t.untyped_storage().nbytes()
                self.live += n
                self.peak = max(self.peak, self.live)
                weakref.finalize(t, self._free, n, key)
            return out

        def _free(self, n: int, key: int) -> None:
            self.live -= n
            self.seen.discard(key)

    torch.manual_seed(0)
    vae = sd_vae().eval()
    x = torch.randn(1, 3, res, res)
    tracker = Peak()
    with torch.no_grad(), tracker:
        vae.encode(x)
    return tracker.peak / (128 * res * res * 4)


def sd_vae() -> AutoencoderKL:
    """The SD / SDXL VAE's architecture (random weights)."""
    return AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=2,
    )


def main() -> None:
    gib = 2**30
    with init_empty_weights():
        vae = sd_vae()
        text = {
            "clip-l": count(CLIPTextModel(CLIPTextConfig(**TEXT["clip-l"]))),
            "openclip-h": count(CLIPTextModel(CLIPTextConfig(**TEXT["openclip-h"]))),
            "openclip-bigg": count(
                CLIPTextModelWithProjection(CLIPTextConfig(**TEXT["openclip-bigg"]))
            ),
        }
    print(f"vae params {count(vae):,}")
    for res in (128, 256):
        print(f"vae encode peak at {res}px: {vae_encode_peak(res):.2f} 128-channel maps")
    print("text encoder params", {k: f"{v:,}" for k, v in text.items()})
    for name, cfg, native, pooled in (
        ("sd1", SD1, 512, 0),
        ("sd2", SD2, 768, 0),
        ("sdxl", SDXL, 1024, 1280),
    ):
        for mode in ("fp16", "autocast", "fp32"):
            for res in sorted({native, native * 3 // 4}):
                params, lora, full, ck = measure(cfg, res, pooled=pooled, mode=mode)
                print(
                    f"{name} {res}px {mode}: unet {params:,} params, rank-128 LoRA {lora:,}; "
                    f"activations per sample: {full / gib:.3f} GiB, checkpointed "
                    f"{ck / gib:.3f} GiB"
                )


if __name__ == "__main__":
    main()
