"""Architecture and noise-schedule configurations of the Stable Diffusion families."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from leansd.errors import ModelLoadError

if TYPE_CHECKING:
    from leansd.models.families import FamilySpec

# SD 1.x training schedule (CompVis v1-inference.yaml: linear_start 0.00085, linear_end 0.012,
# 1000 timesteps, "scaled_linear" = linspace in sqrt space). steps_offset=1 and
# set_alpha_to_one=False reproduce the CompVis DDIM/PLMS timestep placement (1, 21, ..., 981 for
# 50 steps, final alpha_prev = alphas_cumprod[0]).
SD1_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "set_alpha_to_one": False,
    "clip_sample": False,
    "skip_prk_steps": True,
}

SD1_VAE_SCALING_FACTOR = 0.18215

# The published SD 1.5 (runwayml/stable-diffusion-v1-5) component configs: constructor kwargs of
# UNet2DConditionModel, AutoencoderKL and CLIPTextConfig. Settings left out take the libraries'
# defaults, which equal the published ones. Used to build full-size models (tests, benchmarks).
SD15_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}
SD15_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": SD1_VAE_SCALING_FACTOR,
}
SD15_TEXT_CONFIG: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}

# The published SD 2.x (stabilityai/stable-diffusion-2-1) architecture: the SD 1.5 UNet with a
# 1024-wide context, 64-wide heads and linear transformer projections; the whole OpenCLIP-H text
# encoder as the original single file holds it (24 blocks, exact GELU, text projection); SD's VAE.
SD2_UNET_CONFIG: dict[str, Any] = {
    **SD15_UNET_CONFIG,
    "cross_attention_dim": 1024,
    "attention_head_dim": (5, 10, 20, 20),
    "use_linear_projection": True,
}
SD2_VAE_CONFIG: dict[str, Any] = SD15_VAE_CONFIG
SD2_TEXT_CONFIG: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 1024,
    "pad_token_id": 0,
}

# The published SDXL base 1.0 and refiner architectures (stabilityai/stable-diffusion-xl-*-1.0),
# for the planner's sizes and the full-size benchmarks.
SDXL_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "transformer_layers_per_block": (1, 2, 10),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "cross_attention_dim": 2048,
    "attention_head_dim": (5, 10, 20),
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "norm_num_groups": 32,
}
SDXL_REFINER_UNET_CONFIG: dict[str, Any] = {
    **SDXL_UNET_CONFIG,
    "block_out_channels": (384, 768, 1536, 1536),
    "transformer_layers_per_block": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "cross_attention_dim": 1280,
    "attention_head_dim": (6, 12, 24, 24),
    "projection_class_embeddings_input_dim": 2560,
}
SDXL_VAE_CONFIG: dict[str, Any] = {**SD15_VAE_CONFIG, "sample_size": 1024, "scaling_factor": 0.13025}
SDXL_TEXT_CONFIG: dict[str, Any] = {**SD15_TEXT_CONFIG}
SDXL_TEXT_2_CONFIG: dict[str, Any] = {
    **SD2_TEXT_CONFIG,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "projection_dim": 1280,
}


def full_size_configs(family: Any) -> tuple[dict[str, Any], dict[str, Any], tuple[tuple[str, dict[str, Any]], ...]]:
    """(UNet kwargs, VAE kwargs, ((text encoder class name, CLIPTextConfig kwargs), ...)) of a family's
    published architecture (inpainting variants: 9 input channels)."""
    from leansd.models.family import ModelFamily

    base = {
        ModelFamily.SD1: ModelFamily.SD1, ModelFamily.SD1_INPAINT: ModelFamily.SD1,
        ModelFamily.SD2: ModelFamily.SD2, ModelFamily.SD2_INPAINT: ModelFamily.SD2,
        ModelFamily.SDXL: ModelFamily.SDXL, ModelFamily.SDXL_INPAINT: ModelFamily.SDXL,
        ModelFamily.SDXL_REFINER: ModelFamily.SDXL_REFINER,
    }.get(family)
    if base is None:
        raise ValueError(f"no published architecture for {family}")
    table = {
        ModelFamily.SD1: (SD15_UNET_CONFIG, SD15_VAE_CONFIG, (("CLIPTextModel", SD15_TEXT_CONFIG),)),
        ModelFamily.SD2: (SD2_UNET_CONFIG, SD2_VAE_CONFIG, (("CLIPTextModelWithProjection", SD2_TEXT_CONFIG),)),
        ModelFamily.SDXL: (SDXL_UNET_CONFIG, SDXL_VAE_CONFIG, (("CLIPTextModel", SDXL_TEXT_CONFIG),
                                                                ("CLIPTextModelWithProjection", SDXL_TEXT_2_CONFIG))),
        ModelFamily.SDXL_REFINER: (SDXL_REFINER_UNET_CONFIG, SDXL_VAE_CONFIG,
                                   (("CLIPTextModelWithProjection", SDXL_TEXT_2_CONFIG),)),
    }
    unet, vae, texts = table[base]
    if family in (ModelFamily.SD1_INPAINT, ModelFamily.SD2_INPAINT, ModelFamily.SDXL_INPAINT):
        unet = {**unet, "in_channels": 9}
    return dict(unet), dict(vae), texts


# ---------------------------------------------------------------------------------------------
# Architecture configs inferred from an original-layout (single-file) state dict's shapes.
#
# The weights fix every width, depth and channel count. Two things are NOT in the weights:
# - attention heads. SD 1.x's UNet uses 8 heads everywhere (diffusers' legacy name for this is
#   `attention_head_dim=8`); CLIP text encoders use 64-wide heads (12 at width 768, 16 at 1024,
#   20 at 1280); widths below 64 (the tiny test model, width 32) get 4 heads.
# - the training resolution. Full-size SD 1.x was trained at 512 px (UNet sample_size 64, VAE
#   512); narrower models than the real ones (the tiny test model) get 64 px so they stay fast.
# ---------------------------------------------------------------------------------------------

SD1_UNET_ATTENTION_HEADS = 8
CLIP_HEAD_WIDTH = 64
NARROW_TEXT_HEADS = 4
NORM_NUM_GROUPS = 32
SD1_SAMPLE_SIZE = 64  # latent pixels: 512 px images
NARROW_SAMPLE_SIZE = 8  # latent pixels: 64 px images
SD1_UNET_MODEL_CHANNELS = 320
SD1_VAE_BASE_CHANNELS = 128
CLIP_BOS_ID, CLIP_EOS_ID = 49406, 49407

LDM_UNET_PREFIX = "model.diffusion_model."
LDM_VAE_PREFIX = "first_stage_model."
LDM_CLIP_PREFIX = "cond_stage_model.transformer."
LDM_OPEN_CLIP_PREFIX = "cond_stage_model.model."


def _sub(shapes: Mapping[str, tuple[int, ...]], prefix: str) -> dict[str, tuple[int, ...]]:
    return {k[len(prefix) :]: tuple(v) for k, v in shapes.items() if k.startswith(prefix)}


def _indices(keys: Iterable[str], pattern: str) -> list[int]:
    """Sorted distinct integers captured by ``pattern`` (a regex with one group) in ``keys``."""
    regex = re.compile(pattern)
    return sorted({int(m.group(1)) for k in keys if (m := regex.match(k))})


def _need(shapes: Mapping[str, tuple[int, ...]], key: str, what: str) -> tuple[int, ...]:
    if key not in shapes:
        raise ModelLoadError(f"cannot infer the {what} architecture: tensor {key} is missing")
    return shapes[key]


def text_heads(width: int) -> int:
    """Attention heads of a CLIP text encoder of this width (64-wide heads; 4 below width 64)."""
    return width // CLIP_HEAD_WIDTH if width >= CLIP_HEAD_WIDTH else NARROW_TEXT_HEADS


def infer_unet_config(
    shapes: Mapping[str, tuple[int, ...]], *, spec: "FamilySpec | None" = None, pooled_width: int | None = None
) -> dict[str, Any]:
    """``UNet2DConditionModel`` kwargs for the ``model.diffusion_model.*`` tensors in ``shapes``.

    ``shapes`` maps full original-layout keys to tensor shapes. Levels and their widths come
    from the input blocks (block ``(layers_per_block + 1) * level + j + 1``), attention levels from
    ``*.1.proj_in`` tensors, the context width from ``attn2.to_k``. The attention heads follow the
    family's description ``spec`` (SD 1.x: 8 at every level; SD 2.x: 64-wide heads); without one,
    SD 1.x's. With ``label_emb`` (SDXL) and ``pooled_width`` (the pooled text embedding's width),
    the added ``text_time`` conditioning is configured. Raises ``ModelLoadError`` if a tensor the
    inference needs is missing.
    """
    unet = _sub(shapes, LDM_UNET_PREFIX)
    conv_in = _need(unet, "input_blocks.0.0.weight", "UNet")
    conv_out = _need(unet, "out.2.weight", "UNet")
    model_channels, in_channels = int(conv_in[0]), int(conv_in[1])

    num_input_blocks = len(_indices(unet, r"input_blocks\.(\d+)\."))
    downsamplers = _indices(unet, r"input_blocks\.(\d+)\.0\.op\.weight")
    levels = len(downsamplers) + 1
    resnet_blocks = num_input_blocks - 1 - len(downsamplers)
    if resnet_blocks <= 0 or resnet_blocks % levels:
        raise ModelLoadError(
            f"cannot infer the UNet architecture: {num_input_blocks} input blocks do not split "
            f"into {levels} levels"
        )
    layers_per_block = resnet_blocks // levels

    block_out_channels: list[int] = []
    down_attention: list[bool] = []
    transformer_depths: list[int] = []
    for level in range(levels):
        index = (layers_per_block + 1) * level + 1
        conv = _need(unet, f"input_blocks.{index}.0.in_layers.2.weight", "UNet")
        block_out_channels.append(int(conv[0]))
        has_attention = f"input_blocks.{index}.1.proj_in.weight" in unet
        down_attention.append(has_attention)
        if has_attention:
            depth = len(_indices(unet, rf"input_blocks\.{index}\.1\.transformer_blocks\.(\d+)\."))
            transformer_depths.append(depth)
        else:
            transformer_depths.append(1)  # diffusers wants one entry per level; unused without attention

    up_attention = []
    for level in range(levels):
        index = (layers_per_block + 1) * level
        up_attention.append(f"output_blocks.{index}.1.proj_in.weight" in unet)

    context = None
    proj_in_ndim = 4
    for key, shape in unet.items():
        if key.endswith("attn2.to_k.weight"):
            context = int(shape[1])
        if key.endswith(".proj_in.weight"):
            proj_in_ndim = len(shape)
    if context is None:
        raise ModelLoadError("cannot infer the UNet architecture: no cross-attention (attn2.to_k) tensors")
    depths = {d for d, a in zip(transformer_depths, down_attention, strict=True) if a} or {1}

    added: dict[str, Any] = {}
    label = unet.get("label_emb.0.0.weight")
    if label is not None and pooled_width is not None:
        # SDXL's added conditioning: [pooled text embedding; 6 Fourier-embedded size/crop ids]
        # (the refiner: 5, the aesthetic score in place of the target size).
        ids = spec.time_ids if spec is not None and spec.time_ids else 6
        added = {
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": (int(label[1]) - pooled_width) // ids,
            "projection_class_embeddings_input_dim": int(label[1]),
        }
    return {
        **added,
        "sample_size": SD1_SAMPLE_SIZE if model_channels >= SD1_UNET_MODEL_CHANNELS else NARROW_SAMPLE_SIZE,
        "in_channels": in_channels,
        "out_channels": int(conv_out[0]),
        "down_block_types": tuple(
            "CrossAttnDownBlock2D" if a else "DownBlock2D" for a in down_attention
        ),
        "up_block_types": tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in up_attention),
        "block_out_channels": tuple(block_out_channels),
        "layers_per_block": layers_per_block,
        "cross_attention_dim": context,
        "attention_head_dim": (
            SD1_UNET_ATTENTION_HEADS if spec is None else spec.unet_attention_heads(tuple(block_out_channels))
        ),
        "use_linear_projection": proj_in_ndim == 2,
        "transformer_layers_per_block": depths.pop() if len(depths) == 1 else tuple(transformer_depths),
        "norm_num_groups": NORM_NUM_GROUPS,
    }


def infer_vae_config(
    shapes: Mapping[str, tuple[int, ...]], *, scaling_factor: float = SD1_VAE_SCALING_FACTOR
) -> dict[str, Any]:
    """``AutoencoderKL`` kwargs for the ``first_stage_model.*`` tensors in ``shapes`` (the scaling
    factor is the family's: it is not in the weights)."""
    vae = _sub(shapes, LDM_VAE_PREFIX)
    conv_in = _need(vae, "encoder.conv_in.weight", "VAE")
    conv_out = _need(vae, "decoder.conv_out.weight", "VAE")
    decoder_in = _need(vae, "decoder.conv_in.weight", "VAE")
    levels = _indices(vae, r"encoder\.down\.(\d+)\.")
    if not levels:
        raise ModelLoadError("cannot infer the VAE architecture: no encoder.down.* tensors")
    block_out_channels = tuple(
        int(_need(vae, f"encoder.down.{i}.block.0.conv2.weight", "VAE")[0]) for i in levels
    )
    layers_per_block = len(_indices(vae, r"encoder\.down\.0\.block\.(\d+)\."))
    base = block_out_channels[0]
    return {
        "in_channels": int(conv_in[1]),
        "out_channels": int(conv_out[0]),
        "down_block_types": ("DownEncoderBlock2D",) * len(levels),
        "up_block_types": ("UpDecoderBlock2D",) * len(levels),
        "block_out_channels": block_out_channels,
        "layers_per_block": layers_per_block,
        "latent_channels": int(decoder_in[1]),
        "norm_num_groups": NORM_NUM_GROUPS,
        "sample_size": 8 * (SD1_SAMPLE_SIZE if base >= SD1_VAE_BASE_CHANNELS else NARROW_SAMPLE_SIZE),
        "scaling_factor": scaling_factor,
        "use_quant_conv": "quant_conv.weight" in vae,
        "use_post_quant_conv": "post_quant_conv.weight" in vae,
    }


def infer_text_config(shapes: Mapping[str, tuple[int, ...]], *, prefix: str = LDM_CLIP_PREFIX) -> dict[str, Any]:
    """``CLIPTextConfig`` kwargs for the ``cond_stage_model.transformer.[text_model.]*`` tensors
    (another ``prefix`` for SDXL's ``conditioner.embedders.0.transformer.``)."""
    text = _sub(shapes, prefix)
    if any(k.startswith("text_model.") for k in text):
        text = _sub(text, "text_model.")
    vocab_size, width = _need(text, "embeddings.token_embedding.weight", "text encoder")
    positions = _need(text, "embeddings.position_embedding.weight", "text encoder")[0]
    layers = _indices(text, r"encoder\.layers\.(\d+)\.")
    if not layers:
        raise ModelLoadError("cannot infer the text encoder architecture: no encoder.layers.* tensors")
    intermediate = _need(text, "encoder.layers.0.mlp.fc1.weight", "text encoder")[0]
    return {
        "vocab_size": int(vocab_size),
        "hidden_size": int(width),
        "intermediate_size": int(intermediate),
        "num_hidden_layers": len(layers),
        "num_attention_heads": text_heads(int(width)),
        "max_position_embeddings": int(positions),
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "bos_token_id": CLIP_BOS_ID,
        "eos_token_id": CLIP_EOS_ID,
        "pad_token_id": CLIP_EOS_ID,
        "projection_dim": int(width),
    }


def infer_open_clip_config(
    shapes: Mapping[str, tuple[int, ...]], *, prefix: str = LDM_OPEN_CLIP_PREFIX, activation: str = "gelu"
) -> dict[str, Any]:
    """``CLIPTextConfig`` kwargs for an OpenCLIP text encoder under ``prefix`` (SD 2.x: ``cond_stage_model.model.``).

    Width and vocabulary from ``token_embedding``, positions from ``positional_embedding``, depth
    from ``transformer.resblocks.*``, MLP width from ``c_fc``, projection width from
    ``text_projection`` (W, P). OpenCLIP's MLP uses exact GELU (OpenAI CLIP's quick GELU is not).
    """
    text = _sub(shapes, prefix)
    vocab_size, width = _need(text, "token_embedding.weight", "text encoder")
    positions = _need(text, "positional_embedding", "text encoder")[0]
    layers = _indices(text, r"transformer\.resblocks\.(\d+)\.")
    if not layers:
        raise ModelLoadError("cannot infer the text encoder architecture: no transformer.resblocks.* tensors")
    intermediate = _need(text, "transformer.resblocks.0.mlp.c_fc.weight", "text encoder")[0]
    projection = text.get("text_projection", (width, width))
    return {
        "vocab_size": int(vocab_size),
        "hidden_size": int(width),
        "intermediate_size": int(intermediate),
        "num_hidden_layers": len(layers),
        "num_attention_heads": text_heads(int(width)),
        "max_position_embeddings": int(positions),
        "hidden_act": activation,
        "layer_norm_eps": 1e-5,
        "bos_token_id": CLIP_BOS_ID,
        "eos_token_id": CLIP_EOS_ID,
        "pad_token_id": 0,
        "projection_dim": int(projection[1]),
    }
