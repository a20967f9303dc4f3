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

from leansd.models.configs import LDM_CLIP_PREFIX, LDM_UNET_PREFIX, LDM_VAE_PREFIX, SD1_SCHEDULER_CONFIG

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


def ldm_to_diffusers(
    sd: Mapping[str, "torch.Tensor"],
    *,
    unet_config: Mapping[str, Any],
    vae_config: Mapping[str, Any],
) -> tuple[dict[str, "torch.Tensor"], dict[str, "torch.Tensor"], dict[str, "torch.Tensor"]]:
    """Split an original SD 1.x state dict into (unet, vae, text encoder) state dicts.

    Tensors are renamed, not copied (the VAE's 1x1-conv attention weights become views), so
    the result shares memory with ``sd``. Tensors outside the three models (schedule buffers,
    ``model_ema.*``) are ignored.
    """
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    # Only the live weights go in: EMA copies (model_ema.*) are ignored, as the original
    # v1-inference.yaml does (use_ema: False), and diffusers' EMA warning does not fire.
    unet = convert_ldm_unet_checkpoint(
        {k: v for k, v in sd.items() if k.startswith(LDM_UNET_PREFIX)}, dict(unet_config)
    )
    vae = convert_ldm_vae_checkpoint({k: v for k, v in sd.items() if k.startswith(LDM_VAE_PREFIX)}, dict(vae_config))
    return unet, vae, strip_text_prefix(sd)


def _unet_key(key: str, layers_per_block: int, up_attention: set[int]) -> str:
    """One ``UNet2DConditionModel`` key -> its original ``UNetModel`` key (without prefix)."""
    per_level = layers_per_block + 1
    fixed = {
        "time_embedding.linear_1.": "time_embed.0.",
        "time_embedding.linear_2.": "time_embed.2.",
        "conv_in.": "input_blocks.0.0.",
        "conv_norm_out.": "out.0.",
        "conv_out.": "out.2.",
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
    text_encoder: "CLIPTextModel",
    *,
    text_model_level: bool = True,
) -> dict[str, "torch.Tensor"]:
    """One state dict in the original CompVis SD 1.x single-file layout.

    ``model.diffusion_model.*`` (UNet), ``first_stage_model.*`` (VAE, attention as 1x1 convs),
    ``cond_stage_model.transformer.[text_model.]*`` (CLIP; ``text_model_level=False`` writes the
    older files' layout), ``...embeddings.position_ids`` (int64) and the schedule buffers
    (``betas``, ``alphas_cumprod``, ...). Tensors are the modules' own (or views of them): clone
    before modifying. Works on meta-device modules too (only names and shapes).
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
    text_names = text_key_map(list(text_sd), text_model_level=text_model_level)
    out: dict[str, torch.Tensor] = {unet_names[k]: v for k, v in unet_sd.items()}
    out.update({vae_names[k]: as_conv(k, v) for k, v in vae_sd.items()})
    out.update({text_names[k]: v for k, v in text_sd.items()})
    prefix = LDM_CLIP_PREFIX + (TEXT_MODEL_LEVEL if text_model_level else "")
    positions = int(text_encoder.config.max_position_embeddings)
    out[prefix + POSITION_IDS] = torch.arange(positions, dtype=torch.int64)[None]  # (1, 77)
    out.update(ldm_schedule_buffers())
    return out
