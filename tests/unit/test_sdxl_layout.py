"""SDXL base in Stability's single-file (sgm) layout: tiny random models written and read back,
every tensor equal; the architecture inferred from the file's shapes."""

from __future__ import annotations

import pytest
import torch

from leansd.models.checkpoint import read_state_dict, state_dict_summary
from leansd.models.configs import infer_open_clip_config, infer_text_config, infer_unet_config, infer_vae_config
from leansd.models.convert import SGM_BIG_G_PREFIX, SGM_CLIP_L_PREFIX, diffusers_to_sgm, sgm_to_diffusers
from leansd.models.families import describe
from leansd.models.family import ModelFamily, detect_family
from leansd.models.tiny import build_tiny_components, write_tiny_single_file


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    path = write_tiny_single_file(tmp_path_factory.mktemp("xl") / "tiny-sdxl.safetensors", family=ModelFamily.SDXL)
    return path, read_state_dict(path)


def test_layout_names(written):
    _, sd = written
    assert detect_family(state_dict_summary(sd)) is ModelFamily.SDXL
    assert "model.diffusion_model.label_emb.0.0.weight" in sd
    assert SGM_CLIP_L_PREFIX + "text_model.embeddings.position_ids" in sd
    assert sd[SGM_BIG_G_PREFIX + "transformer.resblocks.0.attn.in_proj_weight"].shape == (96, 32)
    assert sd[SGM_BIG_G_PREFIX + "text_projection"].shape == (32, 32)
    assert not any(k.startswith("cond_stage_model.") for k in sd)


def test_inferred_architecture_and_round_trip_every_tensor(written):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    _, sd = written
    shapes = state_dict_summary(sd)
    spec = describe(ModelFamily.SDXL)
    text_2 = infer_open_clip_config(shapes, prefix=SGM_BIG_G_PREFIX)
    unet_config = infer_unet_config(shapes, spec=spec, pooled_width=int(text_2["projection_dim"]))
    assert (unet_config["addition_embed_type"], unet_config["addition_time_embed_dim"],
            unet_config["projection_class_embeddings_input_dim"]) == ("text_time", 8, 80)
    vae_config = infer_vae_config(shapes, scaling_factor=spec.vae_scaling_factor)
    modules = (
        UNet2DConditionModel(**unet_config),
        AutoencoderKL(**vae_config),
        CLIPTextModel(CLIPTextConfig(**infer_text_config(shapes, prefix=SGM_CLIP_L_PREFIX))),
        CLIPTextModelWithProjection(CLIPTextConfig(**text_2)),
    )
    for module, weights in zip(modules, sgm_to_diffusers(sd, unet_config=unet_config, vae_config=vae_config), strict=True):
        module.load_state_dict(weights, strict=False)
        assert set(weights) == {k for k in module.state_dict() if not k.endswith("position_ids")}
    reference = build_tiny_components(seed=0, family=ModelFamily.SDXL)
    for module, ref in zip(modules, (reference.unet, reference.vae, reference.text_encoder, reference.text_encoder_2), strict=True):
        for key, value in ref.state_dict().items():
            assert torch.equal(module.state_dict()[key], value), key
    back = diffusers_to_sgm(*modules)
    assert set(back) == set(sd)
    for key, value in sd.items():
        assert torch.equal(back[key], value), key
