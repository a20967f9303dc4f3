"""Family detection from single-file shapes and diffusers folders; unsupported-family messages."""

from __future__ import annotations

import json

import pytest

from leansd.errors import ModelLoadError, UnsupportedModelError
from leansd.models.family import (
    ModelFamily,
    detect_family,
    detect_family_diffusers,
    require_supported,
)

U = "model.diffusion_model."
CONV_IN = U + "input_blocks.0.0.weight"
TO_K = U + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
CLIP_L = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"


@pytest.fixture(scope="module")
def tiny_shapes() -> dict[str, tuple[int, ...]]:
    """Shapes of the tiny model in the original layout (built on the meta device: no memory)."""
    import accelerate
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from leansd.models.convert import diffusers_to_ldm
    from leansd.models.tiny import TINY_TEXT_CONFIG, TINY_UNET_CONFIG, TINY_VAE_CONFIG

    with accelerate.init_empty_weights():
        unet = UNet2DConditionModel(**TINY_UNET_CONFIG)
        vae = AutoencoderKL(**TINY_VAE_CONFIG)
        text = CLIPTextModel(CLIPTextConfig(**TINY_TEXT_CONFIG))
    return {k: tuple(v.shape) for k, v in diffusers_to_ldm(unet, vae, text).items()}


def _sd(context: int, *, in_channels: int = 4, **extra: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    return {CONV_IN: (320, in_channels, 3, 3), TO_K: (320, context), **extra}


OPEN_CLIP_H = {"cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight": (3072, 1024)}
SDXL_BASE = {
    "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
    "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight": (3840, 1280),
    U + "label_emb.0.0.weight": (1280, 2816),
}
SDXL_REFINER = {
    "conditioner.embedders.0.model.transformer.resblocks.0.attn.in_proj_weight": (3840, 1280),
    U + "label_emb.0.0.weight": (1536, 2560),
}


@pytest.mark.parametrize(
    ("shapes", "family"),
    [
        (_sd(768, **{CLIP_L: (49408, 768)}), ModelFamily.SD1),
        (_sd(768, in_channels=9, **{CLIP_L: (49408, 768)}), ModelFamily.SD1_INPAINT),
        # older files: no text_model. level
        (_sd(768, **{"cond_stage_model.transformer.embeddings.token_embedding.weight": (49408, 768)}), ModelFamily.SD1),
        (_sd(768), ModelFamily.SD1),  # UNet-only file: by the context width
        (_sd(1024, **OPEN_CLIP_H), ModelFamily.SD2),
        (_sd(1024), ModelFamily.SD2),
        (_sd(1024, in_channels=9, **OPEN_CLIP_H), ModelFamily.SD2_INPAINT),
        (_sd(2048, **SDXL_BASE), ModelFamily.SDXL),
        (_sd(2048, in_channels=9, **SDXL_BASE), ModelFamily.SDXL_INPAINT),
        (_sd(2048, in_channels=8, **SDXL_BASE), ModelFamily.UNKNOWN),
        (_sd(1280, in_channels=9, **SDXL_REFINER), ModelFamily.UNKNOWN),  # no 9-channel refiner exists
        (_sd(1280, **SDXL_REFINER), ModelFamily.SDXL_REFINER),
        (_sd(2048, **{U + "label_emb.0.0.weight": (1280, 2816)}), ModelFamily.SDXL),
        (_sd(1280, **{U + "label_emb.0.0.weight": (1536, 2560)}), ModelFamily.SDXL_REFINER),
        (_sd(768, in_channels=8, **{CLIP_L: (49408, 768)}), ModelFamily.UNKNOWN),  # instruct-pix2pix
        (_sd(768, **{CLIP_L: (49408, 1024)}), ModelFamily.UNKNOWN),  # text width != context width
        (_sd(512), ModelFamily.UNKNOWN),
    ],
)
def test_detect_family_table(shapes, family):
    assert detect_family(shapes) is family


def test_tiny_model_is_sd1_and_its_9_channel_variant_is_inpainting(tiny_shapes):
    assert tiny_shapes[CONV_IN] == (32, 4, 3, 3)
    assert detect_family(tiny_shapes) is ModelFamily.SD1
    patched = dict(tiny_shapes)
    patched[CONV_IN] = (32, 9, 3, 3)
    assert detect_family(patched) is ModelFamily.SD1_INPAINT


def test_not_stable_diffusion_raises_one_line():
    with pytest.raises(ModelLoadError) as info:
        detect_family({"encoder.layer.0.weight": (8, 8), "lm_head.weight": (100, 8)}, source="bert.safetensors")
    assert str(info.value) == (
        "bert.safetensors does not look like a Stable Diffusion checkpoint (no model.diffusion_model.* tensors)"
    )


def test_labels():
    assert ModelFamily.SD1.label == "SD 1.x"
    assert ModelFamily.SD1_INPAINT.label == "SD 1.x inpainting (9-channel)"
    assert ModelFamily.SD2.label == "SD 2.x"
    assert ModelFamily.SD2_INPAINT.label == "SD 2.x inpainting (9-channel)"
    assert ModelFamily.SDXL.label == "SDXL"
    assert ModelFamily.SDXL_INPAINT.label == "SDXL inpainting (9-channel)"
    assert ModelFamily.SDXL_REFINER.label == "SDXL refiner"
    assert ModelFamily("sd1") is ModelFamily.SD1 and ModelFamily.SD1 == "sd1"


def test_require_supported_messages():
    require_supported(ModelFamily.SD1, "a.safetensors")  # no error
    require_supported(ModelFamily.SD1_INPAINT, "a.safetensors")  # no error
    require_supported(ModelFamily.SD2, "a.safetensors")  # no error
    require_supported(ModelFamily.SD2_INPAINT, "a.safetensors")  # no error
    require_supported(ModelFamily.SDXL, "a.safetensors")  # no error
    require_supported(ModelFamily.SDXL_INPAINT, "a.safetensors")  # no error
    tail = "leansd supports SD 1.x, SD 2.x and SDXL base checkpoints (incl. 9-channel inpainting) for now"
    expected = {
        ModelFamily.SDXL_REFINER: "m.ckpt: recognised an SDXL refiner checkpoint, which cannot be used as the base "
                                  "model; load an SDXL base and give this file as the refiner (--refiner, HTTP "
                                  "refiner_checkpoint)",
    }
    for family, message in expected.items():
        with pytest.raises(UnsupportedModelError) as info:
            require_supported(family, "m.ckpt")
        assert str(info.value) == message
    with pytest.raises(UnsupportedModelError, match=r"^m\.ckpt: could not recognise the model family") as info:
        require_supported(ModelFamily.UNKNOWN, "m.ckpt")
    assert str(info.value).endswith(tail)
    require_supported(ModelFamily.SDXL_REFINER, "r.safetensors", refiner=True)  # no error
    for family in (ModelFamily.SDXL, ModelFamily.SD1, ModelFamily.UNKNOWN):
        with pytest.raises(UnsupportedModelError, match=r"^b\.ckpt: recognised an .* checkpoint, not an SDXL refiner"):
            require_supported(family, "b.ckpt", refiner=True)


def _folder(tmp_path, unet: dict, *, text: dict | None = None, index: dict | None = None):
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps(unet))
    if text is not None:
        (tmp_path / "text_encoder").mkdir()
        (tmp_path / "text_encoder" / "config.json").write_text(json.dumps(text))
    if index is not None:
        (tmp_path / "model_index.json").write_text(json.dumps(index))
    return tmp_path


