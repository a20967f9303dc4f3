"""A family is data: one description per Stable Diffusion family, read by the loader, prompts, engine and planner.

Each :class:`FamilySpec` says what a family's checkpoints hold and how they are run: the text
encoders (where they live in an original single file, which hidden layer conditions the UNet, the
tokenizer's pad token), whether a pooled text embedding and added conditioning go to the UNet, the
VAE's scaling factor, the native image size, the default prediction type, the UNet's attention-head
rule, the latent preview (RGB factors and TAESD), and the components with their full-size parameter counts (what
the planner shows before a model is loaded). Shared code reads these fields instead of testing
``family == ...``.

Hidden layers (``TextEncoderSpec.layer``): -1 is the last layer, -2 the penultimate one, counted on
the encoder as the original single file stores it. ``final_norm`` says whether the encoder's final
layer norm is applied to that layer's output (SD 2.x: yes, as the original ``FrozenOpenCLIPEmbedder``;
SDXL: no). diffusers folders of SD 2.x store the text encoder already cut after its penultimate
layer (diffusers' converter drops the last block), so there the last hidden state is the same
tensor: ``folder_layer`` records that convention.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING

from leansd.models.family import ModelFamily

if TYPE_CHECKING:
    from leansd.models.family import LatentPreview


class Component(str, enum.Enum):
    """The model parts the engine places on a device, one per memory stage."""

    TEXT = "text"
    UNET = "unet"
    VAE = "vae"

    def __str__(self) -> str:
        return self.value


COMPONENTS: tuple[Component, ...] = (Component.TEXT, Component.UNET, Component.VAE)
"""In stage order: the text encoder(s) run first, then the UNet, then the VAE."""

OPENAI_CLIP = "openai-clip"
"""Text encoder layout of the original file: OpenAI CLIP (``transformer.text_model.*``)."""
OPEN_CLIP = "open-clip"
"""OpenCLIP (``model.transformer.resblocks.*`` with fused ``in_proj`` attention weights)."""

EOS_PAD = "<|endoftext|>"
BANG_PAD = "!"
"""OpenCLIP's tokenizer pads with id 0, the token ``!``."""

LAST = -1
PENULTIMATE = -2

@dataclass(frozen=True)
class TextEncoderSpec:
    """One text encoder of a family."""

    subfolder: str
    """Its diffusers subfolder: ``text_encoder`` or ``text_encoder_2``."""
    original_prefix: str
    """Where its tensors live in an original single file."""
    layout: str
    """OPENAI_CLIP or OPEN_CLIP."""
    layer: int
    """Hidden layer that conditions the UNet, counted on the full encoder of the original file."""
    folder_layer: int
    """The same layer counted on the encoder a diffusers folder stores."""
    final_norm: bool
    """Apply the final layer norm to that layer's output."""
    pad_token: str
    hidden_size: int
    """Width of the full-size encoder."""
    activation: str
    """MLP activation: ``quick_gelu`` (OpenAI CLIP) or ``gelu`` (OpenCLIP)."""
    parameters: int
    """Parameters of the full-size encoder as loaded (the planner's size before a model is loaded)."""


