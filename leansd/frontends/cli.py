"""`leansd` command line. Flags follow the optimizedSD/CompVis scripts, with friendlier aliases.

Only the standard library is imported at the top so `leansd --help` answers at once; torch and
diffusers load when a command runs.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, NoReturn, Sequence

# leansd.request: constants only (no torch, no PIL)
from leansd import __version__, request as defaults
from leansd.frontends import limits  # the server's defaults, standard library only
from leansd.service.queue import DEFAULT_MAX_QUEUE  # standard library only

if TYPE_CHECKING:
    from leansd.request import GenerationRequest, ProgressEvent

EXIT_USAGE = 2
EXIT_TERMINATED = 143  # 128 + SIGTERM, as a shell reports a process the signal ended

SAMPLER_HELP = (
    "DDIM, PLMS, Euler, Euler a, Heun, DPM2, DPM2 a, LMS, DPM++ 2M, DPM++ 2M Karras, "
    "DPM++ SDE Karras, UniPC, LCM (optimizedSD spellings such as ddim, plms, euler_a also work)"
)


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage dump) and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


TASKS = {
    "txt2img": ("generate images from a text prompt", "outputs/txt2img-samples"),
    "img2img": ("transform an init image guided by a prompt (add --mask to inpaint)", "outputs/img2img-samples"),
    "inpaint": ("regenerate the white part of a mask, keep the rest", "outputs/inpaint-samples"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="leansd",
        description="Stable Diffusion on the hardware you own (CPU, 2-4 GB GPUs, big GPUs at full speed).",
    )
    parser.add_argument("--version", action="version", version=f"leansd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for task, (summary, outdir) in TASKS.items():
        command = sub.add_parser(
            task, help=summary, description=f"{summary[0].upper()}{summary[1:]}; images are saved as PNG/JPEG "
            "with AUTOMATIC1111 metadata."
        )
        _add_model_args(command)
        _add_prompt_args(command)
        if task != "txt2img":
            _add_image_args(command, mask_required=task == "inpaint")
        _add_sampling_args(command)
        _add_refiner_args(command)
        if task == "txt2img":
            _add_hires_args(command)
        _add_preview_args(command)
        _add_output_args(command, outdir)
    _add_serve_args(sub)
    _add_serve_args(sub, name="ui")
    _add_batch_args(sub)
    return parser


def _add_batch_args(sub: "argparse._SubParsersAction") -> None:
    batch = sub.add_parser(
        "batch", help="run a job file (JSONL, CSV or prompts) here or on a Ray cluster",
        description="Run every line of a job file: JSON Lines with the HTTP API's txt2img/img2img fields, a CSV "
        "with those fields as header, or a prompt file (one prompt per line). Images go to OUTDIR/<id>-<k>.png, "
        "every image is recorded in OUTDIR/manifest.jsonl; see docs/BATCH.md.",
    )
    batch.add_argument("jobs", metavar="JOBS", help="the job file (.jsonl, .csv, or a text file of prompts)")
    batch.add_argument("--jobs-format", "--jobs_format", dest="jobs_format", default="auto",
                       help="auto (default: by extension: .jsonl/.json JSON Lines, .csv CSV, else prompts), jsonl, csv, txt")
    _add_model_args(batch)
    run = batch.add_argument_group("run")
    run.add_argument("--outdir", default="outputs/batch", help="output folder (default outputs/batch)")
    run.add_argument("--resume", action="store_true",
                     help="finish an earlier run in --outdir: skip images the manifest and the files already hold")
    run.add_argument("--overwrite", action="store_true",
                     help="replace <id>-<k>.png files already in --outdir that no manifest lists (default: refuse)")
    run.add_argument("--seed", type=_int, default=None,
                     help="base seed: a line without one gets it plus the number of images before it (default: random, recorded)")
    run.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                     help="run on a Ray cluster (pip install 'leansd[ray]'): ADDRESS such as auto or host:6379; "
                     "without it, connect to the running cluster or start one on this machine")
    run.add_argument("--workers", type=_int, default=None,
                     help="Ray workers, each with its own model copy (default: one per GPU, else one per node)")
    run.add_argument("--no-prompt-cache", "--no_prompt_cache", dest="prompt_cache", action="store_false",
                     help="do not use the on-disk prompt-embedding cache")
    run.add_argument("--verbose", "-v", action="store_true", help="log model, device and failures")
    defaults = batch.add_argument_group("values for fields a job line leaves out (else the HTTP API's defaults)")
    defaults.add_argument("--nprompt", "--negative-prompt", "--negative_prompt", dest="negative_prompt", default=None,
                          help="negative prompt")
    defaults.add_argument("--ddim_steps", "--steps", dest="steps", type=_int, default=None, help="sampling steps")
    defaults.add_argument("--scale", "--cfg-scale", "--cfg_scale", dest="scale", type=_float, default=None,
                          help="guidance scale")
    defaults.add_argument("--sampler", default=None, help=f"sampler: {SAMPLER_HELP}")
    defaults.add_argument("--W", "--width", dest="width", type=_int, default=None, help="width (default: the model's native size)")
    defaults.add_argument("--H", "--height", dest="height", type=_int, default=None, help="height (default: the model's native size)")
    defaults.add_argument("--n_samples", "--batch-size", "--batch_size", dest="n_samples", type=_int, default=None,
                          help="images per batch (default 1)")
    defaults.add_argument("--n_iter", "--n-iter", dest="n_iter", type=_int, default=None,
                          help="batches per line (default 1)")


def _add_serve_args(sub: "argparse._SubParsersAction", name: str = "serve") -> None:
    serve = sub.add_parser(
        name, help="serve the web UI (/) and an AUTOMATIC1111-compatible HTTP API (/sdapi/v1)"
        + ("; opens the browser" if name == "ui" else ""),
        description="Serve the web UI (/) and an AUTOMATIC1111-compatible HTTP API (/sdapi/v1) on one model; "
        "see docs/API.md." + (" Same as `leansd serve`, and opens the UI in the browser." if name == "ui" else ""),
    )
    if name == "ui":
        serve.add_argument("--no-browser", "--no_browser", dest="browser", action="store_false",
                           help="do not open the web UI in the browser")
    _add_model_args(serve)
    net = serve.add_argument_group("server")
    net.add_argument("--host", default=limits.DEFAULT_HOST,
                     help=f"address to bind (default {limits.DEFAULT_HOST}, this machine only)")
    net.add_argument("--port", type=_int, default=limits.DEFAULT_PORT, help=f"port (default {limits.DEFAULT_PORT})")
    net.add_argument("--listen", action="store_true",
                     help="bind 0.0.0.0 (all interfaces); refuses to start without --api-auth")
    net.add_argument("--api-auth", "--api_auth", dest="api_auth", metavar="USER:PASS",
                     help="require HTTP Basic credentials on every route (several: u1:p1,u2:p2)")
    net.add_argument("--max-queue", "--max_queue", dest="max_queue", type=_int, default=DEFAULT_MAX_QUEUE,
                     help=f"jobs allowed to wait; beyond it requests get 503 with Retry-After (default {DEFAULT_MAX_QUEUE})")
    net.add_argument("--max-size", "--max_size", dest="max_size", type=_int, default=limits.DEFAULT_MAX_SIZE,
                     help="largest width/height a request may ask for, hires pass included "
                     f"(default {limits.DEFAULT_MAX_SIZE})")
    net.add_argument("--allowed-hosts", "--allowed_hosts", dest="allowed_hosts", metavar="NAME[,NAME]",
                     help="Host names the server answers to besides IP addresses, localhost and --host "
                          "(DNS-rebinding defence; '.example.org' allows its subdomains, '*' any name)")
    net.add_argument("--max-body", "--max_body", dest="max_body", metavar="SIZE",
                     default=f"{limits.DEFAULT_MAX_BODY >> 20}M",
                     help=f"largest request body, e.g. 100M (default {limits.DEFAULT_MAX_BODY >> 20}M: a few 4K PNGs); "
                          "larger ones get 413")
    net.add_argument("--max-job-seconds", "--max_job_seconds", dest="max_job_seconds", type=_float,
                     default=limits.DEFAULT_MAX_JOB_SECONDS,
                     help="refuse jobs estimated (from the measured speed of this device) to run longer "
                          f"(default {limits.DEFAULT_MAX_JOB_SECONDS:g}; 0 = no limit)")
    net.add_argument("--shutdown-timeout", "--shutdown_timeout", dest="shutdown_timeout", type=_float,
                     default=limits.DEFAULT_SHUTDOWN_SECONDS,
                     help="on SIGTERM/Ctrl+C, seconds the running job may finish before it is cancelled "
                          f"(default {limits.DEFAULT_SHUTDOWN_SECONDS:g})")
    net.add_argument("--save-images", "--save_images", dest="save_images", action="store_true",
                     help="also save every generated image under --outdir")
    net.add_argument("--outdir", default="outputs", help="output folder for --save-images (default outputs)")
    net.add_argument("--no-prompt-cache", "--no_prompt_cache", dest="prompt_cache", action="store_false",
                     help="do not use the on-disk prompt-embedding cache")
    net.add_argument("--verbose", "-v", action="store_true", help="log requests, model, device and timings")
    cluster = serve.add_argument_group("Ray Serve")
    cluster.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                         help="run the models on Ray Serve replicas (pip install 'leansd[ray]'): ADDRESS such as "
                         "auto or host:6379; without it, the running cluster or a new one on this machine")
    cluster.add_argument("--replicas", type=_int, default=None,
                         help="Ray Serve replicas, each with its own model copy (default 1; one GPU each on GPU clusters)")


def _add_model_args(command: argparse.ArgumentParser) -> None:
    model = command.add_argument_group("model")
    model.add_argument(
        "--model", "--ckpt", dest="model", default=os.environ.get("LEANSD_MODEL"), metavar="PATH|ID",
        help="a .safetensors/.ckpt checkpoint, a diffusers folder, a hub id (owner/name, needs network), "
        "or 'tiny' (a random test model that makes noise). Default: $LEANSD_MODEL",
    )
    model.add_argument("--device", default="auto", help="auto (default: CUDA if present, else CPU), cpu, cuda, cuda:N, mps")
    model.add_argument(
        "--precision", default="auto", help="auto (default: full on CPU, fp16 on GPU), full, autocast, fp16, bf16"
    )
    model.add_argument(
        "--prediction-type", "--prediction_type", dest="prediction_type", type=_prediction_type, default=None,
        metavar="TYPE", help="what the model predicts: epsilon or v_prediction (SD 2.x 768-v). Default: the "
        ".yaml beside the checkpoint, a diffusers folder's scheduler config, v_pred marker keys, else detected",
    )
    library = command.add_argument_group("model library (AUTOMATIC1111's folders)")
    library.add_argument("--data-dir", "--data_dir", dest="data_dir", metavar="DIR",
                         help="folder holding models/Stable-diffusion, models/Lora, models/VAE and embeddings "
                         "(default: the current folder)")
    library.add_argument("--ckpt-dir", "--ckpt_dir", dest="ckpt_dir", metavar="DIR",
                         help="checkpoints, scanned with subfolders; --model NAME picks one by file stem or "
                         "AUTOMATIC1111 title (default: DATA_DIR/models/Stable-diffusion)")
    library.add_argument("--lora-dir", "--lora_dir", dest="lora_dir", metavar="DIR",
                         help="LoRAs used by <lora:NAME:MULT> in prompts (default: DATA_DIR/models/Lora)")
    library.add_argument("--vae-dir", "--vae_dir", dest="vae_dir", metavar="DIR",
                         help="VAEs for --vae NAME (default: DATA_DIR/models/VAE)")
    library.add_argument("--embeddings-dir", "--embeddings_dir", dest="embeddings_dir", metavar="DIR",
                         help="textual-inversion embeddings, used by name in prompts (default: DATA_DIR/embeddings)")
    library.add_argument("--vae", "--vae-path", "--vae_path", dest="vae", default="Automatic", metavar="FILE|NAME",
                         help="VAE to decode with: a file, a name from --vae-dir, 'None' (the checkpoint's own) or "
                         "'Automatic' (default: <checkpoint stem>.vae.safetensors beside the checkpoint if present)")
    memory = model  # the memory flags, see README "Memory"
    memory.add_argument(
        "--vram", default="auto", type=_vram, metavar="SIZE",
        help="GPU memory budget the engine never exceeds, e.g. 4G, 1500M; 'auto' (default): free CUDA memory "
        "(plus what leansd holds) minus 512M, read again before each plan; 'none': no limit. Ignored on the CPU",
    )
    preset = command.add_mutually_exclusive_group()
    preset.add_argument("--medvram", action="store_true",
                        help="each model on the GPU only for its stage (text encoder -> UNet -> VAE), as A1111")
    preset.add_argument("--lowvram", action="store_true",
                        help="also stream the UNet from host memory, block by block or (when blocks do not fit) "
                        "layer by layer: lowest peak, slower")
    memory.add_argument("--turbo", action="store_true",
                        help="prefer speed within the budget: plan against all of it (no 10%% safety margin)")
    memory.add_argument("--vae-on-cpu", "--vae_on_cpu", dest="vae_on_cpu", action="store_true",
                        help="decode/encode with the VAE on the CPU in fp32 (slow; frees its GPU memory)")
    from leansd.backends import BACKEND_HELP, CONVERT_HELP, DEFAULT_BACKEND

    model.add_argument("--backend", default=DEFAULT_BACKEND, type=_backend, metavar="NAME", help=BACKEND_HELP)
    model.add_argument("--convert", action="store_true", help=CONVERT_HELP)
    model.add_argument("--taesd", metavar="PATH|ID",
                       help="TAESD weights (a diffusers AutoencoderTiny folder, or a hub id such as madebyollin/taesd "
                       "for SD 1.x/2.x or madebyollin/taesdxl for SDXL, needs network) for TAESD previews and --vae-decoder taesd")


def _vram(text: str) -> str:
    """--vram: validated here so a typo fails before the model loads; the Engine resolves it."""
    from leansd.engine.planner import parse_size
    from leansd.errors import InvalidRequestError

    try:
        parse_size(text)
    except InvalidRequestError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _backend(text: str) -> str:
    """--backend: a known name, checked before the model loads (whether it can run: at the load)."""
    from leansd.backends import check_backend_name
    from leansd.errors import InvalidRequestError

    try:
        return check_backend_name(text)
    except InvalidRequestError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _prediction_type(text: str) -> str:
    """--prediction-type: validated before the model loads."""
    from leansd.errors import InvalidRequestError
    from leansd.models.prediction import normalise_prediction_type

    try:
        return normalise_prediction_type(text)  # type: ignore[return-value]
    except InvalidRequestError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _memory_options(args: argparse.Namespace) -> dict[str, Any]:
    """Engine.load keyword arguments from the memory flags of _add_model_args."""
    policy = "lowvram" if args.lowvram else "medvram" if args.medvram else "auto"
    options: dict[str, Any] = {"vram": args.vram, "memory_policy": policy, "turbo": args.turbo,
                                  "vae_on_cpu": args.vae_on_cpu}
    if getattr(args, "backend", None) is not None:
        options.update(backend=args.backend, convert=args.convert)
    if getattr(args, "prediction_type", None) is not None:
        options["prediction_type"] = args.prediction_type
    return options


def _add_prompt_args(command: argparse.ArgumentParser) -> None:
    prompt = command.add_argument_group("prompt")
    source = prompt.add_mutually_exclusive_group()
    source.add_argument("--prompt", "-p", help="what to draw")
    source.add_argument(
        "--from-file", "--from_file", dest="from_file", metavar="FILE",
        help="read prompts from FILE (UTF-8), one per line, blank lines skipped; instead of --prompt",
    )
    prompt.add_argument(
        "--nprompt", "--negative-prompt", "--negative_prompt", dest="negative_prompt", default="",
        help="what to avoid (negative prompt); default empty",
    )
    prompt.add_argument(
        "--prompt-syntax", "--prompt_syntax", dest="prompt_syntax", default=defaults.DEFAULT_PROMPT_SYNTAX,
        help=f"{defaults.DEFAULT_PROMPT_SYNTAX} (default), a1111 ((word:1.2), [from:to:when], [a|b], AND, BREAK), "
        "blocks (optimizedSD 'tabby cat:0.25 white duck:0.75'), plain (no parsing); see docs/PROMPTS.md",
    )
    prompt.add_argument(
        "--no-prompt-cache", "--no_prompt_cache", dest="prompt_cache", action="store_false",
        help="do not read or write the on-disk prompt-embedding cache (~/.cache/leansd/prompt-embeddings)",
    )


def _add_image_args(command: argparse.ArgumentParser, *, mask_required: bool) -> None:
    image = command.add_argument_group("init image and mask")
    image.add_argument("--init-img", "--init_img", "--image", dest="init_img", required=True, metavar="PATH",
                       help="the starting image (PNG/JPEG/WebP; transparency is flattened on white)")
    image.add_argument("--strength", type=_float, default=defaults.DEFAULT_STRENGTH,
                       help=f"denoising strength 0..1 (default {defaults.DEFAULT_STRENGTH}): 0 returns the image, "
                       "1 ignores it")
    image.add_argument("--resize-mode", "--resize_mode", dest="resize_mode", default=defaults.DEFAULT_RESIZE_MODE,
                       help=f"how the image fits --W/--H: {_choices(defaults.RESIZE_MODES, defaults.DEFAULT_RESIZE_MODE)}")
    image.add_argument("--mask", required=mask_required, metavar="PATH",
                       help="inpainting mask: white = regenerate, black = keep; grey is soft"
                       + ("" if mask_required else " (makes img2img inpaint)"))
    image.add_argument("--invert-mask", "--invert_mask", dest="invert_mask", action="store_true",
                       help="regenerate the black part instead")
    image.add_argument("--mask-blur", "--mask_blur", dest="mask_blur", type=_int, default=defaults.DEFAULT_MASK_BLUR,
                       help=f"blur of the mask edge in pixels, 0..{defaults.MAX_MASK_BLUR} "
                       f"(default {defaults.DEFAULT_MASK_BLUR})")
    image.add_argument("--inpainting-fill", "--inpainting_fill", dest="inpainting_fill",
                       default=defaults.DEFAULT_INPAINTING_FILL,
                       help="what the masked area starts from: "
                       + _choices(defaults.INPAINTING_FILLS, defaults.DEFAULT_INPAINTING_FILL))


def _add_sampling_args(command: argparse.ArgumentParser) -> None:
    gen = command.add_argument_group("sampling")
    gen.add_argument("--H", "--height", dest="height", type=_int, help="image height in pixels, multiple of 8 (default: the model's native size: 512 for SD 1.x, 768 for SD 2.x 768-v, 1024 for SDXL; img2img: the init image's)")
    gen.add_argument("--W", "--width", dest="width", type=_int, help="image width in pixels, multiple of 8 (default: the model's native size; img2img: the init image's)")
    gen.add_argument("--ddim_steps", "--steps", dest="steps", type=_int, default=defaults.DEFAULT_STEPS, help=f"sampling steps (default {defaults.DEFAULT_STEPS}; img2img runs steps x strength of them)")
    gen.add_argument("--scale", "--cfg-scale", "--cfg_scale", dest="scale", type=_float, default=defaults.DEFAULT_GUIDANCE, help=f"classifier-free guidance scale, 0..{defaults.MAX_GUIDANCE:g} (default {defaults.DEFAULT_GUIDANCE}; <= 1 disables guidance)")
    gen.add_argument("--guidance-rescale", "--guidance_rescale", dest="guidance_rescale", type=_float,
                     default=defaults.DEFAULT_GUIDANCE_RESCALE, help="0..1, rescale the guided prediction's spread "
                     "to the conditional one's (helps v-prediction models at high --scale); default 0: off")
    gen.add_argument("--sampler", default=defaults.DEFAULT_SAMPLER, help=f"sampler (default {defaults.DEFAULT_SAMPLER}): {SAMPLER_HELP}")
    gen.add_argument("--ddim_eta", "--eta", dest="eta", type=_float, default=defaults.DEFAULT_ETA, help=f"DDIM eta, 0..{defaults.MAX_ETA:g}, 0 = deterministic (default {defaults.DEFAULT_ETA:g})")
    gen.add_argument("--seed", type=_int, default=None, help="seed of the first image; image k uses seed+k (default: random, printed)")
    gen.add_argument("--n_samples", "--batch-size", "--batch_size", dest="n_samples", type=_int, default=defaults.DEFAULT_BATCH_SIZE, help=f"images per batch (default {defaults.DEFAULT_BATCH_SIZE})")
    gen.add_argument("--n_iter", "--n-iter", dest="n_iter", type=_int, default=defaults.DEFAULT_N_ITER, help=f"number of batches; the model is loaded once (default {defaults.DEFAULT_N_ITER})")
    gen.add_argument("--fixed_code", "--fixed-code", dest="fixed_code", action="store_true", help="reuse the first batch's starting noise for every batch and prompt")
    gen.add_argument("--tiling", action="store_true", help="seamless tiling: the image wraps around (textures, wallpapers)")


def _add_refiner_args(command: argparse.ArgumentParser) -> None:
    refiner = command.add_argument_group("SDXL refiner (ensemble of experts)")
    refiner.add_argument("--refiner", metavar="FILE|NAME", default=None,
                         help="an SDXL refiner (Stability's single file, a diffusers folder, or a checkpoint name "
                         "from --ckpt-dir) that runs the last steps after the SDXL base model (default: none)")
    refiner.add_argument("--refiner-switch-at", "--refiner_switch_at", dest="refiner_switch_at", type=_float,
                         default=defaults.DEFAULT_REFINER_SWITCH_AT, metavar="X",
                         help="fraction of the timesteps the base runs before the refiner takes over, above 0 "
                         f"and at most 1 (1 = no refiner; default {defaults.DEFAULT_REFINER_SWITCH_AT:g})")


def _add_hires_args(command: argparse.ArgumentParser) -> None:
    hires = command.add_argument_group("high-resolution second pass")
    size = hires.add_mutually_exclusive_group()
    size.add_argument("--hires", dest="hires", metavar="WxH", help="second pass at this size, e.g. 1024x1024")
    size.add_argument("--hires-scale", "--hires_scale", dest="hires_scale", type=_float,
                      help="second pass at the first pass's size times this (1..4), e.g. 2")
    hires.add_argument("--hires-strength", "--hires_strength", dest="hires_strength", type=_float,
                       default=defaults.DEFAULT_HIRES_STRENGTH,
                       help=f"denoising strength of the second pass (default {defaults.DEFAULT_HIRES_STRENGTH})")
    hires.add_argument("--hires-steps", "--hires_steps", dest="hires_steps", type=_int,
                       help="steps of the second pass (default: --steps)")
    hires.add_argument("--hires-upscaler", "--hires_upscaler", dest="hires_upscaler",
                       default=defaults.DEFAULT_HIRES_UPSCALER,
                       help="lanczos (resize the pixels) or latent (resize the latents); "
                       f"default {defaults.DEFAULT_HIRES_UPSCALER}")


def _choices(options: Sequence[str], default: str) -> str:
    """`a (default), b, c`: the options for a help text, the default marked."""
    return ", ".join(f"{o} (default)" if o == default else o for o in options)


def _add_preview_args(command: argparse.ArgumentParser) -> None:
    preview = command.add_argument_group("live previews and decoder")
    preview.add_argument("--preview-dir", "--preview_dir", dest="preview_dir", metavar="DIR",
                         help="write live preview PNGs of the sampling to DIR (off by default)")
    preview.add_argument("--preview-every", "--preview_every", dest="preview_every", type=_int, metavar="N",
                         help=f"a preview every N sampling steps (default {defaults.DEFAULT_PREVIEW_EVERY}; "
                         "needs --preview-dir)")
    preview.add_argument("--preview-method", "--preview_method", dest="preview_method",
                         default=defaults.DEFAULT_PREVIEW_METHOD,
                         help=f"{_choices(defaults.PREVIEW_METHODS, defaults.DEFAULT_PREVIEW_METHOD)}: approx-cheap is a "
                         "linear latent->RGB map at 1/8 size (no weights), taesd needs --taesd, full uses the model's VAE")
    preview.add_argument("--vae-decoder", "--vae_decoder", dest="vae_decoder", default=defaults.DEFAULT_VAE_DECODER,
                         help=f"final decoder: {_choices(defaults.VAE_DECODERS, defaults.DEFAULT_VAE_DECODER)}; taesd "
                         "needs --taesd, is far faster on a CPU and changes the picture slightly (the infotext says so)")


def _preview_fields(args: argparse.Namespace) -> dict:
    from leansd.errors import InvalidRequestError

    fields: dict = {"preview_method": args.preview_method, "vae_decoder": args.vae_decoder}
    if args.preview_dir is None:
        if args.preview_every is not None:
            raise InvalidRequestError("--preview-every needs --preview-dir DIR (where the previews go)")
        return fields
    every = defaults.DEFAULT_PREVIEW_EVERY if args.preview_every is None else args.preview_every
    if every < 1:
        raise InvalidRequestError(f"--preview-every must be at least 1 step, got {every}")
    return {**fields, "preview_every": every}


class _PreviewFiles:
    """Writes each live preview as DIR/preview-NNNNN-seed<S>-step<K>.png (NNNNN counts on across runs)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.count = len(list(folder.glob("preview-*.png"))) if folder.is_dir() else 0

    def progress(self, request: "GenerationRequest") -> "Callable[[ProgressEvent], None]":
        """The progress callback for one (validated) request."""
        seeds = request.image_seeds()
        return lambda event: self.write(event, seed=seeds[event.batch_index * request.batch_size])

    def write(self, event: "ProgressEvent", *, seed: int) -> None:
        if event.preview is None:
            return
        from leansd.outputs.writer import save_image

        self.folder.mkdir(parents=True, exist_ok=True)
        save_image(event.preview, self.folder / f"preview-{self.count:05d}-seed{seed}-step{event.step:04d}.png",
                   infotext=None)
        self.count += 1


