"""The full-size SD 2.x architecture in Stability's single-file layout, on the meta device: the names
and shapes real SD 2.x files hold, the architecture inferred back from them, and the key conversion."""

from __future__ import annotations

import pytest

from leansd.engine.memory import reference_models
from leansd.models.configs import (
    SD2_TEXT_CONFIG,
    SD2_UNET_CONFIG,
    SD2_VAE_CONFIG,
    infer_open_clip_config,
    infer_unet_config,
    infer_vae_config,
)
from leansd.models.convert import diffusers_to_ldm, ldm_to_diffusers
from leansd.models.families import OPEN_CLIP, describe
from leansd.models.family import ModelFamily, detect_family

P = "cond_stage_model.model."


@pytest.fixture(scope="module")
def sd2():
    models = reference_models(ModelFamily.SD2)
    ldm = diffusers_to_ldm(models.unet, models.vae, models.text_encoder, text_layout=OPEN_CLIP)
    return models, ldm, {k: tuple(v.shape) for k, v in ldm.items()}


def test_original_layout_names_and_counts(sd2):
    *_, shapes = sd2
    count = lambda prefix: sum(k.startswith(prefix) for k in shapes)  # noqa: E731
    assert count("model.diffusion_model.") == 686
    assert count("first_stage_model.") == 248
    assert count(P) == 24 * 12 + 5  # blocks, token/positional embeddings, ln_final (2), text_projection
    known = {
        P + "token_embedding.weight": (49408, 1024),
        P + "positional_embedding": (77, 1024),
        P + "transformer.resblocks.0.attn.in_proj_weight": (3072, 1024),
        P + "transformer.resblocks.0.attn.in_proj_bias": (3072,),
        P + "transformer.resblocks.23.attn.out_proj.weight": (1024, 1024),
        P + "transformer.resblocks.23.mlp.c_fc.weight": (4096, 1024),
        P + "transformer.resblocks.23.mlp.c_proj.weight": (1024, 4096),
        P + "transformer.resblocks.5.ln_1.weight": (1024,),
        P + "ln_final.bias": (1024,),
        P + "text_projection": (1024, 1024),
        "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320),  # linear, not a 1x1 conv
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),
        "model.diffusion_model.middle_block.1.proj_out.weight": (1280, 1280),
    }
    for key, shape in known.items():
        assert shapes[key] == shape, key
    assert not any(k.startswith("cond_stage_model.transformer.") for k in shapes)


def test_architecture_inferred_from_the_file_is_the_published_one(sd2):
    *_, shapes = sd2
    assert detect_family(shapes) is ModelFamily.SD2
    spec = describe(ModelFamily.SD2)
    unet = infer_unet_config(shapes, spec=spec)
    assert {k: unet[k] for k in SD2_UNET_CONFIG} == SD2_UNET_CONFIG
    vae = infer_vae_config(shapes, scaling_factor=spec.vae_scaling_factor)
    assert {k: vae[k] for k in SD2_VAE_CONFIG} == SD2_VAE_CONFIG
    text = infer_open_clip_config(shapes)
    assert {k: text[k] for k in SD2_TEXT_CONFIG} == SD2_TEXT_CONFIG


def test_conversion_gives_every_module_tensor_with_its_shape(sd2):
    models, ldm, _ = sd2
    spec = describe(ModelFamily.SD2)
    unet_sd, vae_sd, text_sd = ldm_to_diffusers(
        ldm, unet_config=infer_unet_config({k: tuple(v.shape) for k, v in ldm.items()}, spec=spec),
        vae_config=SD2_VAE_CONFIG, text_layout=OPEN_CLIP,
    )
    for module, converted in ((models.unet, unet_sd), (models.vae, vae_sd), (models.text_encoder, text_sd)):
        expected = {k: tuple(v.shape) for k, v in module.state_dict().items() if not k.endswith("position_ids")}
        got = {k: tuple(v.shape) for k, v in converted.items()}
        assert got == expected
