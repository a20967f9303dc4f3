"""Live previews and the TAESD decoder: what they compute, where they run, what the device pays.

Three preview decoders, cheapest first (AUTOMATIC1111's `show_progress_type`):
- "approx-cheap": the family's fixed linear map from the latent channels to RGB, at latent size
  (1/8 of the image), on the CPU: a (B, 4, h, w) matrix product, no weights;
- "taesd": the tiny autoencoder (`AutoencoderTiny`, about 1.2 M decoder parameters), full size;
- "full": the model's own VAE, full size.
TAESD runs on the compute device only when its weights and an activation estimate fit in what the
memory budget leaves beside the running stage (the engine's meter counts them while it runs);
otherwise on the CPU. "full" previews use the VAE where the memory plan puts it: on the CPU, on a
device without a budget, or where the plan keeps the whole-image VAE resident (placed early if need
be) and its activation estimate fits beside the running stage (counted while it runs); otherwise
that preview falls back to TAESD (when loaded) or the cheap map, with one warning per request.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from leansd.engine.engine import Engine
    from leansd.models.family import LatentPreview
    from leansd.request import GenerationRequest
    from leansd.sampling.loop import StepState

logger = logging.getLogger(__name__)

TAESD_ACTIVATION_MAPS = 3
"""TAESD decoder activation estimate: this many maps of its widest layer at full size live at once."""


def cheap_rgb(latents: "torch.Tensor", preview: "LatentPreview") -> "torch.Tensor":
    """AUTOMATIC1111's "Approx cheap": scaled latents (B, C, h, w) -> RGB (B, 3, h, w) in [0, 1], CPU float32."""
    import torch

    x = latents.detach().to(device="cpu", dtype=torch.float32)
    factors = torch.tensor(preview.rgb_factors, dtype=torch.float32)  # (C, 3)
    bias = torch.tensor(preview.rgb_bias, dtype=torch.float32).view(1, 3, 1, 1)
    rgb = torch.einsum("bchw,cr->brhw", x, factors) + bias  # (B, 3, h, w), about [-1, 1]
    return (rgb / 2 + 0.5).clamp(0, 1)


def taesd_need(engine: "Engine", *, width: int, height: int, batch: int) -> int:
    """Device bytes a TAESD decode at this size needs: its weights (fp32) plus the activation estimate."""
    from leansd.engine.memory import module_bytes

    taesd = engine.taesd
    if taesd is None:
        return 0
    channels = max(taesd.config.decoder_block_out_channels)
    activations = TAESD_ACTIVATION_MAPS * channels * width * height * batch * 4  # fp32
    return module_bytes(taesd, dtype_bytes=4) + activations


def taesd_on_device(engine: "Engine", *, width: int, height: int, batch: int) -> bool:
    """Whether TAESD runs on the compute device (True) or the CPU (False).

    The compute device is used when it is not the CPU (or stands in for a budgeted device) and the
    decode fits beside what is placed now: no budget, or accounted bytes + need <= budget.
    """
    if engine.device.type == "cpu" and not engine.virtual_device:
        return False
    if engine.budget is None:
        return True
    need = taesd_need(engine, width=width, height=height, batch=batch)
    return engine.memory.current + need <= engine.budget


def taesd_decode(engine: "Engine", latents: "torch.Tensor") -> "torch.Tensor":
    """Scaled latents (B, 4, h, w) -> images (B, 3, H, W) in [-1, 1], float32 on the CPU, with TAESD."""
    import torch

    taesd = engine.taesd
    if taesd is None:
        from leansd.errors import InvalidRequestError

        raise InvalidRequestError("TAESD needs its weights: load the engine with taesd=PATH|hub id (--taesd)")
    batch, _, h, w = latents.shape
    factor = engine.bundle.vae_scale_factor
    on_device = taesd_on_device(engine, width=w * factor, height=h * factor, batch=batch)
    device = engine.device if on_device else torch.device("cpu")
    accounted = on_device and engine.budget is not None
    if accounted:  # counted for as long as it occupies the device
        engine.memory.place("taesd", taesd_need(engine, width=w * factor, height=h * factor, batch=batch))
    try:
        taesd.to(device)
        with torch.inference_mode(), torch.autocast(device.type, enabled=False):
            z = latents.detach().to(device=device, dtype=torch.float32) / taesd.config.scaling_factor
            image = taesd.decode(z, return_dict=False)[0]  # (B, 3, H, W) in [-1, 1]
        return image.float().cpu()
    finally:
        if device.type != "cpu":
            taesd.to("cpu")
        if accounted:
            engine.memory.release("taesd")


