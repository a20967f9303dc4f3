"""Tiny random-weight SD 1.x-, SD 2.x- and SDXL-shaped models for tests and `--model tiny` (SD 1.x).

THESE MODELS ARE RANDOM: they exercise every code path of a real SD 1.x / SD 2.x / SDXL base model
in a fraction of a second, and the pictures they make are noise.

The SD 2.x ones have what sets SD 2.x apart: an OpenCLIP-layout text encoder (fused attention
projections, exact GELU, a text projection, padding with ``!``) conditioning on its penultimate
layer, linear projections in the UNet's transformers with 64-wide heads, and v-prediction in
their diffusers folders' scheduler config.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from leansd.models.configs import SD1_VAE_SCALING_FACTOR
from leansd.models.families import OPEN_CLIP, describe
from leansd.models.family import ModelFamily

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


# SD 2.x: 64-wide UNet heads (at least one per level), linear transformer projections; an OpenCLIP
# text encoder with one more block than it conditions on (the penultimate layer).
TINY_SD2_UNET_CONFIG = dict(
    TINY_UNET_CONFIG,
    attention_head_dim=describe(ModelFamily.SD2).unet_attention_heads((32, 64)),  # TINY_UNET_CONFIG's widths
    use_linear_projection=True,
)
TINY_SD2_TEXT_CONFIG = dict(TINY_TEXT_CONFIG, num_hidden_layers=3, hidden_act="gelu", pad_token_id=0)
# SDXL base: no attention at the first level, two transformer blocks at the second; two text
# encoders (CLIP-L-shaped and OpenCLIP-bigG-shaped, each 32 wide) whose penultimate hidden states are
# concatenated (64) and whose second one's projected pooled output (32) joins six size/crop ids
# (8-wide Fourier features each) as the UNet's added conditioning.
TINY_SDXL_UNET_CONFIG = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2),
    cross_attention_dim=64,
    attention_head_dim=describe(ModelFamily.SDXL).unet_attention_heads((32, 64)),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=8 * 6 + 32,
    norm_num_groups=32,
)
TINY_SDXL_VAE_CONFIG = dict(TINY_VAE_CONFIG, scaling_factor=describe(ModelFamily.SDXL).vae_scaling_factor)
TINY_SDXL_TEXT_2_CONFIG = dict(TINY_SD2_TEXT_CONFIG)
# SDXL refiner: the bigG-shaped encoder alone (32 wide, so a 32-wide context), its pooled output
# beside five ids (original size, crop, aesthetic score).
TINY_SDXL_REFINER_UNET_CONFIG = dict(
    TINY_SDXL_UNET_CONFIG,
    cross_attention_dim=32,
    projection_class_embeddings_input_dim=8 * 5 + 32,
)
TINY_FAMILIES = (ModelFamily.SD1, ModelFamily.SD2, ModelFamily.SDXL, ModelFamily.SDXL_REFINER)


@dataclass
class TinyComponents:
    unet: "UNet2DConditionModel"
    vae: "AutoencoderKL"
    text_encoder: "CLIPTextModel | Any"
    text_encoder_2: "Any" = None
    """SDXL's second (OpenCLIP-bigG-shaped) text encoder, a CLIPTextModelWithProjection."""


