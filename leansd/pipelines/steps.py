"""Step functions shared by the task pipelines (txt2img now; img2img and inpaint reuse them)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable

import leansd
from leansd.errors import InvalidRequestError

if TYPE_CHECKING:
    import numpy as np
    import torch
    from diffusers import SchedulerMixin
    from PIL import Image

    from leansd.engine.engine import Engine
    from leansd.errors import NonFiniteError
    from leansd.prompts.conditioning import ConditioningPlan
    from leansd.request import GenerationRequest, GenerationResult, ProgressEvent
    from leansd.sampling.loop import StepState

logger = logging.getLogger(__name__)


def resolve_size(engine: "Engine", request: "GenerationRequest") -> tuple[int, int]:
    """(width, height) in pixels: the request's, else the model's native size."""
    width = request.width or engine.bundle.default_size
    height = request.height or engine.bundle.default_size
    factor = engine.bundle.vae_scale_factor
    if width % factor or height % factor:
        raise InvalidRequestError(f"width and height must be multiples of {factor} for this model")
    return width, height


def fit_init_image(engine: "Engine", request: "GenerationRequest") -> tuple["Image.Image", int, int]:
    """The init image fitted to the output size (the request's, else its own rounded down to 8)."""
    from leansd.inputs.images import resize_image, target_size

    if request.init_image is None:
        raise InvalidRequestError(f"{request.task} needs an init image")
    width, height = target_size(request.init_image.size, width=request.width, height=request.height)
    factor = engine.bundle.vae_scale_factor
    if width % factor or height % factor:
        raise InvalidRequestError(f"width and height must be multiples of {factor} for this model")
    image = resize_image(request.init_image.convert("RGB"), width, height, mode=request.resize_mode)
    return image, width, height


class PromptConditioning:
    """The request's prompts as per-step conditioning plans, one per distinct loop length.

    A plan covers the loop steps of one sampling run (prompt editing counts them); runs of the
    same length (every batch) share one plan, so each text is encoded once per request.
    """

    def __init__(self, engine: "Engine", request: "GenerationRequest") -> None:
        self.engine = engine
        self.request = request
        self._plans: dict[tuple[int, int, int | None], "ConditioningPlan"] = {}
        self.base_steps: int | None = None
        """Set on the copy a hires-fix second pass uses (:meth:`for_second_pass`)."""

    def for_second_pass(self) -> "PromptConditioning":
        """The same prompts for a hires-fix second pass: A1111 counts its edits on from the first pass."""
        from leansd.prompts.parse import schedule_steps
        from leansd.sampling.samplers import get_sampler

        second = PromptConditioning(self.engine, self.request)
        second._plans = self._plans  # one store, so summary() covers both passes (keys differ)
        second.base_steps = schedule_steps(
            self.request.num_inference_steps, second_order=get_sampler(self.request.sampler).second_order
        )
        return second

    def plan(self, calls: int, *, steps: int | None = None) -> "ConditioningPlan":
        """The conditioning of `calls` loop steps of a run of `steps` sampler steps (default: the request's)."""
        from leansd.prompts.conditioning import build_conditioning
        from leansd.prompts.parse import schedule_steps
        from leansd.sampling.samplers import get_sampler

        counted = schedule_steps(
            steps or self.request.num_inference_steps, second_order=get_sampler(self.request.sampler).second_order
        )
        key = (calls, counted, self.base_steps)
        if key not in self._plans:
            engine, request = self.engine, self.request
            from leansd.prompts.extra_networks import strip_networks

            with engine.compute():
                plan = build_conditioning(
                    strip_networks(request.prompt),  # <lora:...> tags are not text (A1111: positive prompt only)
                    request.negative_prompt,
                    steps=counted,
                    calls=calls,
                    base_steps=self.base_steps,
                    embeddings=engine.embedding_matcher(),
                    syntax=request.prompt_syntax,
                    tokenizer=engine.bundle.tokenizer,
                    text_encoder=engine.placed_text_encoder,  # placed only if something must be encoded
                    device=engine.device,
                    cache=engine.prompt_cache,
                    encoder_fingerprint=engine.text_encoder_fingerprint() if engine.prompt_cache else None,
                    hidden_layer=engine.bundle.text_layer,
                    final_norm=engine.bundle.description.text_encoders[0].final_norm,
                    pooled_width=pooled_width(engine),
                    zero_empty_negative=engine.bundle.description.zero_empty_negative,
                )
            self._plans[key] = plan.to(device=engine.device, dtype=engine.dtype)
            logger.info(
                "prompt: %s syntax, %d chunk(s) of 77 tokens; cache %s",
                plan.syntax, plan.chunks, plan.cache_stats if engine.prompt_cache else "off",
            )
        return self._plans[key]

    def clear(self) -> None:
        """Forget the encoded plans (the engine's dtype changed): the next `plan` encodes again."""
        self._plans.clear()

    def summary(self) -> dict[str, object]:
        """What the CLI reports: syntax, 77-token chunks used, prompt-cache hits/misses."""
        plans = list(self._plans.values())
        if not plans:
            return {}
        return {
            "prompt_syntax": plans[0].syntax,
            "prompt_chunks": max(p.chunks for p in plans),
            "prompt_cache": str(plans[0].cache_stats) if self.engine.prompt_cache else "off",
            "text_encoder_used": any(p.needs_text_encoder for p in plans),
        }


def pooled_width(engine: "Engine") -> int | None:
    """Width of the pooled text embedding the family conditions on (SDXL: bigG's projection), else None."""
    bundle = engine.bundle
    if not bundle.description.pooled_output or bundle.text_encoder_2 is None:
        return None
    return int(bundle.text_encoder_2.config.projection_dim)


def size_ids(engine: "Engine", *, width: int, height: int) -> "torch.Tensor | None":
    """SDXL's added size conditioning (1, 6): original size = target size = (H, W), crop (0, 0), as
    AUTOMATIC1111 and diffusers do by default; None for families without it."""
    import torch

    if engine.bundle.description.added_conditioning != "text_time":
        return None
    values = [height, width, 0, 0, height, width]
    return torch.tensor([values], device=engine.device, dtype=engine.dtype)  # (1, 6)


def encode_conditioning(engine: "Engine", request: "GenerationRequest", *, steps: int) -> PromptConditioning:
    """Parse and encode the prompts for a first run of `steps` loop steps (later runs reuse them)."""
    from leansd.sampling.loop import uses_guidance

    if request.negative_prompt and not uses_guidance(request.guidance_scale, engine.bundle.unet):
        logger.warning("the negative prompt has no effect: guidance is off at CFG scale %g (<= 1)", request.guidance_scale)
    text = PromptConditioning(engine, request)
    if steps > 0:
        text.plan(steps)
    return text


def loop_length(engine: "Engine", request: "GenerationRequest", *, steps: int, strength: float = 1.0) -> int:
    """How many loop steps (model evaluations) a run of `steps` sampler steps at `strength` makes."""
    scheduler = make_scheduler(engine, request, seeds=[0], steps=steps)
    if strength >= 1.0:
        return len(scheduler.timesteps)
    return len(strength_timesteps(scheduler, steps=steps, strength=strength))


def make_scheduler(engine: "Engine", request: "GenerationRequest", *, seeds: list[int], steps: int) -> "SchedulerMixin":
    """A fresh scheduler for one batch, with its `steps` timesteps placed on the compute device."""
    from leansd.sampling.samplers import build_scheduler

    scheduler = build_scheduler(request.sampler, engine.bundle.scheduler_config, seeds=seeds)
    if engine.bundle.scheduler_config.get("rescale_betas_zero_snr") and not scheduler.config.get("rescale_betas_zero_snr"):
        logger.warning("%s cannot rescale its noise schedule to zero terminal SNR, which this model (ztsnr) was "
                       "trained with; DDIM, Euler, Euler a, DPM++ 2M (Karras), UniPC and LCM can", request.sampler)
    try:
        scheduler.set_timesteps(steps, device=engine.device)
    except ValueError as exc:  # a scheduler-specific limit the request checks did not know
        raise InvalidRequestError(f"{request.sampler} cannot run {steps} steps: {exc}") from None
    return scheduler


def strength_timesteps(scheduler: "SchedulerMixin", *, steps: int, strength: float) -> "torch.Tensor":
    """The tail of the schedule that img2img runs: the last int(steps * strength) steps (as diffusers)."""
    run = min(int(steps * strength), steps)
    if run == 0:  # nothing to denoise (PLMS's schedule has an extra entry, so slicing would leave one)
        return scheduler.timesteps[:0]
    start = steps - run
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start * scheduler.order)
    return scheduler.timesteps[start * scheduler.order :]


