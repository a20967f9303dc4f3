"""Which Stable Diffusion family a checkpoint belongs to, told from its tensor names and shapes.

Two layouts are read: the original CompVis/Stability single-file layout (``model.diffusion_model.*``,
``first_stage_model.*``, ``cond_stage_model.*`` or SDXL's ``conditioner.embedders.*``) and diffusers
folders (``unet/config.json`` and friends). SD 1.x, SD 2.x and SDXL base (each with its 9-channel
inpainting variant) are supported for generation in this version; the others are recognised so the user gets a
clear message instead of a shape error.
"""

from __future__ import annotations

import enum
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from leansd.errors import ModelLoadError, UnsupportedModelError

UNET_PREFIX = "model.diffusion_model."
LDM_VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
OPEN_CLIP_PREFIX = "cond_stage_model.model."
SDXL_CONDITIONER_PREFIX = "conditioner.embedders."

# Width of the conditioning (cross-attention context) in each family's UNet.
_CONTEXT_WIDTH_FAMILY = {1024: "SD2", 2048: "SDXL", 1280: "SDXL_REFINER"}


class ModelFamily(str, enum.Enum):
    SD1 = "sd1"
    SD1_INPAINT = "sd1-inpaint"
    SD2 = "sd2"
    SD2_INPAINT = "sd2-inpaint"
    SDXL = "sdxl"
    SDXL_INPAINT = "sdxl-inpaint"
    SDXL_REFINER = "sdxl-refiner"
    UNKNOWN = "unknown"

    @property
    def label(self) -> str:
        """Human name for messages and metadata, e.g. "SD 1.x inpainting (9-channel)"."""
        return _LABELS[self]

    @property
    def latent_preview(self) -> "LatentPreview":
        """How this family's latents are previewed: the cheap linear RGB map and the matching TAESD."""
        return _LATENT_PREVIEWS.get(self, SD_LATENT_PREVIEW)


_LABELS = {
    ModelFamily.SD1: "SD 1.x",
    ModelFamily.SD1_INPAINT: "SD 1.x inpainting (9-channel)",
    ModelFamily.SD2: "SD 2.x",
    ModelFamily.SD2_INPAINT: "SD 2.x inpainting (9-channel)",
    ModelFamily.SDXL: "SDXL",
    ModelFamily.SDXL_INPAINT: "SDXL inpainting (9-channel)",
    ModelFamily.SDXL_REFINER: "SDXL refiner",
    ModelFamily.UNKNOWN: "unrecognised Stable Diffusion variant",
}



@dataclass(frozen=True)
class LatentPreview:
    """Preview data of a latent space (one per VAE family).

    `rgb_factors` (C x 3) and `rgb_bias` (3) map the scaled latents (as the UNet sees them) linearly
    to RGB in [-1, 1]: AUTOMATIC1111's "Approx cheap" preview. `taesd_repo` is the hub id of the
    tiny autoencoder (TAESD) trained on this latent space.
    """

    rgb_factors: tuple[tuple[float, float, float], ...]
    rgb_bias: tuple[float, float, float]
    taesd_repo: str


# AUTOMATIC1111's "Approx cheap" coefficients (modules/sd_vae_approx.py, cheap_approximation(),
# from https://discuss.huggingface.co/t/decoding-latents-to-rgb-without-upscaling/23204/2): rows are
# the 4 latent channels, columns R, G, B. SD 2.x shares SD 1.x's VAE, so its latent space too.
SD_LATENT_PREVIEW = LatentPreview(
    rgb_factors=(
        (0.298, 0.207, 0.208),
        (0.187, 0.286, 0.173),
        (-0.158, 0.189, 0.264),
        (-0.184, -0.271, -0.473),
    ),
    rgb_bias=(0.0, 0.0, 0.0),
    taesd_repo="madebyollin/taesd",
)
# The SDXL VAE's latent space: AUTOMATIC1111's SDXL coefficients (same function, `is_sdxl` branch).
SDXL_LATENT_PREVIEW = LatentPreview(
    rgb_factors=(
        (0.3448, 0.4168, 0.4395),
        (-0.1953, -0.0290, 0.0250),
        (0.1074, 0.0886, -0.0163),
        (-0.3730, -0.2499, -0.2088),
    ),
    rgb_bias=(0.0, 0.0, 0.0),
    taesd_repo="madebyollin/taesdxl",
)
_LATENT_PREVIEWS = {
    ModelFamily.SDXL: SDXL_LATENT_PREVIEW,
    ModelFamily.SDXL_INPAINT: SDXL_LATENT_PREVIEW,
    ModelFamily.SDXL_REFINER: SDXL_LATENT_PREVIEW,
}