@dataclass(frozen=True)
class FamilySpec:
    """What one family's checkpoints are and how they run (see the module docstring)."""

    family: ModelFamily
    supported: bool
    text_encoders: tuple[TextEncoderSpec, ...]
    pooled_output: bool
    """The UNet receives a pooled text embedding (SDXL)."""
    added_conditioning: str | None
    """Extra UNet inputs besides the text: None, ``text_time`` (SDXL base: size and crop ids with the
    pooled text embedding) or ``text_time_aesthetic`` (SDXL refiner: original size, crop and an
    aesthetic score)."""
    context_width: int
    """Width of the UNet's cross-attention context (all text encoders' hidden states together)."""
    vae_scaling_factor: float
    native_size: int
    """Training resolution in pixels (the default width and height)."""
    native_size_v: int | None
    """Training resolution of the family's v-prediction models, when it differs (SD 2.x 768-v)."""
    prediction_type: str
    """Default prediction type when nothing says otherwise: ``epsilon`` or ``v_prediction``."""
    unet_head_width: int | None
    """Channels per UNet attention head (heads = channels // width per level); None: ``unet_heads``."""
    unet_heads: int | None
    """A fixed number of UNet attention heads at every level (SD 1.x: 8)."""
    unet_parameters: int
    vae_parameters: int
    inpainting: bool = False
    zero_empty_negative: bool = False
    """An empty negative prompt conditions with zeros (hidden states and pooled embedding) instead of
    the encoded empty text: SDXL, as AUTOMATIC1111 (``force_zero_negative_prompt``) and diffusers'
    ``force_zeros_for_empty_prompt``."""
    components: tuple[Component, ...] = COMPONENTS
    refiner: bool = False
    """An SDXL refiner: it runs the last steps of an SDXL base's schedule (ensemble of experts), never alone."""

    @property
    def label(self) -> str:
        return self.family.label

    @property
    def latent_preview(self) -> "LatentPreview":
        """Latent -> RGB preview factors and the matching TAESD (see ``ModelFamily.latent_preview``)."""
        return self.family.latent_preview

    @property
    def time_ids(self) -> int:
        """How many ids the added conditioning sends beside the pooled embedding (0 without one)."""
        return {"text_time": 6, "text_time_aesthetic": 5}.get(self.added_conditioning or "", 0)

    @property
    def text_hidden(self) -> int:
        """Width of the text conditioning (what the planner's text-activation estimate uses)."""
        return sum(t.hidden_size for t in self.text_encoders)

    @property
    def text_parameters(self) -> int:
        return sum(t.parameters for t in self.text_encoders)

    def native_size_for(self, prediction_type: str) -> int:
        """Native size of a model of this family with this prediction type (768 for SD 2.x 768-v)."""
        if prediction_type == "v_prediction" and self.native_size_v is not None:
            return self.native_size_v
        return self.native_size

    def unet_attention_heads(self, block_out_channels: tuple[int, ...]) -> int | tuple[int, ...]:
        """diffusers' ``attention_head_dim`` (which it reads as a number of heads) for these widths."""
        if self.unet_head_width is None:
            assert self.unet_heads is not None
            return self.unet_heads
        return tuple(max(1, c // self.unet_head_width) for c in block_out_channels)


CLIP_L = TextEncoderSpec(
    subfolder="text_encoder",
    original_prefix="cond_stage_model.transformer.",
    layout=OPENAI_CLIP,
    layer=LAST,
    folder_layer=LAST,
    final_norm=True,
    pad_token=EOS_PAD,
    hidden_size=768,
    activation="quick_gelu",
    parameters=123_060_480,
)
OPEN_CLIP_H = TextEncoderSpec(
    subfolder="text_encoder",
    original_prefix="cond_stage_model.model.",
    layout=OPEN_CLIP,
    layer=PENULTIMATE,
    folder_layer=LAST,
    final_norm=True,
    pad_token=BANG_PAD,
    hidden_size=1024,
    activation="gelu",
    parameters=354_032_640,  # 24 blocks and the text projection, as the original file holds them
)
SDXL_CLIP_L = TextEncoderSpec(
    subfolder="text_encoder",
    original_prefix="conditioner.embedders.0.transformer.",
    layout=OPENAI_CLIP,
    layer=PENULTIMATE,
    folder_layer=PENULTIMATE,
    final_norm=False,
    pad_token=EOS_PAD,
    hidden_size=768,
    activation="quick_gelu",
    parameters=123_060_480,
)
OPEN_CLIP_BIG_G = TextEncoderSpec(
    subfolder="text_encoder_2",
    original_prefix="conditioner.embedders.1.model.",
    layout=OPEN_CLIP,
    layer=PENULTIMATE,
    folder_layer=PENULTIMATE,
    final_norm=False,
    pad_token=BANG_PAD,
    hidden_size=1280,
    activation="gelu",
    parameters=694_659_840,
)
REFINER_BIG_G = TextEncoderSpec(**{**OPEN_CLIP_BIG_G.__dict__, "original_prefix": "conditioner.embedders.0.model."})

_SD1 = FamilySpec(
    family=ModelFamily.SD1,
    supported=True,
    text_encoders=(CLIP_L,),
    pooled_output=False,
    added_conditioning=None,
    context_width=768,
    vae_scaling_factor=0.18215,
    native_size=512,
    native_size_v=None,
    prediction_type="epsilon",
    unet_head_width=None,
    unet_heads=8,
    unet_parameters=859_520_964,
    vae_parameters=83_653_863,
)
_SD2 = FamilySpec(
    family=ModelFamily.SD2,
    supported=True,
    text_encoders=(OPEN_CLIP_H,),
    pooled_output=False,
    added_conditioning=None,
    context_width=1024,
    vae_scaling_factor=0.18215,
    native_size=512,
    native_size_v=768,
    prediction_type="epsilon",
    unet_head_width=64,
    unet_heads=None,
    unet_parameters=865_910_724,
    vae_parameters=83_653_863,
)
_SDXL = FamilySpec(
    family=ModelFamily.SDXL,
    supported=True,
    text_encoders=(SDXL_CLIP_L, OPEN_CLIP_BIG_G),
    pooled_output=True,
    added_conditioning="text_time",
    context_width=2048,
    vae_scaling_factor=0.13025,
    native_size=1024,
    native_size_v=None,
    prediction_type="epsilon",
    unet_head_width=64,
    unet_heads=None,
    unet_parameters=2_567_463_684,
    vae_parameters=83_653_863,
    zero_empty_negative=True,
)
_SDXL_REFINER = FamilySpec(
    **{
        **_SDXL.__dict__,
        "family": ModelFamily.SDXL_REFINER,
        "supported": False,  # not as a base model: it runs the last steps after an SDXL base
        "refiner": True,
        "added_conditioning": "text_time_aesthetic",
        "text_encoders": (REFINER_BIG_G,),
        "context_width": 1280,
        "unet_parameters": 2_259_526_660,
    }
)


def _inpainting(spec: FamilySpec, family: ModelFamily) -> FamilySpec:
    """The 9-channel inpainting variant: 5 more input channels on the UNet's first conv."""
    extra = 5 * 320 * 3 * 3  # (320, 4 -> 9, 3, 3)
    return FamilySpec(**{**spec.__dict__, "family": family, "inpainting": True,
                         "unet_parameters": spec.unet_parameters + extra})


FAMILIES: dict[ModelFamily, FamilySpec] = {
    ModelFamily.SD1: _SD1,
    ModelFamily.SD1_INPAINT: _inpainting(_SD1, ModelFamily.SD1_INPAINT),
    ModelFamily.SD2: _SD2,
    ModelFamily.SD2_INPAINT: _inpainting(_SD2, ModelFamily.SD2_INPAINT),
    ModelFamily.SDXL: _SDXL,
    ModelFamily.SDXL_INPAINT: _inpainting(_SDXL, ModelFamily.SDXL_INPAINT),
    ModelFamily.SDXL_REFINER: _SDXL_REFINER,
}


def describe(family: ModelFamily) -> FamilySpec:
    """The description of ``family``; raises KeyError for ``ModelFamily.UNKNOWN``."""
    return FAMILIES[family]
