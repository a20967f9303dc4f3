"""The one contract every front end fills: a request in, a result (and progress events) out.

All validation of user values happens here, in one place; a bad value raises
`InvalidRequestError` with a one-line message that names the valid range or options.
"""

from __future__ import annotations

import math
import numbers
import operator
import secrets
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from leansd.errors import InvalidRequestError, brief

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

MIN_SIZE = 64
MAX_SIZE = 4096
MAX_STEPS = 1000
MAX_BATCH = 64
MAX_ITER = 10_000
MAX_SEED = 2**32 - 1
"""Seeds are 32-bit unsigned as in AUTOMATIC1111; -1 or None means "pick one at random"."""

# One default per knob, shared by every front end (CLI, HTTP API, web UI) and the Python API.
DEFAULT_SAMPLER = "PLMS"
DEFAULT_STEPS = 50
DEFAULT_GUIDANCE = 7.5
DEFAULT_ETA = 0.0
DEFAULT_BATCH_SIZE = 1
DEFAULT_N_ITER = 1
DEFAULT_STRENGTH = 0.75
DEFAULT_MASK_BLUR = 4
DEFAULT_HIRES_STRENGTH = 0.5
DEFAULT_GUIDANCE_RESCALE = 0.0
DEFAULT_REFINER_SWITCH_AT = 0.8
"""Fraction of the timesteps the SDXL base runs before the refiner takes over (AUTOMATIC1111's default)."""
PREDICTION_CHOICES = ("auto", "epsilon", "v_prediction")
"""`GenerationRequest.prediction_type`: "auto" is what the model says (its .yaml, scheduler config, marker
keys or probe); the others force a prediction type. None (the default) keeps the loaded model as it is."""
RESIZE_MODES = ("just-resize", "crop", "fill")
DEFAULT_RESIZE_MODE = RESIZE_MODES[0]
INPAINTING_FILLS = ("original", "fill", "latent-noise", "latent-nothing")
DEFAULT_INPAINTING_FILL = INPAINTING_FILLS[0]
HIRES_UPSCALERS = ("lanczos", "latent")
DEFAULT_HIRES_UPSCALER = HIRES_UPSCALERS[0]
MAX_MASK_BLUR = 64
MAX_HIRES_SCALE = 4.0
MAX_GUIDANCE = 30.0
"""CFG scale bound: the top of AUTOMATIC1111's slider. Far above it the guided prediction overflows
(1e38 in fp32) and the image comes out black."""
MAX_ETA = 1.0
"""DDIM eta bound: AUTOMATIC1111's slider (0 = deterministic DDIM, 1 = DDPM-like noise)."""
PROMPT_SYNTAXES = ("auto", "a1111", "blocks", "plain")
DEFAULT_PROMPT_SYNTAX = PROMPT_SYNTAXES[0]
DEFAULT_PREVIEW_EVERY = 10
"""Loop steps between live previews when a front end shows them (AUTOMATIC1111's show_progress_every_n_steps)."""
PREVIEW_METHODS = ("approx-cheap", "taesd", "full")
"""AUTOMATIC1111's show_progress_type: a linear latent->RGB map, the tiny autoencoder, the full VAE."""
PREVIEW_CONTENTS = ("combined", "prompt", "negative-prompt")
"""AUTOMATIC1111's live_preview_content: x0 of the guided prediction, of the prompt's, of the negative's."""
DEFAULT_PREVIEW_METHOD = PREVIEW_METHODS[0]
DEFAULT_PREVIEW_CONTENT = PREVIEW_CONTENTS[0]
VAE_DECODERS = ("full", "taesd")
DEFAULT_VAE_DECODER = VAE_DECODERS[0]


class _ValidationMark:
    """Where a request keeps whether `validated()` made it: a slot, so it is no field and stays out of
    `__dict__` (`GenerationRequest(**request.__dict__)` builds an unchecked copy)."""

    __slots__ = ("_validated",)


