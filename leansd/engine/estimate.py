"""How long a job will take: FLOPs counted on a weightless copy of the model, divided by the speed
measured on this device.

The FLOPs come from `torch.utils.flop_counter.FlopCounterMode` over a forward pass of the same
architecture built on the "meta" device (no weights, no memory, no arithmetic), so convolutions,
matmuls and attention at the exact image size are counted, quadratic attention cost included.
The speed is FLOP/s measured on real UNet forwards (`SpeedMeter`). Both are estimates: a job that
runs at another size than the ones measured may be faster or slower, typically within 2x.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from leansd.engine.engine import Engine
    from leansd.request import GenerationRequest

logger = logging.getLogger(__name__)

TEXT_TOKENS = 77


class FlopCounter:
    """FLOPs of one UNet forward or one VAE decode at a given latent shape, cached per shape."""

    def __init__(self, unet: Any, vae: Any) -> None:
        self._unet_class, self._unet_config = type(unet), dict(unet.config)
        self._vae_class, self._vae_config = type(vae), dict(vae.config)
        self._models: dict[str, Any] = {}
        self._cache: dict[tuple, int] = {}
        self._lock = threading.Lock()

    def _meta(self, name: str) -> Any:
        import torch

        if name not in self._models:
            cls, config = (self._unet_class, self._unet_config) if name == "unet" else (self._vae_class, self._vae_config)
            with torch.device("meta"):
                self._models[name] = cls.from_config(config)
        return self._models[name]

    def unet(self, batch: int, channels: int, height: int, width: int) -> int:
        """FLOPs of one UNet call on latents (batch, channels, height, width)."""
        key = ("unet", batch, channels, height, width)
        with self._lock:
            if key not in self._cache:
                unet = self._meta("unet")
                self._cache[key] = _count(lambda: unet(**unet_inputs(unet.config, batch, height, width, channels=channels)))
            return self._cache[key]

    def vae_decode(self, batch: int, height: int, width: int) -> int:
        """FLOPs of decoding latents (batch, C, height, width); encoding costs about as much."""
        import torch

        key = ("vae", batch, height, width)
        with self._lock:
            if key not in self._cache:
                vae = self._meta("vae")
                latents = torch.zeros(batch, vae.config.latent_channels, height, width, device="meta")
                self._cache[key] = _count(lambda: vae.decode(latents))
            return self._cache[key]


def _count(run: Any) -> int:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        run()
    return int(counter.get_total_flops())


def unet_inputs(config: Any, batch: int, height: int, width: int, *, channels: int | None = None,
                device: "torch.device | str" = "meta", dtype: "torch.dtype | None" = None) -> dict[str, Any]:
    """Zero inputs of the right shapes for a UNet call (SDXL's added conditioning included)."""
    import torch

    dtype = dtype or torch.float32
    channels = channels or config.in_channels
    inputs: dict[str, Any] = {
        "sample": torch.zeros(batch, channels, height, width, device=device, dtype=dtype),
        "timestep": torch.tensor(500, device=device),
        "encoder_hidden_states": torch.zeros(batch, TEXT_TOKENS, config.cross_attention_dim, device=device, dtype=dtype),
        "return_dict": False,
    }
    if getattr(config, "addition_embed_type", None) == "text_time":
        # Only the sum matters to the shapes: the UNet concatenates both into one projection input.
        time_dim = config.addition_time_embed_dim
        ids = 6 if config.projection_class_embeddings_input_dim > 6 * time_dim else 1
        text_dim = config.projection_class_embeddings_input_dim - ids * time_dim
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.zeros(batch, text_dim, device=device, dtype=dtype),
            "time_ids": torch.zeros(batch, ids, device=device, dtype=dtype),
        }
    return inputs


