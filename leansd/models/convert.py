"""Key layouts: original CompVis single-file checkpoints <-> diffusers/transformers modules.

Original -> diffusers uses diffusers' own converters (``diffusers.loaders.single_file_utils``).
diffusers -> original is ours (the wheel has none, and the repository's old script is stale):
it writes what the original SD 1.x files hold, so tests can make realistic single files from the
tiny random models.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from leansd.models.configs import (
    LDM_CLIP_PREFIX,
    LDM_OPEN_CLIP_PREFIX,
    LDM_UNET_PREFIX,
    LDM_VAE_PREFIX,
    SD1_SCHEDULER_CONFIG,
)
from leansd.models.families import OPEN_CLIP, OPENAI_CLIP

if TYPE_CHECKING:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

TEXT_MODEL_LEVEL = "text_model."
POSITION_IDS = "embeddings.position_ids"

# ResnetBlock2D (diffusers) -> ResBlock (ldm.modules.diffusionmodules.openaimodel)
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
# Attention (diffusers, VAE mid block) -> AttnBlock (ldm.modules.diffusionmodules.model)
_VAE_ATTENTION = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}


def strip_text_prefix(sd: Mapping[str, "torch.Tensor"]) -> dict[str, "torch.Tensor"]:
    """CLIP text-encoder tensors of an original checkpoint, keyed as ``CLIPTextModel.state_dict()``.

    Strips ``cond_stage_model.transformer.`` and the optional ``text_model.`` level (older files
    lack it; transformers 5's ``CLIPTextModel`` has none). ``embeddings.position_ids`` is dropped:
    transformers keeps it as a non-persistent buffer built from ``max_position_embeddings``, and
    some fine-tunes ship a corrupted copy.
    """
    out = {}
    for key, value in sd.items():
        if not key.startswith(LDM_CLIP_PREFIX):
            continue
        name = key[len(LDM_CLIP_PREFIX) :]
        if name.startswith(TEXT_MODEL_LEVEL):
            name = name[len(TEXT_MODEL_LEVEL) :]
        if name != POSITION_IDS:
            out[name] = value
    return out


# OpenCLIP text transformer (open_clip.transformer) -> transformers' CLIPTextModelWithProjection.
_OPEN_CLIP_BLOCK = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_OPEN_CLIP_FIXED = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
}
OPEN_CLIP_IGNORED = ("logit_scale", "attn_mask")
"""OpenCLIP tensors that are not text-encoder weights (the contrastive temperature, the causal mask)."""


def open_clip_to_transformers(sd: Mapping[str, "torch.Tensor"], *, prefix: str = LDM_OPEN_CLIP_PREFIX) -> dict[str, "torch.Tensor"]:
    """OpenCLIP text-encoder tensors under ``prefix`` keyed as ``CLIPTextModelWithProjection.state_dict()``.

    The fused attention projection ``in_proj_weight`` (3W, W) is split into q, k, v views (no copy);
    ``text_projection`` (W, P), used as ``x @ P``, becomes the (P, W) weight of a bias-free linear.
    """
    out: dict[str, "torch.Tensor"] = {}
    for key, value in sd.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix) :]
        if name in _OPEN_CLIP_FIXED:
            out[_OPEN_CLIP_FIXED[name]] = value
        elif name == "text_projection":
            out["text_projection.weight"] = value.T.contiguous()
        elif m := re.match(r"transformer\.resblocks\.(\d+)\.(.+)", name):
            layer, rest = f"text_model.encoder.layers.{m[1]}.", m[2]
            if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = rest.rsplit("_", 1)[1]  # weight / bias
                for part, chunk in zip(("q", "k", "v"), value.chunk(3, dim=0), strict=True):
                    out[f"{layer}self_attn.{part}_proj.{kind}"] = chunk  # views of the fused tensor
                continue
            module, _, tail = rest.rpartition(".")
            if module not in _OPEN_CLIP_BLOCK:
                raise KeyError(f"unknown OpenCLIP text tensor {key}")
            out[f"{layer}{_OPEN_CLIP_BLOCK[module]}.{tail}"] = value
        elif name not in OPEN_CLIP_IGNORED:
            raise KeyError(f"unknown OpenCLIP text tensor {key}")
    return out


def transformers_to_open_clip(
    text_sd: Mapping[str, "torch.Tensor"], *, prefix: str = LDM_OPEN_CLIP_PREFIX
) -> dict[str, "torch.Tensor"]:
    """The reverse of :func:`open_clip_to_transformers`: q, k, v fused again (new tensors), the projection transposed."""
    import torch

    fixed = {v: k for k, v in _OPEN_CLIP_FIXED.items()}
    block = {v: k for k, v in _OPEN_CLIP_BLOCK.items()}
    out: dict[str, "torch.Tensor"] = {}
    for key, value in text_sd.items():
        if key in fixed:
            out[prefix + fixed[key]] = value
        elif key == "text_projection.weight":
            out[prefix + "text_projection"] = value.T
        elif m := re.match(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key):
            layer, module, kind = m[1], m[2], m[3]
            if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                if module == "self_attn.q_proj":
                    parts = [text_sd[f"text_model.encoder.layers.{layer}.self_attn.{p}_proj.{kind}"] for p in "qkv"]
                    out[f"{prefix}transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat(parts)  # (3W, ...)
                continue
            out[f"{prefix}transformer.resblocks.{layer}.{block[module]}.{kind}"] = value
        elif not key.endswith(POSITION_IDS):
            raise KeyError(f"no OpenCLIP name for text tensor {key}")
    return out


def ldm_to_diffusers(
    sd: Mapping[str, "torch.Tensor"],
    *,
    unet_config: Mapping[str, Any],
    vae_config: Mapping[str, Any],
    text_layout: str = OPENAI_CLIP,
) -> tuple[dict[str, "torch.Tensor"], dict[str, "torch.Tensor"], dict[str, "torch.Tensor"]]:
    """Split an original SD 1.x/2.x state dict into (unet, vae, text encoder) state dicts.

    Tensors are renamed, not copied (the VAE's 1x1-conv attention weights and OpenCLIP's fused
    attention projections become views), so the result shares memory with ``sd``. Tensors
    outside the three models (schedule buffers, ``model_ema.*``) are ignored. ``text_layout``:
    OPENAI_CLIP (SD 1.x, ``cond_stage_model.transformer.*``) or OPEN_CLIP (SD 2.x,
    ``cond_stage_model.model.*``).
    """
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    # Only the live weights go in: EMA copies (model_ema.*) are ignored, as the original
    # v1-inference.yaml does (use_ema: False), and diffusers' EMA warning does not fire.
    unet = convert_ldm_unet_checkpoint(
        {k: v for k, v in sd.items() if k.startswith(LDM_UNET_PREFIX)}, dict(unet_config)
    )
    vae = convert_ldm_vae_checkpoint({k: v for k, v in sd.items() if k.startswith(LDM_VAE_PREFIX)}, dict(vae_config))
    text = open_clip_to_transformers(sd) if text_layout == OPEN_CLIP else strip_text_prefix(sd)
    return unet, vae, text


def _unet_key(key: str, layers_per_block: int, up_attention: set[int]) -> str:
    """One ``UNet2DConditionModel`` key -> its original ``UNetModel`` key (without prefix)."""
    per_level = layers_per_block + 1
    fixed = {
        "time_embedding.linear_1.": "time_embed.0.",
        "time_embedding.linear_2.": "time_embed.2.",
        "conv_in.": "input_blocks.0.0.",
        "conv_norm_out.": "out.0.",
        "conv_out.": "out.2.",
        "add_embedding.linear_1.": "label_emb.0.0.",  # SDXL's added (text_time) conditioning
        "add_embedding.linear_2.": "label_emb.0.2.",
    }
    for old, new in fixed.items():
        if key.startswith(old):
            return new + key[len(old) :]

    def resnet(rest: str) -> str:
        layer, _, tail = rest.partition(".")
        return f"{_UNET_RESNET[layer]}.{tail}"

    if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        level, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        block = per_level * level + j + 1
        return f"input_blocks.{block}.0.{resnet(rest)}" if kind == "resnets" else f"input_blocks.{block}.1.{rest}"
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{per_level * (int(m[1]) + 1)}.0.op.{m[2]}"
    if m := re.match(r"mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"middle_block.{2 * int(m[1])}.{resnet(m[2])}"
    if m := re.match(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        level, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        block = per_level * level + j
        return f"output_blocks.{block}.0.{resnet(rest)}" if kind == "resnets" else f"output_blocks.{block}.1.{rest}"
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        level = int(m[1])
        # The upsampler follows the last resnet (and its attention, if the level has one).
        slot = 2 if level in up_attention else 1
        return f"output_blocks.{per_level * level + layers_per_block}.{slot}.conv.{m[2]}"
    raise KeyError(f"no original-layout name for UNet tensor {key}")


def _vae_key(key: str, num_levels: int) -> str:
    """One ``AutoencoderKL`` key -> its original ``AutoencoderKL`` (ldm) key (without prefix)."""
    key = key.replace("conv_norm_out.", "norm_out.")

    def resnet(rest: str) -> str:
        return rest.replace("conv_shortcut.", "nin_shortcut.")

    if m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{resnet(m[3])}"
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
    # The decoder's levels run in reverse: diffusers' up_blocks.0 is the original up.{n-1}.
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"decoder.up.{num_levels - 1 - int(m[1])}.block.{m[2]}.{resnet(m[3])}"
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        return f"decoder.up.{num_levels - 1 - int(m[1])}.upsample.conv.{m[2]}"
    if m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{resnet(m[3])}"
    if m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", key):
        return f"{m[1]}.mid.attn_1.{_VAE_ATTENTION[m[2]]}.{m[3]}"
    if re.match(r"(encoder|decoder)\.(conv_in|conv_out|norm_out)\.|(post_)?quant_conv\.", key):
        return key
    raise KeyError(f"no original-layout name for VAE tensor {key}")


def unet_key_map(unet_sd_keys: list[str], *, layers_per_block: int) -> dict[str, str]:
    """``{diffusers key: original key}`` for a UNet2DConditionModel's state dict keys."""
    up_attention = {int(m[1]) for k in unet_sd_keys if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))}
    return {k: LDM_UNET_PREFIX + _unet_key(k, layers_per_block, up_attention) for k in unet_sd_keys}


