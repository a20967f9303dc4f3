"""Original <-> diffusers key layouts and config inference, on the tiny model and on the full SD 1.5
architecture built on the meta device (shapes only, no memory)."""

from __future__ import annotations

import pytest
import torch

from leansd.models.configs import (
    SD1_SCHEDULER_CONFIG,
    SD15_TEXT_CONFIG as SD15_TEXT,
    SD15_UNET_CONFIG as SD15_UNET,
    SD15_VAE_CONFIG as SD15_VAE,
    infer_text_config,
    infer_unet_config,
    infer_vae_config,
    text_heads,
)
from leansd.models.convert import diffusers_to_ldm, ldm_schedule_buffers, ldm_to_diffusers, strip_text_prefix
from leansd.models.tiny import TINY_TEXT_CONFIG, TINY_UNET_CONFIG, TINY_VAE_CONFIG, build_tiny_components


def _meta_models(unet_config, vae_config, text_config):
    import accelerate
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with accelerate.init_empty_weights():
        return (
            UNet2DConditionModel(**unet_config),
            AutoencoderKL(**vae_config),
            CLIPTextModel(CLIPTextConfig(**text_config)),
        )


@pytest.fixture(scope="module")
def sd15():
    unet, vae, text = _meta_models(SD15_UNET, SD15_VAE, SD15_TEXT)
    ldm = diffusers_to_ldm(unet, vae, text)
    return unet, vae, text, {k: tuple(v.shape) for k, v in ldm.items()}


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_components(seed=0)


def _config(model) -> dict:
    return {k: v for k, v in dict(model.config).items() if k != "_use_default_values"}


def test_sd15_original_layout_names_and_counts(sd15):
    *_, shapes = sd15
    count = lambda prefix: sum(k.startswith(prefix) for k in shapes)  # noqa: E731
    assert count("model.diffusion_model.") == 686
    assert count("first_stage_model.") == 248
    assert count("cond_stage_model.transformer.text_model.") == 197  # 196 weights + position_ids
    known = {
        "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
        "model.diffusion_model.time_embed.0.weight": (1280, 320),
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
        "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
        "model.diffusion_model.input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
        "model.diffusion_model.input_blocks.11.0.emb_layers.1.weight": (1280, 1280),
        "model.diffusion_model.middle_block.1.proj_in.weight": (1280, 1280, 1, 1),
        "model.diffusion_model.middle_block.2.out_layers.3.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.8.2.conv.weight": (640, 640, 3, 3),
        "model.diffusion_model.output_blocks.11.1.proj_out.weight": (320, 320, 1, 1),
        "model.diffusion_model.out.2.weight": (4, 320, 3, 3),
        "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
        "first_stage_model.encoder.down.0.downsample.conv.weight": (128, 128, 3, 3),
        "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "first_stage_model.decoder.mid.attn_1.proj_out.weight": (512, 512, 1, 1),
        "first_stage_model.decoder.up.3.block.2.conv2.weight": (512, 512, 3, 3),
        "first_stage_model.decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
        "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
        "first_stage_model.quant_conv.weight": (8, 8, 1, 1),
        "first_stage_model.post_quant_conv.weight": (4, 4, 1, 1),
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
        "cond_stage_model.transformer.text_model.embeddings.position_ids": (1, 77),
        "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc1.weight": (3072, 768),
        "alphas_cumprod": (1000,),
    }
    assert {k: shapes.get(k) for k in known} == known
    assert "first_stage_model.decoder.up.0.upsample.conv.weight" not in shapes


def test_sd15_inferred_configs_equal_the_known_ones(sd15):
    unet, vae, text, shapes = sd15
    unet_config = infer_unet_config(shapes)
    vae_config = infer_vae_config(shapes)
    text_config = infer_text_config(shapes)
    assert {k: unet_config[k] for k in SD15_UNET} == SD15_UNET
    assert {k: vae_config[k] for k in SD15_VAE} == SD15_VAE
    assert {k: text_config[k] for k in SD15_TEXT} == SD15_TEXT
    # Every other setting (defaults included) comes out the same once the models are built.
    unet2, vae2, text2 = _meta_models(unet_config, vae_config, text_config)
    assert _config(unet2) == _config(unet)
    assert _config(vae2) == _config(vae)
    ignore = {"projection_dim", "pad_token_id", "bos_token_id", "eos_token_id"}  # not used by CLIPTextModel
    a, b = text2.config.to_dict(), text.config.to_dict()
    assert {k: v for k, v in a.items() if k not in ignore} == {k: v for k, v in b.items() if k not in ignore}