class SpeedMeter:
    """FLOP/s of the UNet on this device, from timed real forwards (forward pre- and post-hooks)."""

    def __init__(self, unet: "torch.nn.Module", counter: FlopCounter, device: "torch.device") -> None:
        self.counter = counter
        self.device = device
        self.flops_per_second: float | None = None
        self.samples = 0
        self._started: dict[int, tuple[float, tuple[int, ...]]] = {}
        self._handles = [
            unet.register_forward_pre_hook(self._before, with_kwargs=True),
            unet.register_forward_hook(self._after, with_kwargs=True),
        ]

    def _before(self, module: Any, args: tuple, kwargs: dict) -> None:
        sample = args[0] if args else kwargs.get("sample")
        if sample is not None:
            self._started[threading.get_ident()] = (time.perf_counter(), tuple(sample.shape))

    def _after(self, module: Any, args: tuple, kwargs: dict, output: Any) -> None:
        started = self._started.pop(threading.get_ident(), None)
        if started is None:
            return
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)  # kernels run asynchronously: the clock needs them done
        self.record(started[1], time.perf_counter() - started[0])

    def record(self, shape: tuple[int, ...], seconds: float) -> None:
        """One UNet call on a sample of `shape` took `seconds` (also what a non-torch backend reports)."""
        flops = self.counter.unet(*shape)
        if seconds <= 0 or flops <= 0:
            return
        rate = flops / seconds
        # A running mean that follows the device (thermal limits, other load) but not one odd step.
        self.flops_per_second = rate if self.flops_per_second is None else 0.7 * self.flops_per_second + 0.3 * rate
        self.samples += 1

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


@dataclass(frozen=True)
class JobEstimate:
    """Predicted work and time of a request."""

    flops: int
    seconds: float | None
    """None until the device's speed has been measured."""
    flops_per_second: float | None

    def describe(self) -> str:
        if self.seconds is None or self.flops_per_second is None:
            return f"{_flops(self.flops)} (speed not measured yet)"
        return (f"about {_duration(self.seconds)} ({_flops(self.flops)} at the measured "
                f"{self.flops_per_second / 1e9:.1f} GFLOP/s)")


def _flops(n: int) -> str:
    return f"{n / 1e12:.1f} TFLOP" if n >= 1e11 else f"{n / 1e9:.1f} GFLOP"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def job_flops(engine: "Engine", request: "GenerationRequest") -> int:
    """FLOPs of the whole request: every UNet evaluation, VAE decode and encode, hires pass included."""
    from leansd.inputs.images import target_size
    from leansd.pipelines.steps import loop_length
    from leansd.sampling.denoiser import uses_guidance

    counter = engine.flop_counter
    bundle = engine.bundle
    factor = bundle.vae_scale_factor
    channels = bundle.unet.config.in_channels
    if request.init_image is not None:
        width, height = target_size(request.init_image.size, width=request.width, height=request.height)
    else:
        width, height = request.width or bundle.default_size, request.height or bundle.default_size
    passes = 2 if uses_guidance(request.guidance_scale, bundle.unet) else 1
    batch = request.batch_size

    def stage(w: int, h: int, steps: int, strength: float, encode: bool) -> int:
        evals = loop_length(engine, request, steps=steps, strength=strength)
        total = evals * counter.unet(batch * passes, channels, h // factor, w // factor)
        decode = counter.vae_decode(batch, h // factor, w // factor)
        return total + decode * (2 if encode else 1)

    per_batch = stage(width, height, request.num_inference_steps,
                      request.strength if request.init_image is not None else 1.0, request.init_image is not None)
    if request.hires:
        if request.hires_scale is not None:
            hw = int(width * request.hires_scale) // 8 * 8
            hh = int(height * request.hires_scale) // 8 * 8
        else:
            hw = request.hires_width or width
            hh = request.hires_height or height
        per_batch += stage(hw, hh, request.hires_steps or request.num_inference_steps, request.hires_strength,
                           request.hires_upscaler != "latent")
    return per_batch * request.n_iter


def estimate(engine: "Engine", request: "GenerationRequest") -> JobEstimate:
    """The request's FLOPs and, once the speed is measured, its predicted seconds."""
    flops = job_flops(engine, request)
    rate = engine.speed.flops_per_second
    seconds = None if rate is None else flops / rate
    return JobEstimate(flops=flops, seconds=seconds, flops_per_second=rate)


def calibration_size(engine: "Engine") -> int:
    """A side for the speed measurement: half the native size (a quarter of its work), a multiple of 64."""
    return max(64, engine.bundle.default_size // 2 // 64 * 64)