def noise_for(engine: "Engine", generators: list["torch.Generator"], *, width: int, height: int) -> "torch.Tensor":
    """Each image's CPU-drawn starting noise (the reproducibility contract), on the compute device."""
    from leansd.sampling.noise import initial_noise

    factor = engine.bundle.vae_scale_factor
    channels = engine.bundle.latent_channels
    noise = initial_noise(generators, channels=channels, height=height // factor, width=width // factor)
    return noise.to(device=engine.device, dtype=engine.dtype)


def encode_pixels(engine: "Engine", pixels: "torch.Tensor", generators: list["torch.Generator"]) -> "torch.Tensor":
    """VAE-encode images in [-1, 1]: (1 or B, 3, H, W) -> (B, 4, h, w), B = len(generators).

    Each image's posterior sample draws from that image's generator (as diffusers' img2img), so
    batch item i equals a single run with seed i.
    """
    import torch
    from diffusers.utils.torch_utils import randn_tensor

    vae = engine.bundle.vae
    posterior = engine.vae_encode(pixels)  # placed, tiled or on the CPU as the memory plan says
    with engine.compute():
        rows = []
        for i, g in enumerate(generators):
            mean = posterior.mean[i : i + 1] if posterior.mean.shape[0] > 1 else posterior.mean
            std = posterior.std[i : i + 1] if posterior.std.shape[0] > 1 else posterior.std
            # Same draw as DiagonalGaussianDistribution.sample(generator=g) on this image alone.
            rows.append(mean + std * randn_tensor(mean.shape, generator=g, device=mean.device, dtype=mean.dtype))
    return torch.cat(rows).to(device=engine.device, dtype=engine.dtype) * vae.config.scaling_factor


def run_denoise(
    engine: "Engine",
    request: "GenerationRequest",
    *,
    scheduler: "SchedulerMixin",
    latents: "torch.Tensor",
    generators: list["torch.Generator"],
    text: PromptConditioning,
    timesteps: "torch.Tensor | None" = None,
    extra_channels: "torch.Tensor | None" = None,
    after_step: Callable[[int, "torch.Tensor"], "torch.Tensor"] | None = None,
    on_step: Callable[["StepState"], None] | None = None,
) -> "torch.Tensor":
    """The sampling loop for one batch (its size is len(generators)); returns clean latents."""
    from leansd.sampling.loop import denoise, uses_guidance

    if extra_channels is None and engine.bundle.is_inpainting:
        extra_channels = whole_image_conditioning(engine, latents)
    # A1111 schedules prompt edits over all the run's steps, counted from the first loop step.
    plan = text.plan(len(scheduler.timesteps if timesteps is None else timesteps),
                     steps=getattr(scheduler, "num_inference_steps", None))
    # UNet passes per step: the negative plus every AND part when guided (as the loop batches them).
    guided = uses_guidance(request.guidance_scale, engine.bundle.unet) or plan.is_composable
    passes = 1 + plan.max_parts if guided else plan.max_parts
    factor = engine.bundle.vae_scale_factor
    batch, _, h, w = latents.shape
    with engine.unet_stage(width=w * factor, height=h * factor, batch=batch, passes=passes) as unet, engine.compute():
        return denoise(
            unet=unet,
            scheduler=scheduler,
            latents=latents,
            plan=plan,
            guidance_scale=request.guidance_scale,
            generators=generators,
            eta=request.eta,
            timesteps=timesteps,
            extra_channels=extra_channels,
            after_step=after_step,
            on_step=on_step,
            guidance_rescale=request.guidance_rescale,
            time_ids=size_ids(engine, width=w * factor, height=h * factor),
        )


def whole_image_conditioning(engine: "Engine", latents: "torch.Tensor") -> "torch.Tensor":
    """Extra UNet input of a 9-channel inpainting model asked for txt2img/img2img: all masked.

    As AUTOMATIC1111: mask = 1 everywhere and the masked image (all grey) encoded with the VAE
    (posterior mean: no random draw, so seeds keep their meaning). Returns (B, 5, h, w).
    """
    import torch

    batch, _, h, w = latents.shape
    factor = engine.bundle.vae_scale_factor
    vae = engine.bundle.vae
    grey = torch.zeros((1, 3, h * factor, w * factor), device=engine.device, dtype=engine.dtype)
    masked = engine.vae_encode(grey).mode().to(device=engine.device) * vae.config.scaling_factor
    mask = torch.ones((1, 1, h, w), device=engine.device, dtype=engine.dtype)
    return torch.cat([mask, masked.to(engine.dtype)], dim=1).expand(batch, -1, -1, -1)


def img2img_latents(
    engine: "Engine",
    request: "GenerationRequest",
    *,
    seeds: list[int],
    pixels: "torch.Tensor",
    strength: float,
    steps: int,
    text: PromptConditioning,
    on_step: Callable[["StepState"], None] | None = None,
) -> "torch.Tensor":
    """img2img for one batch, as diffusers' img2img: encode (posterior sample), noise to the start step, denoise.

    Strength 1 ignores the image (exactly txt2img for the same seed); a strength that leaves no
    step returns the encoded image (one VAE round trip).
    """
    from leansd.sampling.noise import image_generators

    generators = image_generators(seeds)
    height, width = pixels.shape[-2:]
    scheduler = make_scheduler(engine, request, seeds=seeds, steps=steps)
    if strength >= 1.0:
        latents = noise_for(engine, generators, width=width, height=height) * scheduler.init_noise_sigma
        return run_denoise(engine, request, scheduler=scheduler, latents=latents, generators=generators,
                           text=text, on_step=on_step)
    encoded = encode_pixels(engine, pixels, generators)
    return refine_latents(engine, request, encoded, scheduler=scheduler, generators=generators, steps=steps,
                          strength=strength, text=text, on_step=on_step)


def refine_latents(
    engine: "Engine",
    request: "GenerationRequest",
    latents: "torch.Tensor",
    *,
    scheduler: "SchedulerMixin",
    generators: list["torch.Generator"],
    steps: int,
    strength: float,
    text: PromptConditioning,
    on_step: Callable[["StepState"], None] | None = None,
) -> "torch.Tensor":
    """Noise clean latents (B, 4, h, w) to the start step `strength` implies and denoise the rest."""
    timesteps = strength_timesteps(scheduler, steps=steps, strength=strength)
    if len(timesteps) == 0:
        return latents
    factor = engine.bundle.vae_scale_factor
    noise = noise_for(engine, generators, width=latents.shape[-1] * factor, height=latents.shape[-2] * factor)
    start = scheduler.add_noise(latents, noise, timesteps[:1].repeat(len(generators)))
    return run_denoise(engine, request, scheduler=scheduler, latents=start, generators=generators,
                       text=text, timesteps=timesteps, on_step=on_step)


def non_finite_error(what: str, precision: str) -> "NonFiniteError":
    """The error for NaN/inf that fp32 cannot avoid (or that appeared in fp32 already)."""
    from leansd.errors import NonFiniteError

    return NonFiniteError(
        f"the model produced NaN or infinite values in the {what} ({precision}); "
        "no image was made. The weights may be damaged, or the settings too extreme for this model"
    )


def sample_finite(
    engine: "Engine",
    sample_batch: Callable[[list[int], Callable[["StepState"], None]], "torch.Tensor"],
    seeds: list[int],
    on_step: Callable[["StepState"], None],
    text: PromptConditioning,
) -> "torch.Tensor":
    """`sample_batch(seeds, on_step)`, checked for NaN/inf: redone once in fp32 if the engine ran in a
    reduced precision (fp16 overflow), else NonFiniteError. A black image is never returned."""
    from leansd.engine.vae import is_finite

    latents = sample_batch(seeds, on_step)
    if is_finite(latents):
        return latents
    if not engine.reduced_precision:
        raise non_finite_error("latents", "fp32")
    engine.use_full_precision("the sampler produced NaN/inf latents")
    text.clear()  # the conditioning was kept at the reduced dtype
    latents = sample_batch(seeds, on_step)
    if not is_finite(latents):
        raise non_finite_error("latents", "fp32")
    return latents


def decode_latents(engine: "Engine", latents: "torch.Tensor", *, decoder: str = "full") -> "np.ndarray":
    """Decode to float32 RGB in [0, 1], (B, H, W, 3) on the CPU, with the VAE or ("taesd") TAESD;
    NonFiniteError for NaN/inf pixels."""
    from leansd.engine.vae import is_finite

    if decoder == "taesd":
        from leansd.engine.previews import taesd_decode

        image = taesd_decode(engine, latents)  # on the device if it fits the budget, else the CPU
    else:
        image = engine.vae_decode(latents)  # placed, tiled or on the CPU per plan; redone in fp32 on NaN/inf
    if not is_finite(image):  # vae_decode redoes a reduced-precision decode in fp32 before it returns
        raise non_finite_error("decoded pixels", "fp32")
    image = (image.float() / 2 + 0.5).clamp(0, 1)  # (B, 3, H, W) from [-1, 1] to [0, 1]
    return image.permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3)


