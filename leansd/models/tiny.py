"""Tiny random-weight SD 1.x-shaped models for tests and `--model tiny`.

THESE MODELS ARE RANDOM: they exercise every code path of a real SD 1.x model in a fraction of a
second, and the pictures they make are noise.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from leansd.models.configs import SD1_VAE_SCALING_FACTOR

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

TINY_NAME = "tiny"
TINY_DEFAULT_SIZE = 64
TINY_WARNING = "tiny is a random-weight test model: its images are noise"

TINY_UNET_CONFIG = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=32,
)
# Four levels like SD's VAE, so images are 8x the latent size as in real checkpoints.
TINY_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    block_out_channels=(32, 32, 32, 32),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    latent_channels=4,
    layers_per_block=1,
    norm_num_groups=32,
    sample_size=64,
    scaling_factor=SD1_VAE_SCALING_FACTOR,
)
TINY_TEXT_CONFIG: dict[str, Any] = dict(
    vocab_size=49408,
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,
    projection_dim=32,
)


@dataclass
class TinyComponents:
    unet: "UNet2DConditionModel"
    vae: "AutoencoderKL"
    text_encoder: "CLIPTextModel"


def build_tiny_components(*, seed: int = 0, inpainting: bool = False) -> TinyComponents:
    """Build the three tiny models with deterministic random weights (same seed, same tensors).

    `inpainting=True` gives the UNet 9 input channels (latents, mask, masked-image latents), the
    layout of sd-v1-5-inpainting.
    """
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    # Construction draws from the global RNG; fork it so the caller's random state is untouched
    # (every tensor is overwritten from a private generator below anyway).
    with torch.random.fork_rng(devices=[]):
        unet = UNet2DConditionModel(**{**TINY_UNET_CONFIG, "in_channels": 9 if inpainting else 4})
        vae = AutoencoderKL(**TINY_VAE_CONFIG)
        text_encoder = CLIPTextModel(CLIPTextConfig(**TINY_TEXT_CONFIG))
    # Default inits leave some layers at exactly zero (conv_out etc.); give every tensor
    # non-trivial values so the pipelines show real differences between settings.
    generator = torch.Generator().manual_seed(seed * 1000 + 4)
    with torch.no_grad():
        for module in (unet, vae, text_encoder):
            for name, param in module.named_parameters():
                if name.endswith("weight") and param.ndim >= 2:
                    fan_in = param[0].numel()
                    param.copy_(torch.randn(param.shape, generator=generator) / fan_in**0.5)
                elif "norm" in name and name.endswith("weight"):
                    param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=generator))
                else:
                    param.copy_(0.02 * torch.randn(param.shape, generator=generator))
    for module in (unet, vae, text_encoder):
        module.eval()
    return TinyComponents(unet=unet, vae=vae, text_encoder=text_encoder)


def write_tiny_single_file(
    path: str | os.PathLike[str], *, seed: int = 0, text_model_level: bool = True
) -> Path:
    """Write the tiny RANDOM model (it makes noise) as an original-layout SD 1.x single file.

    The format follows the extension: ``.safetensors`` (safetensors) or ``.ckpt`` (a pickle of
    ``{"state_dict": ...}`` holding tensors only, readable with ``weights_only=True``).
    ``text_model_level=False`` writes the older layout without the ``text_model.`` level. Same
    seed, same bytes; about 12 MB (the 49,408 x 32 token embedding is half of it).
    """
    import torch

    from leansd.models.convert import diffusers_to_ldm

    target = Path(path)
    suffix = target.suffix.lower()
    if suffix not in (".safetensors", ".ckpt"):
        raise ValueError(f"{target}: expected a .safetensors or .ckpt file name")
    tiny = build_tiny_components(seed=seed)
    # Own contiguous copies: safetensors refuses views, and a file should not alias the modules.
    sd = {
        k: v.detach().contiguous().clone()
        for k, v in diffusers_to_ldm(
            tiny.unet, tiny.vae, tiny.text_encoder, text_model_level=text_model_level
        ).items()
    }
    target.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(target))
    else:
        torch.save({"state_dict": sd}, str(target))
    return target


def write_pipeline_files(root: Path) -> None:
    """The model-independent parts of an SD 1.x diffusers folder: tokenizer/, scheduler/, model_index.json."""
    import diffusers
    from diffusers import PNDMScheduler

    from leansd.models.configs import SD1_SCHEDULER_CONFIG
    from leansd.models.tokenizer import bundled_tokenizer, save_tokenizer

    save_tokenizer(bundled_tokenizer(), root / "tokenizer")
    PNDMScheduler.from_config(SD1_SCHEDULER_CONFIG).save_pretrained(root / "scheduler")
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (root / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_tiny_diffusers_folder(path: str | os.PathLike[str], *, seed: int = 0) -> Path:
    """Write the tiny RANDOM model (it makes noise) as a diffusers ``StableDiffusionPipeline`` folder.

    ``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/`` (safetensors), ``tokenizer/``
    (the bundled CLIP tokenizer) and ``scheduler/`` (``PNDMScheduler`` with the SD 1.x schedule).
    Same seed, same files; about 16 MB (the tokenizer alone is 3.6 MB).
    """
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    tiny = build_tiny_components(seed=seed)
    tiny.unet.save_pretrained(root / "unet", safe_serialization=True)
    tiny.vae.save_pretrained(root / "vae", safe_serialization=True)
    tiny.text_encoder.save_pretrained(root / "text_encoder", safe_serialization=True)
    write_pipeline_files(root)
    return root