@dataclass
class GenerationRequest(_ValidationMark):
    """What to generate. Field names follow diffusers' public vocabulary.

    `width`/`height` of None take the model's native size (512 for SD 1.x), or for img2img the
    init image's size rounded down to a multiple of 8.
    The task follows from the fields: an `init_image` makes it img2img, an `init_image` with a
    `mask` inpainting; `hires_*` adds a second, upscaled img2img pass to txt2img.
    Images are numbered `0 .. batch_size * n_iter - 1`; image `k` uses seed `seed + k`.
    With `fixed_code=True` every batch reuses the first batch's noise (as the CompVis scripts'
    `--fixed_code`): image `k` uses seed `seed + k % batch_size`.
    """

    prompt: str
    negative_prompt: str = ""
    width: int | None = None
    height: int | None = None
    num_inference_steps: int = DEFAULT_STEPS
    guidance_scale: float = DEFAULT_GUIDANCE
    sampler: str = DEFAULT_SAMPLER
    eta: float = DEFAULT_ETA
    """DDIM eta (0 = deterministic DDIM); ignored by other samplers."""
    seed: int | None = None
    batch_size: int = DEFAULT_BATCH_SIZE
    n_iter: int = DEFAULT_N_ITER
    fixed_code: bool = False
    init_image: "Image.Image | None" = None
    """img2img / inpaint source image (RGB)."""
    strength: float = DEFAULT_STRENGTH
    """img2img denoising strength: 0 returns the image (one VAE round trip), 1 ignores it."""
    resize_mode: str = DEFAULT_RESIZE_MODE
    """How the init image fits width x height: just-resize, crop, fill (AUTOMATIC1111's modes)."""
    mask: "Image.Image | None" = None
    """Inpainting mask ("L"): white = regenerate, black = keep; grey values are soft."""
    invert_mask: bool = False
    mask_blur: int = DEFAULT_MASK_BLUR
    inpainting_fill: str = DEFAULT_INPAINTING_FILL
    """What the masked area starts from: original, fill, latent-noise, latent-nothing."""
    hires_scale: float | None = None
    hires_width: int | None = None
    hires_height: int | None = None
    hires_strength: float = DEFAULT_HIRES_STRENGTH
    hires_steps: int | None = None
    """Steps of the second pass (default: num_inference_steps)."""
    hires_upscaler: str = DEFAULT_HIRES_UPSCALER
    tiling: bool = False
    """Seamless tiling: convolutions pad circularly so the image tiles without seams."""
    prompt_syntax: str = DEFAULT_PROMPT_SYNTAX
    """auto, a1111 ((word:1.2), [a:b:0.5], AND, BREAK), blocks (optimizedSD `a:0.3 b:0.7`), plain."""
    guidance_rescale: float = DEFAULT_GUIDANCE_RESCALE
    """0..1: rescale the guided prediction towards the conditional one's standard deviation (Lin et al.
    2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", eq. 15-16; diffusers' formula);
    0 (default) is plain guidance. Helps v-prediction / zero-terminal-SNR models at high CFG."""
    prediction_type: str | None = None
    """What the checkpoint predicts: "epsilon" or "v_prediction" force it, "auto" lets the model say
    (see PREDICTION_CHOICES); a model-load option: the engine reloads its checkpoint (or loads
    `checkpoint`) with it before the job, and it stays in effect. None (default): leave it as it is."""
    checkpoint: str | None = None
    """Checkpoint to generate with: a name (stem, path or A1111 title) from the model library or a
    file; the engine switches to it before the job (one model in memory). None: the loaded one."""
    refiner_checkpoint: str | None = None
    """SDXL refiner to run the last steps with (a name from the model library, an A1111 title or a file);
    None: no refiner. The base model must be SDXL."""
    refiner_switch_at: float = DEFAULT_REFINER_SWITCH_AT
    """With a refiner: the fraction of the timesteps the base runs (0 < x <= 1; 1 = no refiner), as
    diffusers' ``denoising_end`` (timesteps at or above (1 - x) * 1000 go to the base)."""
    vae: str | None = None
    """VAE to decode with: a file, a name from the VAE folder, "None" (the checkpoint's own) or
    "Automatic" (A1111's sd_vae choices); it stays in use afterwards. None: leave it as it is."""
    preview_every: int = 0
    """Decode a live preview every this many loop steps and pass it with the progress event; 0: none.
    Front ends that show previews use DEFAULT_PREVIEW_EVERY."""
    preview_method: str = DEFAULT_PREVIEW_METHOD
    """approx-cheap (linear map of the latents, 1/8 size), taesd (tiny autoencoder), full (the VAE)."""
    preview_content: str = DEFAULT_PREVIEW_CONTENT
    """Which prediction a preview shows: combined (guided), prompt, negative-prompt."""
    vae_decoder: str = DEFAULT_VAE_DECODER
    """The final decoder: full (the model's VAE) or taesd (the tiny autoencoder: fast, slightly different)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name != "_validated":  # a changed value must be checked again
            object.__setattr__(self, "_validated", False)
        object.__setattr__(self, name, value)

    @property
    def is_validated(self) -> bool:
        """True for the request `validated()` returned, as long as none of its fields changed since."""
        return getattr(self, "_validated", False)

    @property
    def task(self) -> str:
        if self.init_image is None:
            return "txt2img"
        return "img2img" if self.mask is None else "inpaint"

    @property
    def hires(self) -> bool:
        return self.hires_scale is not None or self.hires_width is not None or self.hires_height is not None

    def validated(self) -> "GenerationRequest":
        """Check every value; return a copy with the sampler name canonicalised and a concrete seed.

        The one validation of a request: `Engine.generate` calls it on entry, and front ends that
        want their errors before a model loads call it too. A request it returned (and nobody changed
        since) is returned as it is, so the checks (and the random seed) happen once.
        """
        from leansd.sampling.samplers import get_sampler

        if self.is_validated:
            return self
        negative = "" if self.negative_prompt is None else self.negative_prompt
        for name, text in (("prompt", self.prompt), ("negative_prompt", negative)):
            if not isinstance(text, str):
                raise InvalidRequestError(f"{name} must be a string, got {type(text).__name__}")
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise InvalidRequestError(f"{name} is not valid text (it holds undecodable bytes)") from None
        for name in ("checkpoint", "vae", "refiner_checkpoint"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise InvalidRequestError(f"{name} must be a non-empty name or path, got {value!r}")
        prediction_type = None if self.prediction_type is None else prediction_choice(self.prediction_type)
        values: dict[str, Any] = {
            name: _as_int(name, getattr(self, name))
            for name in ("num_inference_steps", "batch_size", "n_iter")
        }
        for name in ("width", "height", "seed", "hires_width", "hires_height", "hires_steps"):
            value = getattr(self, name)
            values[name] = None if value is None else _as_int(name, value)
        for name in ("guidance_scale", "eta", "strength", "hires_strength", "guidance_rescale", "refiner_switch_at"):
            values[name] = _as_float(name, getattr(self, name))
        values["hires_scale"] = None if self.hires_scale is None else _as_float("hires_scale", self.hires_scale)
        values["mask_blur"] = _as_int("mask_blur", self.mask_blur)
        values["preview_every"] = _as_int("preview_every", self.preview_every)
        if not 0 <= values["preview_every"] <= MAX_STEPS:
            raise InvalidRequestError(
                f"preview_every must be between 0 (no previews) and {MAX_STEPS} steps, got {values['preview_every']}"
            )
        checked = replace(
            self,
            negative_prompt=negative,
            fixed_code=bool(self.fixed_code),
            invert_mask=bool(self.invert_mask),
            tiling=bool(self.tiling),
            resize_mode=_choice("resize_mode", self.resize_mode, RESIZE_MODES),
            inpainting_fill=_choice("inpainting_fill", self.inpainting_fill, INPAINTING_FILLS),
            hires_upscaler=_choice("hires_upscaler", self.hires_upscaler, HIRES_UPSCALERS),
            prompt_syntax=_choice("prompt_syntax", self.prompt_syntax, PROMPT_SYNTAXES),
            preview_method=_choice("preview_method", self.preview_method, PREVIEW_METHODS),
            preview_content=_choice("preview_content", self.preview_content, PREVIEW_CONTENTS),
            vae_decoder=_choice("vae_decoder", self.vae_decoder, VAE_DECODERS),
            prediction_type=prediction_type,
            **values,
        )
        checked._check_images()
        checked = checked._check_ranges(get_sampler(self.sampler))
        checked._validated = True
        return checked

    def _check_images(self) -> None:
        from PIL import Image

        if self.init_image is not None and not isinstance(self.init_image, Image.Image):
            raise InvalidRequestError(f"init_image must be a PIL image, got {type(self.init_image).__name__}")
        if self.mask is not None:
            if self.init_image is None:
                raise InvalidRequestError("a mask needs an init image to inpaint")
            if not isinstance(self.mask, Image.Image):
                raise InvalidRequestError(f"mask must be a PIL image, got {type(self.mask).__name__}")
            if isinstance(self.mask_blur, int) and 0 <= self.mask_blur:
                from leansd.inputs.images import prepare_mask

                # Aspect ratio and "all black" are checked now, before any model work.
                prepare_mask(self.mask, self.init_image.size, invert=self.invert_mask, blur=0,
                             image_size=self.init_image.size)
        for name in ("strength", "hires_strength"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise InvalidRequestError(f"{name} must be between 0 and 1, got {value:g}")
        if not 0 <= self.mask_blur <= MAX_MASK_BLUR:
            raise InvalidRequestError(f"mask_blur must be between 0 and {MAX_MASK_BLUR} pixels, got {self.mask_blur}")
        if self.hires:
            if self.init_image is not None:
                raise InvalidRequestError("the high-resolution second pass (hires) is for txt2img only")
            if self.hires_scale is not None and (self.hires_width is not None or self.hires_height is not None):
                raise InvalidRequestError("give either hires_scale or hires width/height, not both")
            if self.hires_scale is not None and not 1.0 <= self.hires_scale <= MAX_HIRES_SCALE:
                raise InvalidRequestError(f"hires_scale must be between 1 and {MAX_HIRES_SCALE:g}, got {self.hires_scale:g}")
            for name in ("hires_width", "hires_height"):
                value = getattr(self, name)
                if value is not None and (value % 8 or not MIN_SIZE <= value <= MAX_SIZE):
                    raise InvalidRequestError(
                        f"{name} must be a multiple of 8 between {MIN_SIZE} and {MAX_SIZE}, got {value}"
                    )
            if self.hires_steps is not None and not 1 <= self.hires_steps <= MAX_STEPS:
                raise InvalidRequestError(f"hires_steps must be between 1 and {MAX_STEPS}, got {self.hires_steps}")

    def _check_ranges(self, sampler) -> "GenerationRequest":
        for name in ("width", "height"):
            value = getattr(self, name)
            if value is None:
                continue
            if value % 8 != 0:
                raise InvalidRequestError(f"{name} must be a multiple of 8, got {value}")
            if not MIN_SIZE <= value <= MAX_SIZE:
                raise InvalidRequestError(f"{name} must be between {MIN_SIZE} and {MAX_SIZE}, got {value}")
        max_steps = min(MAX_STEPS, sampler.max_steps or MAX_STEPS)
        if not 1 <= self.num_inference_steps <= max_steps:
            raise InvalidRequestError(
                f"steps must be between 1 and {max_steps} for {sampler.name}, got {self.num_inference_steps}"
            )
        if not 1 <= self.batch_size <= MAX_BATCH:
            raise InvalidRequestError(f"n_samples (batch size) must be between 1 and {MAX_BATCH}, got {self.batch_size}")
        if not 1 <= self.n_iter <= MAX_ITER:
            raise InvalidRequestError(f"n_iter must be between 1 and {MAX_ITER}, got {self.n_iter}")
        if not 0 <= self.guidance_scale <= MAX_GUIDANCE:
            raise InvalidRequestError(
                f"scale (CFG) must be between 0 and {MAX_GUIDANCE:g} (AUTOMATIC1111's range), got {self.guidance_scale:g}"
            )
        if not 0 <= self.eta <= MAX_ETA:
            raise InvalidRequestError(f"ddim_eta must be between 0 and {MAX_ETA:g} (AUTOMATIC1111's range), got {self.eta:g}")
        if not 0.0 <= self.guidance_rescale <= 1.0:
            raise InvalidRequestError(f"guidance_rescale must be between 0 and 1, got {self.guidance_rescale:g}")
        if not 0.0 < self.refiner_switch_at <= 1.0:
            raise InvalidRequestError(
                f"refiner_switch_at must be above 0 and at most 1 (1 = no refiner), got {self.refiner_switch_at:g}"
            )
        seed = self.seed
        if seed is None or seed == -1:
            seed = random_seed(self.seeds_used)
        elif seed < 0 or seed + self.seeds_used - 1 > MAX_SEED:
            raise InvalidRequestError(
                f"seed must be between 0 and {MAX_SEED - self.seeds_used + 1} "
                f"(or -1 for random) so every image's seed fits, got {seed}"
            )
        return replace(self, sampler=sampler.name, seed=seed)

    @property
    def num_images(self) -> int:
        return self.batch_size * self.n_iter

    @property
    def seeds_used(self) -> int:
        """How many consecutive seeds the request's images use."""
        return self.batch_size if self.fixed_code else self.num_images

    def image_seeds(self) -> list[int]:
        """Seed of every image, in order (requires a concrete seed: call `validated()` first)."""
        if self.seed is None:
            raise InvalidRequestError("request has no seed yet; call validated() first")
        return [self.seed + k % self.seeds_used for k in range(self.num_images)]