def _add_output_args(command: argparse.ArgumentParser, outdir: str) -> None:
    out = command.add_argument_group("output")
    out.add_argument("--outdir", default=outdir, help=f"output folder (default {outdir})")
    out.add_argument("--format", dest="fmt", choices=("png", "jpg"), default="png", help="image format (default png)")
    out.add_argument("--skip_grid", "--skip-grid", dest="skip_grid", action="store_true", help="do not save a grid of each prompt's images")
    out.add_argument("--skip_save", "--skip-save", dest="skip_save", action="store_true", help="do not save individual images (speed runs)")
    out.add_argument("--verbose", "-v", action="store_true", help="log model, device, precision and timings")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    logging.basicConfig(
        level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
        format="leansd: %(message)s",
        stream=sys.stderr,
    )
    from leansd.errors import LeansdError, is_out_of_memory, one_line

    try:
        if args.command in TASKS:
            with _terminate_as_exception():
                return run_generate(args)
        if args.command in ("serve", "ui"):
            return run_serve(args)
        if args.command == "batch":
            from leansd.batch.command import run as run_batch

            return run_batch(args, memory=_memory_options(args))
    except Terminated:
        print("leansd: terminated (SIGTERM); images already saved are complete", file=sys.stderr)
        return EXIT_TERMINATED
    except LeansdError as exc:
        print(f"leansd: error: {one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("leansd: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `leansd txt2img ... | head -1`
        sys.stderr.close()
        return 0
    except Exception as exc:  # out of memory is a user-fixable condition, not a crash
        if is_out_of_memory(exc):
            print(
                "leansd: error: the GPU ran out of memory; try a smaller --n_samples or --H/--W, or --device cpu",
                file=sys.stderr,
            )
            return 1
        from leansd.engine.device import is_missing_kernel, translate_cuda_error

        if is_missing_kernel(exc):  # outside Engine.generate (loading, placing): the same advice
            import torch

            advice = translate_cuda_error(exc, torch.device("cuda", torch.cuda.current_device()))
            print(f"leansd: error: {one_line(advice)}", file=sys.stderr)
            return EXIT_USAGE
        raise
    return EXIT_USAGE


class Terminated(BaseException):
    """SIGTERM arrived: unwinds like KeyboardInterrupt, so a file being written removes its temp file."""


@contextlib.contextmanager
def _terminate_as_exception() -> Iterator[None]:
    """While generating, turn SIGTERM into `Terminated` (the default action would kill the process
    at once and leave a half-written hidden temp file behind); the old handler comes back after."""
    import signal

    from leansd.outputs.writer import deferrable

    try:  # an image being written is finished (or its temp file removed) before Terminated is raised
        previous = signal.signal(signal.SIGTERM, deferrable(Terminated))
    except ValueError:  # not the main thread: signals cannot be handled here
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _read_prompts(args: argparse.Namespace) -> list[str]:
    from leansd.errors import InvalidRequestError

    if args.from_file:
        path = Path(args.from_file)
        from leansd.inputs.text import read_text_file

        text = read_text_file(path, label="--from-file")
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
        if not prompts:
            raise InvalidRequestError(f"--from-file {path}: the file holds no prompts (it is empty)")
        return prompts
    if args.prompt is None:
        raise InvalidRequestError("give a prompt with --prompt TEXT (or --from-file FILE)")
    return [args.prompt]


def _read_images(args: argparse.Namespace) -> dict:
    """Init image and mask fields of the request (img2img/inpaint), read before the model loads."""
    if getattr(args, "init_img", None) is None:
        return {}
    from leansd.inputs.images import load_image, load_mask

    fields = dict(
        init_image=load_image(args.init_img, label="--init-img"),
        strength=args.strength,
        resize_mode=args.resize_mode,
        invert_mask=args.invert_mask,
        mask_blur=args.mask_blur,
        inpainting_fill=args.inpainting_fill,
    )
    if args.mask is not None:
        fields["mask"] = load_mask(args.mask, label="--mask")
    return fields


def _hires_fields(args: argparse.Namespace) -> dict:
    from leansd.errors import InvalidRequestError

    if getattr(args, "hires", None) is None and getattr(args, "hires_scale", None) is None:
        return {}
    fields = dict(hires_strength=args.hires_strength, hires_steps=args.hires_steps, hires_upscaler=args.hires_upscaler)
    if args.hires_scale is not None:
        return {**fields, "hires_scale": args.hires_scale}
    try:
        width, height = (int(v) for v in args.hires.lower().split("x"))
    except ValueError:
        raise InvalidRequestError(f"--hires expects WIDTHxHEIGHT like 1024x768, got {args.hires!r}") from None
    return {**fields, "hires_width": width, "hires_height": height}


def run_generate(args: argparse.Namespace) -> int:
    from leansd.errors import InvalidRequestError
    from leansd.request import GenerationRequest

    # 1. Validate everything cheap before the (slow) model load.
    if not args.model:
        raise InvalidRequestError("no model given: pass --model PATH|owner/name|tiny (or set LEANSD_MODEL)")
    library, model = _library_and_model(args)
    refiner = _refiner_path(args, library)
    prompts = _read_prompts(args)
    _check_loras(prompts, library)
    images = _read_images(args)
    previews = _preview_fields(args)
    if (previews["vae_decoder"] == "taesd" or (previews.get("preview_every") and previews["preview_method"] == "taesd")) \
            and not args.taesd:
        raise InvalidRequestError("TAESD previews and --vae-decoder taesd need --taesd PATH|ID")
    preview_files = None
    if args.preview_dir is not None:
        from leansd.outputs.writer import preflight_outdir

        preview_files = _PreviewFiles(preflight_outdir(Path(args.preview_dir)))
    per_prompt = args.n_samples if args.fixed_code else args.n_samples * args.n_iter
    seed = args.seed
    random_seed_chosen = seed is None or seed == -1
    if random_seed_chosen:
        from leansd.request import random_seed

        seed = random_seed(per_prompt if args.fixed_code else per_prompt * len(prompts))
    requests = []
    for k, prompt in enumerate(prompts):
        # As in optimizedSD, seeds keep counting across prompts: prompt k starts where k-1 stopped
        # (with --fixed_code every prompt reuses the same noise).
        offset = 0 if args.fixed_code else k * per_prompt
        requests.append(
            GenerationRequest(
                prompt=prompt,
                negative_prompt=args.negative_prompt,
                width=args.width,
                height=args.height,
                num_inference_steps=args.steps,
                guidance_scale=args.scale,
                sampler=args.sampler,
                eta=args.eta,
                seed=seed + offset,
                batch_size=args.n_samples,
                n_iter=args.n_iter,
                fixed_code=args.fixed_code,
                tiling=args.tiling,
                prompt_syntax=args.prompt_syntax,
                guidance_rescale=args.guidance_rescale,
                refiner_checkpoint=refiner,
                refiner_switch_at=args.refiner_switch_at,
                **images,
                **_hires_fields(args),
                **previews,
            ).validated()
        )
    writer = None
    if not (args.skip_save and args.skip_grid):
        from leansd.outputs.writer import ImageWriter

        # Checks the folder can be made; creates nothing until the first image is written.
        writer = ImageWriter(Path(args.outdir), fmt=args.fmt)

    # 2. Load the model once (and the refiner, if any).
    engine = _load_engine(args, library, model)
    if refiner is not None and args.refiner_switch_at < 1.0:
        engine.set_refiner(refiner)
    if random_seed_chosen:
        print(f"leansd: seed {seed} (random)", file=sys.stderr)

    # 3. Generate and save, prompt by prompt.
    show_bar = sys.stderr.isatty()
    for request in requests:
        progress = None if preview_files is None else preview_files.progress(request)
        result = engine.generate(request, progress=progress, progress_bar=show_bar)
        chunks = result.info.get("prompt_chunks", 1)
        print(
            f"prompt: {request.prompt!r} ({result.info.get('prompt_syntax', 'plain')} syntax, "
            f"{chunks} chunk{'s' if chunks != 1 else ''} of 77 tokens)  seeds {result.seeds[0]}..{result.seeds[-1]}",
            file=sys.stderr,
        )
        if writer is not None and not args.skip_save:
            for image, seed, info in zip(result.images, result.seeds, result.infotexts, strict=True):
                path = writer.save(image, seed=seed, infotext=info)
                print(path)
        if writer is not None and not args.skip_grid and len(result.images) > 1:
            from leansd.outputs.writer import make_grid

            grid = make_grid(result.images, n_rows=request.n_iter)
            print(writer.save_grid(grid, infotext=result.infotexts[0]))
        logging.getLogger("leansd.cli").info(
            "timings: %s; peak device memory: %s (accounted %s); %s",
            ", ".join(f"{k} {v:.2f}s" for k, v in result.timings.items()),
            "n/a" if result.peak_memory_bytes is None else f"{result.peak_memory_bytes / 2**20:.0f} MiB",
            "n/a" if result.memory_peak_bytes is None else f"{result.memory_peak_bytes / 2**20:.0f} MiB",
            result.memory_plan or "no memory plan",
        )
    return 0


def run_serve(args: argparse.Namespace) -> int:
    """`leansd serve`: check the flags, load the model, serve until SIGINT/SIGTERM."""
    from leansd.errors import InvalidRequestError

    # 1. Refuse unsafe or bad flags before the (slow) model load.
    if not args.model:
        raise InvalidRequestError("no model given: pass --model PATH|owner/name|tiny (or set LEANSD_MODEL)")
    library, model = _library_and_model(args)
    host = "0.0.0.0" if args.listen else args.host
    loopback = is_loopback_host(host)
    if not loopback and not args.api_auth:
        raise InvalidRequestError(
            f"refusing to serve on {host} without authentication: add --api-auth USER:PASS (or bind 127.0.0.1)"
        )
    if not 0 < args.port < 65536:
        raise InvalidRequestError(f"--port must be between 1 and 65535, got {args.port}")
    if args.max_queue < 1:
        raise InvalidRequestError(f"--max-queue must be at least 1, got {args.max_queue}")
    server_options = _server_options(args, host)
    from leansd.frontends.http import parse_credentials, serve

    credentials = parse_credentials(args.api_auth) if args.api_auth else None
    if args.save_images:
        from leansd.outputs.writer import preflight_outdir

        preflight_outdir(Path(args.outdir))

    if args.replicas is not None and args.ray is None:
        raise InvalidRequestError("--replicas is for Ray Serve: add --ray [ADDRESS]")

    # 2. Load the model once (or once per Ray Serve replica), then serve.
    if args.ray is not None:
        from leansd.models.vae_override import resolve_vae
        from leansd.service.ray_serve import start_ray_queue

        # The replicas get the library (LoRAs, embeddings by name) and the --vae choice; the
        # folders must be readable on every node, as the --model path is.
        checkpoint = model if Path(model).expanduser().is_file() else None
        resolve_vae(args.vae, library=library, checkpoint=checkpoint)  # a bad --vae fails before the load
        options = dict(device=args.device, precision=args.precision, prompt_cache=args.prompt_cache,
                       taesd=args.taesd, library=library, **_memory_options(args))
        engine: Any = start_ray_queue(args.ray, model=model, replicas=args.replicas or 1,
                                      engine_options=options, max_queue=args.max_queue, vae=args.vae,
                                      max_job_seconds=server_options["max_job_seconds"])
        model_name = engine.engine.bundle.name
    else:
        engine = _load_engine(args, library, model)
        model_name = engine.bundle.name
    return serve(
        engine, host=host, port=args.port, auth=credentials, max_queue=args.max_queue, max_size=args.max_size,
        save_dir=Path(args.outdir) if args.save_images else None, log_level="info" if args.verbose else "warning",
        on_ready=lambda url: _on_ready(url, model_name, browser=getattr(args, "browser", False)),
        **server_options,
    )


def _library_and_model(args: argparse.Namespace) -> tuple[Any, str]:
    """The model library from the folder flags, and --model resolved: a checkpoint name becomes its path."""
    from leansd.models.library import ModelLibrary
    from leansd.models.loader import TINY_SPEC

    library = ModelLibrary.from_options(
        data_dir=args.data_dir, ckpt_dir=args.ckpt_dir, lora_dir=args.lora_dir, vae_dir=args.vae_dir,
        embeddings_dir=args.embeddings_dir,
    )
    model = args.model
    if model != TINY_SPEC and not Path(model).expanduser().exists():
        entry = library.find_checkpoint(model)
        if entry is not None:
            model = str(entry.path)
    return library, model


def _refiner_path(args: argparse.Namespace, library: Any) -> str | None:
    """--refiner resolved like --model (a file or folder, or a checkpoint name); None without one."""
    from leansd.errors import InvalidRequestError

    if args.refiner is None:
        return None
    if Path(args.refiner).expanduser().exists():
        return str(Path(args.refiner).expanduser())
    entry = library.find_checkpoint(args.refiner)
    if entry is None:
        raise InvalidRequestError(f"--refiner {args.refiner}: no such file or folder, and no checkpoint of that name "
                                  f"in {library.folder('checkpoint')} (--ckpt-dir)")
    return str(entry.path)


def _check_loras(prompts: Sequence[str], library: Any) -> None:
    """Every <lora:NAME:...> of the prompts names one LoRA file (checked before the model loads)."""
    from leansd.prompts.extra_networks import lora_tags

    for prompt in prompts:
        for tag in lora_tags(prompt):
            library.require("lora", tag.name)


def _load_engine(args: argparse.Namespace, library: Any, model: str) -> Any:
    """Load the model once, with the library and the VAE choice."""
    from leansd.engine.engine import Engine
    from leansd.models.vae_override import resolve_vae

    checkpoint = model if Path(model).expanduser().is_file() else None
    resolve_vae(args.vae, library=library, checkpoint=checkpoint)  # a bad --vae fails before the load
    engine = Engine.load(model, device=args.device, precision=args.precision, prompt_cache=args.prompt_cache,
                         taesd=args.taesd, library=library, **_memory_options(args))
    engine.set_vae_choice(args.vae)
    return engine


def _server_options(args: argparse.Namespace, host: str) -> dict:
    """--allowed-hosts, --max-body, --max-job-seconds, --shutdown-timeout, checked before the model loads."""
    import math

    from leansd.engine.planner import parse_size
    from leansd.errors import InvalidRequestError

    allowed = [name.strip() for name in (args.allowed_hosts or "").split(",") if name.strip()]
    if host not in ("0.0.0.0", "::"):
        allowed.append(host)  # the name it was asked to bind answers too
    try:
        max_body = parse_size(args.max_body)
    except InvalidRequestError:
        raise InvalidRequestError(f"--max-body expects a size such as 100M or 1G, got {args.max_body!r}") from None
    if not isinstance(max_body, int) or max_body < 2**20:
        raise InvalidRequestError(f"--max-body must be at least 1M, got {args.max_body!r}")
    seconds = args.max_job_seconds
    if not math.isfinite(seconds) or seconds < 0:
        raise InvalidRequestError(f"--max-job-seconds must be 0 (no limit) or a positive number, got {seconds:g}")
    if not math.isfinite(args.shutdown_timeout) or args.shutdown_timeout < 0:
        raise InvalidRequestError(f"--shutdown-timeout must be a number of seconds >= 0, got {args.shutdown_timeout:g}")
    return {"allowed_hosts": allowed, "max_body": max_body, "max_job_seconds": seconds or None,
            "shutdown_timeout": args.shutdown_timeout}


def is_loopback_host(host: str) -> bool:
    """True when every address `host` resolves to is a loopback address (127.0.0.0/8, ::1).

    The name is resolved, not matched as text: "127.0.0.1.invalid" or "127.evil.example" are names
    that could point anywhere. A name that does not resolve raises InvalidRequestError.
    """
    import ipaddress
    import socket

    from leansd.errors import InvalidRequestError

    text = host.strip("[]")
    try:
        return ipaddress.ip_address(text).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(text, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError) as exc:
        raise InvalidRequestError(f"--host {host}: cannot resolve this name ({exc.strerror if isinstance(exc, OSError) and exc.strerror else exc})") from None
    addresses = {str(info[4][0]).split("%")[0] for info in infos}
    return bool(addresses) and all(ipaddress.ip_address(a).is_loopback for a in addresses)


def _on_ready(url: str, model_name: str, *, browser: bool) -> None:
    """Say where the server is; for `leansd ui`, open the page once the port answers."""
    print(f"leansd: serving {model_name} on {url}/sdapi/v1 and the web UI on {url}/ (Ctrl+C to stop)",
          file=sys.stderr, flush=True)
    if browser:
        import threading

        threading.Thread(target=_open_browser, args=(url + "/",), daemon=True).start()


def _open_browser(url: str, timeout: float = 120.0) -> None:
    import socket
    import time
    import urllib.parse
    import webbrowser

    parts = urllib.parse.urlsplit(url)
    host = "127.0.0.1" if parts.hostname in ("0.0.0.0", "::") else parts.hostname
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, parts.port or 80), timeout=1):
                break
        except OSError:
            time.sleep(0.2)
    webbrowser.open(f"{parts.scheme}://{host}:{parts.port}/" if host != parts.hostname else url)


if __name__ == "__main__":
    sys.exit(main())
