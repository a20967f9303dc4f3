"""The loaded model: what every pipeline receives, whatever the source format was."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizerFast  # type: ignore[attr-defined]  # a runtime alias of CLIPTokenizer in transformers 5

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