# Input channels of the UNet: 4 latent channels, or 4 + 4 (masked image) + 1 (mask) for inpainting.
_LATENT_CHANNELS = 4
_INPAINT_CHANNELS = 9


def _with_inpaint(base: ModelFamily, in_channels: int | None) -> ModelFamily:
    if in_channels is None or in_channels == _LATENT_CHANNELS:
        return base
    if in_channels == _INPAINT_CHANNELS:
        return {
            ModelFamily.SD1: ModelFamily.SD1_INPAINT,
            ModelFamily.SD2: ModelFamily.SD2_INPAINT,
            ModelFamily.SDXL: ModelFamily.SDXL_INPAINT,
        }.get(base, ModelFamily.UNKNOWN)  # no 9-channel refiner exists
    return ModelFamily.UNKNOWN  # e.g. instruct-pix2pix (8 channels)


def _context_width(shapes: Mapping[str, tuple[int, ...]]) -> int | None:
    """in_features of the UNet's cross-attention key projection (the text-conditioning width)."""
    for key, shape in shapes.items():
        if key.startswith(UNET_PREFIX) and key.endswith("attn2.to_k.weight") and len(shape) == 2:
            return int(shape[1])
    return None


def _clip_width(shapes: Mapping[str, tuple[int, ...]]) -> int | None:
    """Hidden width of an OpenAI-CLIP text encoder under ``cond_stage_model.transformer.``."""
    for key in (
        CLIP_PREFIX + "text_model.embeddings.token_embedding.weight",
        CLIP_PREFIX + "embeddings.token_embedding.weight",
    ):
        if key in shapes and len(shapes[key]) == 2:
            return int(shapes[key][1])
    return None


_RUNS = "leansd runs SD 1.x, SD 2.x and SDXL base checkpoints"