SD_INDEX = {"_class_name": "StableDiffusionPipeline", "text_encoder": ["transformers", "CLIPTextModel"]}
XL_INDEX = {
    "_class_name": "StableDiffusionXLPipeline",
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
}
REFINER_INDEX = {
    "_class_name": "StableDiffusionXLImg2ImgPipeline",
    "text_encoder": [None, None],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
}


@pytest.mark.parametrize(
    ("unet", "text", "index", "family"),
    [
        ({"in_channels": 4, "cross_attention_dim": 768}, {"hidden_size": 768}, SD_INDEX, ModelFamily.SD1),
        ({"in_channels": 9, "cross_attention_dim": 768}, {"hidden_size": 768}, SD_INDEX, ModelFamily.SD1_INPAINT),
        ({"in_channels": 4, "cross_attention_dim": 32}, {"hidden_size": 32}, SD_INDEX, ModelFamily.SD1),  # tiny
        ({"in_channels": 4, "cross_attention_dim": 1024}, {"hidden_size": 1024}, SD_INDEX, ModelFamily.SD2),
        ({"in_channels": 9, "cross_attention_dim": 1024}, None, None, ModelFamily.SD2_INPAINT),
        (
            {"in_channels": 4, "cross_attention_dim": 2048, "addition_embed_type": "text_time"},
            {"hidden_size": 768},
            XL_INDEX,
            ModelFamily.SDXL,
        ),
        (
            {"in_channels": 9, "cross_attention_dim": 2048, "addition_embed_type": "text_time"},
            {"hidden_size": 768},
            XL_INDEX,
            ModelFamily.SDXL_INPAINT,
        ),
        (
            {"in_channels": 4, "cross_attention_dim": 1280, "addition_embed_type": "text_time"},
            None,
            REFINER_INDEX,
            ModelFamily.SDXL_REFINER,
        ),
        ({"in_channels": 4, "cross_attention_dim": 512}, {"hidden_size": 768}, SD_INDEX, ModelFamily.UNKNOWN),
    ],
)
def test_detect_family_diffusers_table(tmp_path, unet, text, index, family):
    assert detect_family_diffusers(_folder(tmp_path, unet, text=text, index=index)) is family