def build_tiny_components(
    *, seed: int = 0, inpainting: bool = False, family: ModelFamily = ModelFamily.SD1
) -> TinyComponents:
    """Build the three tiny models with deterministic random weights (same seed, same tensors).

    `inpainting=True` gives the UNet 9 input channels (latents, mask, masked-image latents), the
    layout of sd-v1-5-inpainting. `family=ModelFamily.SD2` builds the SD 2.x-shaped models (the
    text encoder a ``CLIPTextModelWithProjection`` holding the whole OpenCLIP encoder).
    """
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if family not in TINY_FAMILIES:
        raise ValueError(f"no tiny {family.label} model; tiny families: {', '.join(f.value for f in TINY_FAMILIES)}")
    refiner = family is ModelFamily.SDXL_REFINER
    sd2, sdxl = family is ModelFamily.SD2, family in (ModelFamily.SDXL, ModelFamily.SDXL_REFINER)
    unet_config = TINY_SD2_UNET_CONFIG if sd2 else TINY_SDXL_UNET_CONFIG if sdxl else TINY_UNET_CONFIG
    if refiner:
        unet_config = TINY_SDXL_REFINER_UNET_CONFIG
    text_encoder: Any
    text_encoder_2 = None
    # Construction draws from the global RNG; fork it so the caller's random state is untouched
    # (every tensor is overwritten from a private generator below anyway).
    with torch.random.fork_rng(devices=[]):
        unet = UNet2DConditionModel(**{**unet_config, "in_channels": 9 if inpainting else 4})
        vae = AutoencoderKL(**(TINY_SDXL_VAE_CONFIG if sdxl else TINY_VAE_CONFIG))
        if refiner:  # the refiner's only encoder, in the second place as diffusers names it
            text_encoder = None
        elif sd2:
            text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(**TINY_SD2_TEXT_CONFIG))
        else:
            text_encoder = CLIPTextModel(CLIPTextConfig(**TINY_TEXT_CONFIG))
        if sdxl:
            text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**TINY_SDXL_TEXT_2_CONFIG))
    # Default inits leave some layers at exactly zero (conv_out etc.); give every tensor
    # non-trivial values so the pipelines show real differences between settings.
    generator = torch.Generator().manual_seed(seed * 1000 + (5 if sd2 else 7 if refiner else 6 if sdxl else 4))
    modules = [m for m in (unet, vae, text_encoder, text_encoder_2) if m is not None]
    with torch.no_grad():
        for module in modules:
            for name, param in module.named_parameters():
                if name.endswith("weight") and param.ndim >= 2:
                    fan_in = param[0].numel()
                    param.copy_(torch.randn(param.shape, generator=generator) / fan_in**0.5)
                elif "norm" in name and name.endswith("weight"):
                    param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=generator))
                else:
                    param.copy_(0.02 * torch.randn(param.shape, generator=generator))
    for module in modules:
        module.eval()
    return TinyComponents(unet=unet, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2)


def write_tiny_single_file(
    path: str | os.PathLike[str],
    *,
    seed: int = 0,
    text_model_level: bool = True,
    family: ModelFamily = ModelFamily.SD1,
    inpainting: bool = False,
) -> Path:
    """Write the tiny RANDOM model (it makes noise) as an original-layout single file.

    The format follows the extension: ``.safetensors`` (safetensors) or ``.ckpt`` (a pickle of
    ``{"state_dict": ...}`` holding tensors only, readable with ``weights_only=True``).
    ``text_model_level=False`` writes the older SD 1.x layout without the ``text_model.`` level.
    ``family=ModelFamily.SD2`` writes Stability's SD 2.x layout (OpenCLIP under
    ``cond_stage_model.model.*``). Same seed, same bytes; about 12 MB (the 49,408 x 32 token
    embedding is half of it).
    """
    import torch

    from leansd.models.convert import diffusers_to_ldm

    target = Path(path)
    suffix = target.suffix.lower()
    if suffix not in (".safetensors", ".ckpt"):
        raise ValueError(f"{target}: expected a .safetensors or .ckpt file name")
    tiny = build_tiny_components(seed=seed, family=family, inpainting=inpainting)
    layout = describe(family).text_encoders[0].layout
    if family in (ModelFamily.SDXL, ModelFamily.SDXL_REFINER):
        from leansd.models.convert import diffusers_to_sgm

        original = diffusers_to_sgm(tiny.unet, tiny.vae, tiny.text_encoder, tiny.text_encoder_2)
    else:
        original = diffusers_to_ldm(
            tiny.unet, tiny.vae, tiny.text_encoder, text_model_level=text_model_level, text_layout=layout
        )
    # Own contiguous copies: safetensors refuses views, and a file should not alias the modules.
    sd = {k: v.detach().contiguous().clone() for k, v in original.items()}
    target.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(target))
    else:
        torch.save({"state_dict": sd}, str(target))
    return target