def recognise_other(shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """What a file that is not a UNet-based SD checkpoint is, for the refusal message; None if unknown.

    Recognised: Stable Diffusion 3 (MMDiT ``joint_blocks``), Flux (``double_blocks`` /
    ``single_blocks``), LoRA / LyCORIS files (``lora_up``/``lora_down``/``lora_A``/``lora_B``, named
    SDXL when they patch a second text encoder ``lora_te2_`` or the UNet's ``label_emb``), a VAE alone
    (``encoder.*``/``decoder.*`` with ``quant_conv``), a text encoder alone.
    """
    keys = list(shapes)

    def has(pattern: str) -> bool:
        regex = re.compile(pattern)
        return any(regex.search(k) for k in keys)

    if has(r"(^|\.)joint_blocks\.\d+\.") or has(r"^text_encoders\.t5xxl\."):
        return "a Stable Diffusion 3 checkpoint (MMDiT transformer, not a UNet)"
    if has(r"(^|\.)double_blocks\.\d+\.") and has(r"(^|\.)single_blocks\.\d+\."):
        return "a Flux checkpoint (a rectified-flow transformer, not a UNet)"
    if has(r"(lora_up|lora_down|lora_A|lora_B|lora\.up|lora\.down|hada_w1|lokr_w1)"):
        sdxl = has(r"^lora_te2_") or has(r"label_emb") or has(r"^lora_unet_(input|output)_blocks_\d+_1_transformer_blocks_[1-9]")
        return f"{'an SDXL' if sdxl else 'a'} LoRA (a patch for a checkpoint, not a checkpoint)"
    if any(k.startswith(UNET_PREFIX) for k in keys):
        return None
    vae_keys = ("encoder.conv_in.weight", "decoder.conv_out.weight")
    for prefix in ("", LDM_VAE_PREFIX, "vae."):
        if all(prefix + k in shapes for k in vae_keys):
            return "a VAE alone (the image decoder of a model, not a checkpoint)"
    if has(r"^(text_model\.)?encoder\.layers\.\d+\.self_attn\.") or has(r"^transformer\.resblocks\.\d+\."):
        return "a text encoder alone, not a Stable Diffusion checkpoint"
    return None


def detect_family(shapes: Mapping[str, tuple[int, ...]], *, source: str = "checkpoint") -> ModelFamily:
    """Family of an original-layout (single-file) state dict, given ``{key: shape}``.

    Rules, first match wins:
    - no ``model.diffusion_model.*`` tensor: not Stable Diffusion -> ``ModelLoadError``;
    - ``conditioner.embedders.*`` or ``model.diffusion_model.label_emb.*``: SDXL; a refiner has
      only the OpenCLIP-bigG embedder (no ``conditioner.embedders.*.transformer.*``) or a
      1280-wide context;
    - ``cond_stage_model.model.*`` (OpenCLIP-H) or a 1024-wide cross-attention context: SD 2.x;
    - ``cond_stage_model.transformer.*`` (OpenAI CLIP) whose width equals the UNet's
      cross-attention context (768 for real checkpoints, 32 for the tiny test model): SD 1.x;
    - a UNet input conv with 9 channels turns SD 1.x/2.x/SDXL into their inpainting variants.
    Anything else with a UNet is ``UNKNOWN``.
    """
    other = recognise_other(shapes)
    if other is not None:
        raise UnsupportedModelError(f"{source}: this is {other}; {_RUNS}")
    if not any(key.startswith(UNET_PREFIX) for key in shapes):
        raise ModelLoadError(
            f"{source} does not look like a Stable Diffusion checkpoint (no {UNET_PREFIX}* tensors)"
        )
    conv_in = shapes.get(UNET_PREFIX + "input_blocks.0.0.weight")
    in_channels = int(conv_in[1]) if conv_in is not None and len(conv_in) == 4 else None
    context = _context_width(shapes)

    conditioner_keys = [k for k in shapes if k.startswith(SDXL_CONDITIONER_PREFIX)]
    if conditioner_keys or any(k.startswith(UNET_PREFIX + "label_emb.") for k in shapes):
        if conditioner_keys:
            # OpenAI CLIP-L sits at embedders.N.transformer.*, OpenCLIP-bigG at embedders.N.model.*
            has_clip_l = any(re.match(r"conditioner\.embedders\.\d+\.transformer\.", k) for k in conditioner_keys)
            refiner = not has_clip_l
        else:
            refiner = context == 1280
        return _with_inpaint(ModelFamily.SDXL_REFINER if refiner else ModelFamily.SDXL, in_channels)

    if any(k.startswith(OPEN_CLIP_PREFIX) for k in shapes) or context == 1024:
        return _with_inpaint(ModelFamily.SD2, in_channels)

    clip_width = _clip_width(shapes)
    if clip_width is not None:
        if context is None or context == clip_width:
            return _with_inpaint(ModelFamily.SD1, in_channels)
        return ModelFamily.UNKNOWN
    # No text encoder in the file: fall back on the context width alone.
    if context == 768:
        return _with_inpaint(ModelFamily.SD1, in_channels)
    name = _CONTEXT_WIDTH_FAMILY.get(context or -1)
    if name is not None:
        return _with_inpaint(ModelFamily[name], in_channels)
    return ModelFamily.UNKNOWN


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path}: cannot read JSON ({type(e).__name__}: {e})") from e
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object")
    return data