def test_detect_family_diffusers_without_unet_config(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps(SD_INDEX))
    with pytest.raises(ModelLoadError, match=r"missing unet/config\.json$"):
        detect_family_diffusers(tmp_path)


@pytest.mark.parametrize(
    ("shapes", "named"),
    [
        ({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": (4608, 1536),
          "model.diffusion_model.x_embedder.proj.weight": (1536, 16, 2, 2)}, "a Stable Diffusion 3 checkpoint"),
        ({"joint_blocks.0.context_block.attn.qkv.weight": (4608, 1536)}, "a Stable Diffusion 3 checkpoint"),
        ({"double_blocks.0.img_attn.qkv.weight": (9216, 3072), "single_blocks.0.linear1.weight": (21504, 3072),
          "img_in.weight": (3072, 64)}, "a Flux checkpoint"),
        ({"model.diffusion_model.double_blocks.0.img_attn.qkv.weight": (9216, 3072),
          "model.diffusion_model.single_blocks.0.linear1.weight": (21504, 3072)}, "a Flux checkpoint"),
        ({"lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_k.lora_down.weight": (8, 640),
          "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": (3072, 8),
          "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": (5120, 8)}, "an SDXL LoRA (a patch for a checkpoint"),
        ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 320),
          "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": ()}, "a LoRA (a patch"),
        ({"encoder.conv_in.weight": (128, 3, 3, 3), "decoder.conv_out.weight": (3, 128, 3, 3),
          "quant_conv.weight": (8, 8, 1, 1)}, "a VAE alone"),
        ({"first_stage_model.encoder.conv_in.weight": (128, 3, 3, 3),
          "first_stage_model.decoder.conv_out.weight": (3, 128, 3, 3)}, "a VAE alone"),
        ({"text_model.encoder.layers.0.self_attn.q_proj.weight": (768, 768)}, "a text encoder alone"),
    ],
)
def test_other_model_kinds_are_refused_by_name(shapes, named):
    with pytest.raises(UnsupportedModelError) as info:
        detect_family(shapes, source="m.safetensors")
    message = str(info.value)
    assert message.startswith(f"m.safetensors: this is {named}")
    assert message.endswith("; leansd runs SD 1.x, SD 2.x and SDXL base checkpoints") and "\n" not in message


def test_real_layouts_are_not_taken_for_other_kinds(tiny_shapes):
    from leansd.models.family import recognise_other

    assert recognise_other(tiny_shapes) is None
    assert recognise_other(_sd(2048, **SDXL_BASE)) is None
    assert recognise_other(_sd(1024, **OPEN_CLIP_H)) is None