def full_preview_bytes(engine: "Engine") -> int | None:
    """Device bytes to account for a whole-image preview decode with the VAE, or None when the memory
    plan does not allow one now (it keeps the VAE off the device during sampling, tiles it, or has no
    room for its activations beside the running stage). A VAE the plan keeps resident but has not
    placed yet is placed here."""
    if (engine.device.type == "cpu" and not engine.virtual_device) or engine.budget is None:
        return 0
    plan = engine.plan
    if plan is None or not plan.resident("vae") or plan.vae_tile is not None:
        return None
    need = plan.activations.get("vae", 0)  # the plan's whole-image VAE estimate at this size and batch
    placed = "vae" in engine._on_device
    if engine.memory.current + need + (0 if placed else engine.sizes.vae) > engine.budget:
        return None
    if not placed:  # the plan keeps the VAE on the device from now on anyway: place it now
        engine._bring("vae", plan)
    return need


def full_decode_in_place(engine: "Engine", latents: "torch.Tensor", *, accounted: int = 0) -> "torch.Tensor":
    """The model's VAE where it sits, whole image: (B, 4, h, w) -> (B, 3, H, W) in [-1, 1], CPU float32.

    `accounted`: activation bytes the engine's meter counts while it runs (see full_preview_bytes)."""
    import torch

    vae = engine.bundle.vae
    weight = next(vae.parameters())
    if accounted:
        engine.memory.place("preview-vae", accounted)
    try:
        with torch.inference_mode(), torch.autocast(weight.device.type, enabled=False):
            z = latents.detach().to(device=weight.device, dtype=weight.dtype) / vae.config.scaling_factor
            image = vae.decode(z, return_dict=False)[0]
        return image.float().cpu()
    finally:
        if accounted:
            engine.memory.release("preview-vae")


def side_by_side(rgb: "torch.Tensor") -> "Image.Image":
    """RGB (B, 3, H, W) in [0, 1] -> one 8-bit image with the batch side by side."""
    from PIL import Image

    batch, _, h, w = rgb.shape
    strip = rgb.permute(2, 0, 3, 1).reshape(h, batch * w, 3)  # (H, B*W, 3)
    return Image.fromarray((strip.numpy() * 255).round().astype("uint8"))


class Previewer:
    """Turns a loop `StepState` into a preview image every `request.preview_every` steps."""

    def __init__(self, engine: "Engine", request: "GenerationRequest") -> None:
        self.engine = engine
        self.every = request.preview_every
        self.content = request.preview_content
        self.method = request.preview_method
        self.latent_preview = engine.bundle.family.latent_preview
        self._warned = False

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def __call__(self, state: "StepState") -> "Image.Image":
        x0 = state.denoised_of(self.content)  # (B, 4, h, w)
        method = self.method
        if method == "full":
            accounted = full_preview_bytes(self.engine)
            if accounted is not None:
                return side_by_side((full_decode_in_place(self.engine, x0, accounted=accounted) / 2 + 0.5).clamp(0, 1))
            method = "taesd" if self.engine.taesd is not None else "approx-cheap"
            if not self._warned:
                logger.warning("a full-VAE preview does not fit the memory plan now; showing %s previews instead",
                               method)
                self._warned = True
        if method == "approx-cheap":
            return side_by_side(cheap_rgb(x0, self.latent_preview))
        return side_by_side((taesd_decode(self.engine, x0) / 2 + 0.5).clamp(0, 1))