def test_tiny_inferred_configs_equal_the_tiny_configs(tiny):
    shapes = {k: tuple(v.shape) for k, v in diffusers_to_ldm(tiny.unet, tiny.vae, tiny.text_encoder).items()}
    unet_config, vae_config = infer_unet_config(shapes), infer_vae_config(shapes)
    assert {k: unet_config[k] for k in TINY_UNET_CONFIG} == TINY_UNET_CONFIG
    assert {k: vae_config[k] for k in TINY_VAE_CONFIG} == TINY_VAE_CONFIG
    assert infer_text_config(shapes) == TINY_TEXT_CONFIG


@pytest.mark.parametrize(("width", "heads"), [(32, 4), (768, 12), (1024, 16), (1280, 20)])
def test_text_heads_rule(width, heads):
    assert text_heads(width) == heads


@pytest.mark.parametrize("text_model_level", [True, False])
def test_tiny_round_trip_shares_memory(tiny, text_model_level):
    ldm = diffusers_to_ldm(tiny.unet, tiny.vae, tiny.text_encoder, text_model_level=text_model_level)
    prefix = "cond_stage_model.transformer." + ("text_model." if text_model_level else "")
    assert torch.equal(ldm[prefix + "embeddings.position_ids"], torch.arange(77)[None])
    assert ldm[prefix + "embeddings.position_ids"].dtype == torch.int64
    assert ldm["first_stage_model.encoder.mid.attn_1.k.weight"].shape == (32, 32, 1, 1)

    shapes = {k: tuple(v.shape) for k, v in ldm.items()}
    unet_sd, vae_sd, text_sd = ldm_to_diffusers(
        ldm, unet_config=infer_unet_config(shapes), vae_config=infer_vae_config(shapes)
    )
    for module, converted in ((tiny.unet, unet_sd), (tiny.vae, vae_sd), (tiny.text_encoder, text_sd)):
        reference = module.state_dict()
        assert set(converted) == set(reference)  # position_ids dropped: a non-persistent buffer
        for key, value in reference.items():
            assert converted[key].shape == value.shape, key
            assert torch.equal(converted[key], value), key
            assert converted[key].data_ptr() == value.data_ptr(), key  # renamed, not copied


def test_strip_text_prefix_both_layouts():
    t = torch.zeros(2)
    sd = {
        "cond_stage_model.transformer.text_model.final_layer_norm.weight": t,
        "cond_stage_model.transformer.embeddings.position_ids": t,
        "cond_stage_model.transformer.encoder.layers.0.mlp.fc1.bias": t,
        "model.diffusion_model.out.2.bias": t,
    }
    assert set(strip_text_prefix(sd)) == {"final_layer_norm.weight", "encoder.layers.0.mlp.fc1.bias"}


def test_schedule_buffers_match_diffusers_schedule():
    from diffusers import DDPMScheduler

    buffers = ldm_schedule_buffers()
    scheduler = DDPMScheduler.from_config(SD1_SCHEDULER_CONFIG)
    assert all(v.dtype == torch.float32 and v.shape == (1000,) for v in buffers.values())
    assert buffers["betas"][0].item() == pytest.approx(0.00085, rel=1e-6)
    assert buffers["betas"][-1].item() == pytest.approx(0.012, rel=1e-6)
    torch.testing.assert_close(buffers["alphas_cumprod"], scheduler.alphas_cumprod.float(), rtol=1e-5, atol=1e-7)
    assert buffers["alphas_cumprod_prev"][0].item() == 1.0
    torch.testing.assert_close(buffers["alphas_cumprod_prev"][1:], buffers["alphas_cumprod"][:-1])
    torch.testing.assert_close(
        buffers["sqrt_one_minus_alphas_cumprod"] ** 2, 1 - buffers["alphas_cumprod"], rtol=1e-5, atol=1e-7
    )