def write_pipeline_files(
    root: Path, *, family: ModelFamily = ModelFamily.SD1, prediction_type: str = "epsilon"
) -> None:
    """The model-independent parts of a diffusers folder: tokenizer/, scheduler/, model_index.json."""
    import diffusers
    from diffusers import PNDMScheduler

    from leansd.models.configs import SD1_SCHEDULER_CONFIG
    from leansd.models.tokenizer import bundled_tokenizer, save_tokenizer

    spec = describe(family)
    if spec.refiner:  # one tokenizer, for text_encoder_2
        save_tokenizer(bundled_tokenizer(pad_token=spec.text_encoders[0].pad_token), root / "tokenizer_2")
    else:
        save_tokenizer(bundled_tokenizer(pad_token=spec.text_encoders[0].pad_token), root / "tokenizer")
    if len(spec.text_encoders) > 1:
        save_tokenizer(bundled_tokenizer(pad_token=spec.text_encoders[1].pad_token), root / "tokenizer_2")
    config = dict(SD1_SCHEDULER_CONFIG, prediction_type=prediction_type)
    PNDMScheduler.from_config(config).save_pretrained(root / "scheduler")
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
    if spec.refiner:
        for key in ("feature_extractor", "safety_checker", "requires_safety_checker"):
            index.pop(key)
        index.update({
            "_class_name": "StableDiffusionXLImg2ImgPipeline",
            "force_zeros_for_empty_prompt": False,
            "requires_aesthetics_score": True,
            "text_encoder": [None, None],
            "tokenizer": [None, None],
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer_2": ["transformers", "CLIPTokenizer"],
        })
    elif len(spec.text_encoders) > 1:
        for key in ("feature_extractor", "safety_checker", "requires_safety_checker"):
            index.pop(key)
        index.update({
            "_class_name": "StableDiffusionXLPipeline",
            "force_zeros_for_empty_prompt": True,
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer_2": ["transformers", "CLIPTokenizer"],
        })
    (root / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_tiny_diffusers_folder(
    path: str | os.PathLike[str],
    *,
    seed: int = 0,
    family: ModelFamily = ModelFamily.SD1,
    inpainting: bool = False,
    prediction_type: str | None = None,
) -> Path:
    """Write the tiny RANDOM model (it makes noise) as a diffusers ``StableDiffusionPipeline`` folder.

    ``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/`` (safetensors), ``tokenizer/``
    (the bundled CLIP tokenizer) and ``scheduler/`` (``PNDMScheduler`` with the SD 1.x schedule).
    SD 2.x folders follow diffusers' conventions: the text encoder a ``CLIPTextModel`` cut after
    its penultimate block, the tokenizer padding with ``!``, and (by default) v-prediction.
    Same seed, same files; about 16 MB (the tokenizer alone is 3.6 MB).
    """
    from leansd.models.convert import penultimate_text_encoder

    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    tiny = build_tiny_components(seed=seed, family=family, inpainting=inpainting)
    tiny.unet.save_pretrained(root / "unet", safe_serialization=True)
    tiny.vae.save_pretrained(root / "vae", safe_serialization=True)
    spec = describe(family).text_encoders[0]
    if tiny.text_encoder is not None:
        text_encoder = penultimate_text_encoder(tiny.text_encoder) if spec.layout == OPEN_CLIP else tiny.text_encoder
        text_encoder.save_pretrained(root / "text_encoder", safe_serialization=True)
    if tiny.text_encoder_2 is not None:
        tiny.text_encoder_2.save_pretrained(root / "text_encoder_2", safe_serialization=True)
    if prediction_type is None:
        prediction_type = "v_prediction" if family is ModelFamily.SD2 and not inpainting else "epsilon"
    write_pipeline_files(root, family=family, prediction_type=prediction_type)
    return root