def to_pil(pixels: "np.ndarray") -> list["Image.Image"]:
    """Float [0, 1] (B, H, W, 3) -> 8-bit PIL images (rounded, as diffusers does)."""
    from PIL import Image

    return [Image.fromarray((p * 255).round().astype("uint8")) for p in pixels]


def infotext_for(
    engine: "Engine",
    request: "GenerationRequest",
    *,
    seed: int,
    width: int,
    height: int,
    extra: dict[str, object] | None = None,
) -> str:
    """AUTOMATIC1111 "parameters" text for one image; `extra` holds task entries (strength, hires...)."""
    from leansd.outputs.infotext import build_infotext

    entries: dict[str, object] = {}
    if request.sampler == "DDIM" and request.eta:
        entries["Eta"] = request.eta
    entries.update(extra or {})
    if request.tiling:
        entries["Tiling"] = "True"
    entries.update(engine.embedding_infotext(request.prompt, request.negative_prompt))
    entries.update(engine.lora_infotext())
    entries.update(engine.vae_infotext())
    if request.vae_decoder == "taesd":
        entries["VAE decoder"] = "TAESD (approximate)"
    if engine.backend.name != "torch":  # which runtime computed the picture (torch: no entry, as before)
        entries["Backend"] = engine.backend.name
    if engine.bundle.is_random:
        entries["Note"] = "random test model, noise image"
    entries["Version"] = f"leansd {leansd.__version__}"
    return build_infotext(
        prompt=request.prompt,
        negative_prompt=request.negative_prompt,
        steps=request.num_inference_steps,
        sampler=request.sampler,
        cfg_scale=request.guidance_scale,
        seed=seed,
        width=width,
        height=height,
        model_hash=engine.bundle.hash,
        model_name=engine.bundle.name,
        extra=entries,
    )


