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