def vae_key_map(vae_sd_keys: list[str], *, num_levels: int) -> dict[str, str]:
    """``{diffusers key: original key}`` for an AutoencoderKL's state dict keys."""
    return {k: LDM_VAE_PREFIX + _vae_key(k, num_levels) for k in vae_sd_keys}


def text_key_map(text_sd_keys: list[str], *, text_model_level: bool = True) -> dict[str, str]:
    """``{transformers key: original key}`` for a CLIPTextModel's state dict keys."""
    prefix = LDM_CLIP_PREFIX + (TEXT_MODEL_LEVEL if text_model_level else "")
    return {k: prefix + k for k in text_sd_keys}


def ldm_schedule_buffers(config: Mapping[str, Any] = SD1_SCHEDULER_CONFIG) -> dict[str, "torch.Tensor"]:
    """The noise-schedule buffers original LatentDiffusion checkpoints carry (float32).

    Computed in float64 and stored as float32, as ``ldm.models.diffusion.ddpm`` does (DDPM,
    Ho et al. 2020, eqs. 6-7 for the posterior). Loading ignores them.
    """
    import torch

    steps = int(config["num_train_timesteps"])
    start, end = float(config["beta_start"]), float(config["beta_end"])
    if config["beta_schedule"] == "scaled_linear":
        betas = torch.linspace(math.sqrt(start), math.sqrt(end), steps, dtype=torch.float64) ** 2
    elif config["beta_schedule"] == "linear":
        betas = torch.linspace(start, end, steps, dtype=torch.float64)
    else:
        raise ValueError(f"beta_schedule {config['beta_schedule']!r}: expected 'scaled_linear' or 'linear'")
    alphas = 1.0 - betas
    alphas_cumprod = torch.cumprod(alphas, dim=0)
    alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    buffers = {
        "betas": betas,
        "alphas_cumprod": alphas_cumprod,
        "alphas_cumprod_prev": alphas_cumprod_prev,
        "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).sqrt(),
        "log_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).log(),
        "sqrt_recip_alphas_cumprod": (1.0 / alphas_cumprod).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / alphas_cumprod - 1.0).sqrt(),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": posterior_variance.clamp(min=1e-20).log(),
        "posterior_mean_coef1": betas * alphas_cumprod_prev.sqrt() / (1.0 - alphas_cumprod),
        "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * alphas.sqrt() / (1.0 - alphas_cumprod),
    }
    return {name: value.to(torch.float32) for name, value in buffers.items()}


