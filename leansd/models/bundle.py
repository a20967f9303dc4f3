"""The loaded model: what every pipeline receives, whatever the source format was."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizerFast  # type: ignore[attr-defined]  # a runtime alias of CLIPTokenizer in transformers 5

    from leansd.models.families import FamilySpec
    from leansd.models.family import ModelFamily


@dataclass
class ModelBundle:
    """Components of one Stable Diffusion model, on the CPU in the file's dtype (the engine places and casts them)."""

    unet: "UNet2DConditionModel"
    vae: "AutoencoderKL"
    text_encoder: "CLIPTextModel"
    tokenizer: "CLIPTokenizerFast"
    family: "ModelFamily"
    name: str
    """Short name for metadata: file stem, hub id, or "tiny"."""
    source: str
    """Where it came from: a path or a hub id."""
    hash: str | None = None
    """First 10 hex digits of the checkpoint file's sha256 (A1111's "Model hash"), if a single file."""
    scheduler_config: dict[str, Any] = field(default_factory=dict)
    """Training noise schedule (betas, timesteps); samplers are built from it."""
    default_size: int = 512
    """Native resolution in pixels (used when the request gives no width/height)."""
    is_random: bool = False
    """True for the tiny random-weight test model: its images are noise."""
    text_encoder_2: Any = None
    """SDXL's second text encoder (OpenCLIP-bigG, a CLIPTextModelWithProjection); None for SD 1.x/2.x."""
    tokenizer_2: Any = None
    """The tokenizer of ``text_encoder_2`` (the same BPE, padding with ``!``)."""
    text_layer: int = -1
    """Hidden layer of ``text_encoder`` that conditions the UNet (-1 last, -2 penultimate), counted on
    the encoder as loaded: an SD 2.x single file holds the whole OpenCLIP encoder (-2), its diffusers
    folder the encoder already cut after the penultimate block (-1)."""

    @property
    def description(self) -> "FamilySpec":
        """The family's description (text encoders, VAE scaling, native size, part sizes)."""
        from leansd.models.families import describe

        return describe(self.family)

    @property
    def prediction_type(self) -> str:
        """What the UNet predicts: ``epsilon`` or ``v_prediction`` (from the noise-schedule config)."""
        return str(self.scheduler_config.get("prediction_type", "epsilon"))

    @property
    def text_encoders(self) -> list[Any]:
        """Every text encoder, in the order their hidden states are concatenated."""
        return [e for e in (self.text_encoder, self.text_encoder_2) if e is not None]

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def is_inpainting(self) -> bool:
        """A 9-channel inpainting UNet (latents + mask + masked-image latents)."""
        return int(self.unet.config.in_channels) == 2 * self.latent_channels + 1