def run_batches(
    engine: "Engine",
    request: "GenerationRequest",
    *,
    width: int,
    height: int,
    sample_batch: Callable[[list[int], Callable[["StepState"], None]], "torch.Tensor"],
    text: PromptConditioning,
    finish: Callable[["np.ndarray"], "np.ndarray"] | None = None,
    extra_info: dict[str, object] | None = None,
    progress: Callable[["ProgressEvent"], None] | None = None,
    progress_bar: bool = True,
    started: float,
    encode_seconds: float,
) -> "GenerationResult":
    """Run `sample_batch(seeds, on_step) -> latents` for each of the n_iter batches, decode, package.

    `finish(pixels)` post-processes decoded float pixels (the inpainting composite). Every
    `request.preview_every` loop steps a live preview rides along with the progress event.
    """
    import time

    import numpy as np
    from tqdm.auto import tqdm

    from leansd.engine.previews import Previewer
    from leansd.request import GenerationResult, ProgressEvent, SkipBatch, StopGeneration

    previewer = Previewer(engine, request) if request.preview_every and progress is not None else None

    seeds = request.image_seeds()
    pixels = []
    done_seeds: list[int] = []
    interrupted = False
    sample_seconds = decode_seconds = 0.0
    for b in range(request.n_iter):
        batch_seeds = seeds[b * request.batch_size : (b + 1) * request.batch_size]
        with tqdm(total=None, desc=f"batch {b + 1}/{request.n_iter}", disable=not progress_bar, leave=False) as bar:

            def on_step(state: "StepState") -> None:
                bar.total = state.total
                bar.update(1)
                if progress is not None:  # may raise SkipBatch / StopGeneration
                    preview = previewer(state) if previewer is not None and previewer.due(state.step) else None
                    progress(ProgressEvent(step=state.step, total_steps=state.total, batch_index=b,  # noqa: B023 - called within this batch
                                           n_batches=request.n_iter, preview=preview))

            t0 = time.perf_counter()
            try:
                latents = sample_finite(engine, sample_batch, batch_seeds, on_step, text)
            except SkipBatch:
                continue
            except StopGeneration:
                interrupted = True
                break
            engine.synchronize()  # CUDA runs asynchronously: wait before reading the clock
            t1 = time.perf_counter()
        try:
            decoded = decode_latents(engine, latents, decoder=request.vae_decoder)
        except SkipBatch:  # raised within the decode by an interruptible engine's check
            continue
        except StopGeneration:
            interrupted = True
            break
        pixels.append(decoded if finish is None else finish(decoded))
        done_seeds += batch_seeds
        sample_seconds += t1 - t0
        decode_seconds += time.perf_counter() - t1

    all_pixels = np.concatenate(pixels) if pixels else np.zeros((0, height, width, 3), np.float32)
    seeds = done_seeds
    info = text.summary()
    info["backend"] = engine.backend.name
    if interrupted or len(seeds) < request.num_images:
        info["interrupted"] = True
    return GenerationResult(
        images=to_pil(all_pixels),
        seeds=seeds,
        infotexts=[
            infotext_for(engine, request, seed=s, width=width, height=height, extra=extra_info) for s in seeds
        ],
        request=request,
        pixels=all_pixels,
        timings={
            "encode": encode_seconds,
            "sample": sample_seconds,
            "decode": decode_seconds,
            "total": time.perf_counter() - started,
        },
        peak_memory_bytes=engine.peak_memory(),
        **engine.memory_summary(),
        info=info,
    )