class SkipBatch(Exception):
    """Raise from a progress callback to drop the current batch and go on with the next."""


class StopGeneration(Exception):
    """Raise from a progress callback to stop; the result holds the batches finished so far."""


@dataclass
class ProgressEvent:
    """One sampler step finished (`total_steps` counts model evaluations: 2N-1 for Heun/DPM2).

    `preview` is the live preview of the batch (one image, the batch side by side) on the steps
    the request's `preview_every` asks for, else None.
    """

    step: int
    total_steps: int
    batch_index: int
    n_batches: int
    preview: "Image.Image | None" = None


@dataclass
class GenerationResult:
    """Images plus everything needed to reproduce them."""

    images: list["Image.Image"]
    seeds: list[int]
    infotexts: list[str]
    request: GenerationRequest
    pixels: "np.ndarray | None" = None
    """Float32 RGB in [0, 1], shape (N, H, W, 3): the images before 8-bit rounding."""
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds per stage: encode, sample, decode, total."""
    peak_memory_bytes: int | None = None
    """Peak bytes allocated on the compute device (CUDA only), else None."""
    memory_peak_bytes: int | None = None
    """The engine's accounted peak on the compute device: weights it placed plus the planner's activation estimate."""
    memory_plan: str | None = None
    """The memory plan of the last stage, in one line (see leansd.engine.planner.MemoryPlan.describe)."""
    info: dict[str, Any] = field(default_factory=dict)


def random_seed(count: int = 1) -> int:
    """A random first seed such that `count` consecutive seeds all stay within 32 bits."""
    return secrets.randbelow(MAX_SEED + 2 - max(1, count))


def prediction_choice(value: object) -> str:
    """A prediction type choice -> "auto", "epsilon" or "v_prediction" ("Automatic", "eps", "v" accepted)."""
    from leansd.models.prediction import normalise_prediction_type

    if not isinstance(value, str):
        raise InvalidRequestError(f"prediction_type must be one of {', '.join(PREDICTION_CHOICES)}, got {brief(value)}")
    if value.strip().lower() in ("auto", "automatic"):
        return "auto"
    try:
        return str(normalise_prediction_type(value))
    except InvalidRequestError:
        raise InvalidRequestError(
            f"unknown prediction_type {brief(value)}; valid: {', '.join(PREDICTION_CHOICES)}") from None


def _choice(name: str, value: object, options: tuple[str, ...]) -> str:
    """Case-insensitive choice; spaces and underscores count as hyphens ("Latent noise" -> latent-noise)."""
    key = str(value).strip().lower().replace("_", "-").replace(" ", "-")
    key = {"crop-and-resize": "crop", "resize-and-fill": "fill"}.get(key, key)
    if key not in options:
        raise InvalidRequestError(f"unknown {name} {brief(value)}; valid: {', '.join(options)}")
    return key


def _as_int(name: str, value: object) -> int:
    """Python or numpy integers -> int; anything else (floats, bools, strings) is an error."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidRequestError(f"{name} must be an integer, got {brief(value)}")
    return operator.index(value)


def _as_float(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise InvalidRequestError(f"{name} must be a finite number, got {brief(value)}")
    return float(value)