def diffusers_to_ldm(
    unet: "UNet2DConditionModel",
    vae: "AutoencoderKL",
    text_encoder: Any,
    *,
    text_model_level: bool = True,
    text_layout: str = OPENAI_CLIP,
) -> dict[str, "torch.Tensor"]:
    """One state dict in the original CompVis SD 1.x (Stability SD 2.x) single-file layout.

    ``model.diffusion_model.*`` (UNet), ``first_stage_model.*`` (VAE, attention as 1x1 convs),
    ``cond_stage_model.transformer.[text_model.]*`` (CLIP; ``text_model_level=False`` writes the
    older files' layout), ``...embeddings.position_ids`` (int64) and the schedule buffers
    (``betas``, ``alphas_cumprod``, ...). With ``text_layout=OPEN_CLIP`` (SD 2.x; the encoder a
    ``CLIPTextModelWithProjection``) the text encoder goes to ``cond_stage_model.model.*`` in
    OpenCLIP's layout (fused ``in_proj``, ``text_projection``, no position ids). Tensors are the
    modules' own (or views of them): clone before modifying. Works on meta-device modules too
    (only names and shapes).
    """
    import torch

    unet_sd = unet.state_dict()
    vae_sd = vae.state_dict()
    text_sd = text_encoder.state_dict()

    def as_conv(key: str, value: "torch.Tensor") -> "torch.Tensor":
        # The original VAE attention projections are 1x1 convs: (C, C) -> (C, C, 1, 1).
        if ".mid_block.attentions." in key and key.endswith(".weight") and value.ndim == 2:
            return value[:, :, None, None]
        return value

    unet_names = unet_key_map(list(unet_sd), layers_per_block=int(unet.config.layers_per_block))
    vae_names = vae_key_map(list(vae_sd), num_levels=len(vae.config.block_out_channels))
    out: dict[str, torch.Tensor] = {unet_names[k]: v for k, v in unet_sd.items()}
    out.update({vae_names[k]: as_conv(k, v) for k, v in vae_sd.items()})
    if text_layout == OPEN_CLIP:
        out.update(transformers_to_open_clip(text_sd))
    else:
        text_names = text_key_map(list(text_sd), text_model_level=text_model_level)
        out.update({text_names[k]: v for k, v in text_sd.items()})
        prefix = LDM_CLIP_PREFIX + (TEXT_MODEL_LEVEL if text_model_level else "")
        positions = int(text_encoder.config.max_position_embeddings)
        out[prefix + POSITION_IDS] = torch.arange(positions, dtype=torch.int64)[None]  # (1, 77)
    out.update(ldm_schedule_buffers())
    return out