def detect_family_diffusers(folder: str | os.PathLike[str]) -> ModelFamily:
    """Family of a diffusers model folder, from ``unet/config.json`` (+ ``model_index.json``,
    ``text_encoder/config.json``).

    SDXL: ``addition_embed_type == "text_time"`` or a ``text_encoder_2`` component (refiner: no
    ``text_encoder``, or a 1280-wide context); SD 2.x: 1024-wide context; SD 1.x: a 768-wide
    context; a context as wide as the text encoder (the tiny test models): SD 2.x when the encoder
    is OpenCLIP (exact GELU), else SD 1.x; 9 input channels
    mean inpainting. Raises ``ModelLoadError`` if ``unet/config.json`` is missing.
    """
    root = Path(folder)
    unet = _read_json(root / "unet" / "config.json")
    if unet is None:
        raise ModelLoadError(f"{root}: not a complete diffusers model folder: missing unet/config.json")
    index = _read_json(root / "model_index.json") or {}
    text = _read_json(root / "text_encoder" / "config.json") or {}

    in_channels = unet.get("in_channels")
    context = unet.get("cross_attention_dim")
    if isinstance(context, (list, tuple)):
        context = context[0] if context else None

    def component(name: str) -> bool:
        entry = index.get(name)
        return isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[0] is not None

    if unet.get("addition_embed_type") == "text_time" or component("text_encoder_2"):
        refiner = context == 1280 or (component("text_encoder_2") and not component("text_encoder"))
        return _with_inpaint(ModelFamily.SDXL_REFINER if refiner else ModelFamily.SDXL, in_channels)
    if context == 1024:
        return _with_inpaint(ModelFamily.SD2, in_channels)
    if context == 768:
        return _with_inpaint(ModelFamily.SD1, in_channels)
    if context is not None and context == text.get("hidden_size"):
        # OpenCLIP (SD 2.x) uses exact GELU in its MLPs, OpenAI CLIP (SD 1.x) quick GELU.
        open_clip = text.get("hidden_act") == "gelu"
        return _with_inpaint(ModelFamily.SD2 if open_clip else ModelFamily.SD1, in_channels)
    return ModelFamily.UNKNOWN


def require_supported(family: ModelFamily, source: str, *, refiner: bool = False) -> None:
    """Raise ``UnsupportedModelError`` (one line naming the family) unless leansd can run it as a base
    model (``refiner=True``: as an SDXL refiner)."""
    from leansd.models.families import FAMILIES  # the descriptions say which families run

    spec = FAMILIES.get(family)
    if refiner:
        if spec is not None and spec.refiner:
            return
        what = "an unrecognised" if family is ModelFamily.UNKNOWN else f"an {family.label}"
        raise UnsupportedModelError(
            f"{source}: recognised {what} checkpoint, not an SDXL refiner; a refiner is Stability's SDXL refiner "
            "single file (only the OpenCLIP-bigG text encoder) or its diffusers folder (only text_encoder_2)"
        )
    if spec is not None and spec.supported:
        return
    if spec is not None and spec.refiner:
        raise UnsupportedModelError(
            f"{source}: recognised an SDXL refiner checkpoint, which cannot be used as the base model; "
            "load an SDXL base and give this file as the refiner (--refiner, HTTP refiner_checkpoint)"
        )
    supported = "leansd supports SD 1.x, SD 2.x and SDXL base checkpoints (incl. 9-channel inpainting) for now"
    if family is ModelFamily.UNKNOWN:
        raise UnsupportedModelError(
            f"{source}: could not recognise the model family (not SD 1.x, SD 2.x or SDXL); {supported}"
        )
    raise UnsupportedModelError(f"{source}: recognised an {family.label} checkpoint; {supported}")
