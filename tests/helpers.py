"""Shared builders for the test suite (tiny random models, built in-process)."""

from __future__ import annotations

import functools

from leansd.models.bundle import ModelBundle


@functools.lru_cache(maxsize=1)
def _tiny_components():
    from leansd.models.tiny import build_tiny_components

    return build_tiny_components(seed=0)


def tiny_bundle() -> ModelBundle:
    """A fresh ModelBundle over deep copies of the tiny seed-0 models (tests may move/cast them)."""
    import copy

    from leansd.models.configs import SD1_SCHEDULER_CONFIG
    from leansd.models.family import ModelFamily
    from leansd.models.tiny import TINY_DEFAULT_SIZE
    from leansd.models.tokenizer import bundled_tokenizer

    c = _tiny_components()
    return ModelBundle(
        unet=copy.deepcopy(c.unet),
        vae=copy.deepcopy(c.vae),
        text_encoder=copy.deepcopy(c.text_encoder),
        tokenizer=bundled_tokenizer(),
        family=ModelFamily.SD1,
        name="tiny",
        source="tiny",
        hash=None,
        scheduler_config=dict(SD1_SCHEDULER_CONFIG),
        default_size=TINY_DEFAULT_SIZE,
        is_random=True,
    )


@functools.lru_cache(maxsize=1)
def _tiny_inpaint_components():
    from leansd.models.tiny import build_tiny_components

    return build_tiny_components(seed=0, inpainting=True)


def tiny_inpaint_bundle() -> ModelBundle:
    """Like tiny_bundle(), with a 9-channel inpainting UNet."""
    import copy

    from leansd.models.family import ModelFamily

    bundle = tiny_bundle()
    bundle.unet = copy.deepcopy(_tiny_inpaint_components().unet)
    bundle.family = ModelFamily.SD1_INPAINT
    return bundle


def tiny_kohya_lora(*, seed: int = 1, rank: int = 4, alpha: float = 2.0, text: bool = True, scale: float = 0.2) -> dict:
    """A random kohya-format LoRA for the tiny SD 1.x model (alpha != rank), as a state dict.

    Covers attention projections (Linear), ``proj_in``/``proj_out`` (1x1 convolutions), a resnet
    3x3 convolution (LoCon), and the text encoder's attention and MLP when ``text``.
    """
    import torch

    c = _tiny_components()
    g = torch.Generator().manual_seed(seed)
    out: dict = {}

    def add(prefix: str, module: "torch.nn.Module") -> None:
        w = module.weight
        if w.dim() == 4:
            down = torch.randn((rank, w.shape[1], w.shape[2], w.shape[3]), generator=g) * scale
            up = torch.randn((w.shape[0], rank, 1, 1), generator=g) * scale
        else:
            down = torch.randn((rank, w.shape[1]), generator=g) * scale
            up = torch.randn((w.shape[0], rank), generator=g) * scale
        out[f"{prefix}.lora_down.weight"] = down
        out[f"{prefix}.lora_up.weight"] = up
        out[f"{prefix}.alpha"] = torch.tensor(alpha)

    for name, module in c.unet.named_modules():
        if name.endswith(("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                          "attn2.to_v", "attn2.to_out.0", "proj_in", "proj_out", "ff.net.2")) or name.endswith(
                              "resnets.0.conv1"):
            add("lora_unet_" + name.replace(".", "_"), module)
    if text:
        for name, module in c.text_encoder.named_modules():
            if name.endswith(("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")):
                add("lora_te_text_model_" + name.replace(".", "_"), module)
    return out


TINY_TAESD_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    encoder_block_out_channels=(8, 8, 8, 8),
    decoder_block_out_channels=(8, 8, 8, 8),
    num_encoder_blocks=(1, 1, 1, 1),
    num_decoder_blocks=(1, 1, 1, 1),
    latent_channels=4,
)
"""A tiny random TAESD (AutoencoderTiny): four levels, so it upsamples 8x as the real one."""


def write_tiny_taesd(folder, *, seed: int = 0):
    """Save a tiny random-weight AutoencoderTiny as a diffusers folder; returns the module (CPU, fp32)."""
    import torch
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    module = AutoencoderTiny(**TINY_TAESD_CONFIG).eval()
    module.save_pretrained(str(folder))
    return module