def penultimate_text_encoder(text_encoder: "Any") -> "CLIPTextModel":
    """An SD 2.x text encoder as diffusers stores it: a ``CLIPTextModel`` cut after its penultimate block.

    Its last hidden state (final layer norm applied) equals the penultimate layer of the whole
    OpenCLIP encoder with the final norm, which is what SD 2.x conditions on. The tensors are
    shared with ``text_encoder`` (a CLIPTextModel[WithProjection]); the projection is dropped.
    """
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(**{**text_encoder.config.to_dict(), "num_hidden_layers": text_encoder.config.num_hidden_layers - 1})
    last = f"encoder.layers.{text_encoder.config.num_hidden_layers - 1}."
    weights = {}
    for key, value in text_encoder.state_dict().items():
        name = key[len(TEXT_MODEL_LEVEL) :] if key.startswith(TEXT_MODEL_LEVEL) else key
        if name.startswith(last) or name.startswith("text_projection."):
            continue
        weights[name] = value
    cut = CLIPTextModel(config)
    cut.load_state_dict(weights, strict=False)
    missing = {k for k in cut.state_dict() if k not in weights and not k.endswith(POSITION_IDS)}
    if missing:
        raise KeyError(f"cannot cut the text encoder: no weights for {sorted(missing)[:3]}")
    return cut.eval()


SGM_CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
SGM_BIG_G_PREFIX = "conditioner.embedders.1.model."
SGM_REFINER_BIG_G_PREFIX = "conditioner.embedders.0.model."
"""The SDXL refiner's only text encoder (OpenCLIP-bigG) in its single file."""


def diffusers_to_sgm(
    unet: "UNet2DConditionModel", vae: "AutoencoderKL", text_encoder: "CLIPTextModel | None", text_encoder_2: Any
) -> dict[str, "torch.Tensor"]:
    """One state dict in Stability's SDXL base single-file (sgm) layout (``text_encoder=None``: the
    refiner's, whose only embedder, OpenCLIP-bigG, is ``conditioner.embedders.0.model.*``).

    ``model.diffusion_model.*`` (UNet, ``label_emb`` for the added conditioning),
    ``first_stage_model.*`` (VAE), ``conditioner.embedders.0.transformer.text_model.*`` (CLIP-L, with
    its ``position_ids``) and ``conditioner.embedders.1.model.*`` (OpenCLIP-bigG: fused ``in_proj``,
    ``text_projection``). Tensors are the modules' own or views (the fused projections are new).
    """
    import torch

    unet_sd, vae_sd = unet.state_dict(), vae.state_dict()

    def as_conv(key: str, value: "torch.Tensor") -> "torch.Tensor":
        if ".mid_block.attentions." in key and key.endswith(".weight") and value.ndim == 2:
            return value[:, :, None, None]  # the original VAE attention projections are 1x1 convs
        return value

    unet_names = unet_key_map(list(unet_sd), layers_per_block=int(unet.config.layers_per_block))
    vae_names = vae_key_map(list(vae_sd), num_levels=len(vae.config.block_out_channels))
    out: dict[str, torch.Tensor] = {unet_names[k]: v for k, v in unet_sd.items()}
    out.update({vae_names[k]: as_conv(k, v) for k, v in vae_sd.items()})
    if text_encoder is None:
        out.update(transformers_to_open_clip(text_encoder_2.state_dict(), prefix=SGM_REFINER_BIG_G_PREFIX))
        return out
    prefix = SGM_CLIP_L_PREFIX + TEXT_MODEL_LEVEL
    out.update({prefix + k: v for k, v in text_encoder.state_dict().items()})
    positions = int(text_encoder.config.max_position_embeddings)
    out[prefix + POSITION_IDS] = torch.arange(positions, dtype=torch.int64)[None]  # (1, 77)
    out.update(transformers_to_open_clip(text_encoder_2.state_dict(), prefix=SGM_BIG_G_PREFIX))
    return out


def sgm_to_diffusers(
    sd: Mapping[str, "torch.Tensor"], *, unet_config: Mapping[str, Any], vae_config: Mapping[str, Any],
    big_g_prefix: str = SGM_BIG_G_PREFIX,
) -> tuple[dict[str, "torch.Tensor"], dict[str, "torch.Tensor"], dict[str, "torch.Tensor"], dict[str, "torch.Tensor"]]:
    """Split an SDXL base (sgm layout) state dict into (unet, vae, text encoder, text encoder 2) state dicts.

    Renamed, not copied (views where layouts differ), as :func:`ldm_to_diffusers`. A refiner
    (``big_g_prefix=SGM_REFINER_BIG_G_PREFIX``) has no CLIP-L: its text encoder state dict is empty.
    """
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    unet = convert_ldm_unet_checkpoint(
        {k: v for k, v in sd.items() if k.startswith(LDM_UNET_PREFIX)}, dict(unet_config)
    )
    vae = convert_ldm_vae_checkpoint({k: v for k, v in sd.items() if k.startswith(LDM_VAE_PREFIX)}, dict(vae_config))
    text = {}
    for key, value in sd.items():
        if key.startswith(SGM_CLIP_L_PREFIX):
            name = key[len(SGM_CLIP_L_PREFIX) :]
            name = name[len(TEXT_MODEL_LEVEL) :] if name.startswith(TEXT_MODEL_LEVEL) else name
            if name != POSITION_IDS:
                text[name] = value
    return unet, vae, text, open_clip_to_transformers(sd, prefix=big_g_prefix)
