"""`leansd` command line. Flags follow the optimizedSD/CompVis scripts, with friendlier aliases.

Only the standard library is imported at the top so `leansd --help` answers at once; torch and
diffusers load when a command runs.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import NoReturn, Sequence

EXIT_USAGE = 2

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


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="leansd",
        description="Stable Diffusion on the hardware you own (CPU, 2-4 GB GPUs, big GPUs at full speed).",
    )
    parser.add_argument("--version", action="version", version=f"leansd {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    t2i = sub.add_parser(
        "txt2img",
        help="generate images from a text prompt",
        description="Generate images from a text prompt and save them (PNG/JPEG with A1111 metadata).",
    )
    model = t2i.add_argument_group("model")
    model.add_argument(
        "--model", "--ckpt", dest="model", default=os.environ.get("LEANSD_MODEL"), metavar="PATH|ID",
        help="a .safetensors/.ckpt checkpoint, a diffusers folder, a hub id (owner/name, needs network), "
        "or 'tiny' (a random test model that makes noise). Default: $LEANSD_MODEL",
    )
    model.add_argument("--device", default="auto", help="auto (default: CUDA if present, else CPU), cpu, cuda, cuda:N, mps")
    model.add_argument(
        "--precision", default="auto", help="auto (default: full on CPU, fp16 on GPU), full, autocast, fp16, bf16"
    )

    prompt = t2i.add_argument_group("prompt")
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

    gen = t2i.add_argument_group("sampling")
    gen.add_argument("--H", "--height", dest="height", type=_int, help="image height in pixels, multiple of 8 (default: the model's native size, 512 for SD 1.x)")
    gen.add_argument("--W", "--width", dest="width", type=_int, help="image width in pixels, multiple of 8 (default: the model's native size)")
    gen.add_argument("--ddim_steps", "--steps", dest="steps", type=_int, default=50, help="sampling steps (default 50)")
    gen.add_argument("--scale", "--cfg-scale", "--cfg_scale", dest="scale", type=_float, default=7.5, help="classifier-free guidance scale (default 7.5; <= 1 disables guidance)")
    gen.add_argument("--sampler", default="PLMS", help=f"sampler (default PLMS): {SAMPLER_HELP}")
    gen.add_argument("--ddim_eta", "--eta", dest="eta", type=_float, default=0.0, help="DDIM eta, 0 = deterministic (default 0)")
    gen.add_argument("--seed", type=_int, default=None, help="seed of the first image; image k uses seed+k (default: random, printed)")
    gen.add_argument("--n_samples", "--batch-size", "--batch_size", dest="n_samples", type=_int, default=1, help="images per batch (default 1)")
    gen.add_argument("--n_iter", "--n-iter", dest="n_iter", type=_int, default=1, help="number of batches; the model is loaded once (default 1)")
    gen.add_argument("--fixed_code", "--fixed-code", dest="fixed_code", action="store_true", help="reuse the first batch's starting noise for every batch and prompt")

    out = t2i.add_argument_group("output")
    out.add_argument("--outdir", default="outputs/txt2img-samples", help="output folder (default outputs/txt2img-samples)")
    out.add_argument("--format", dest="fmt", choices=("png", "jpg"), default="png", help="image format (default png)")
    out.add_argument("--skip_grid", "--skip-grid", dest="skip_grid", action="store_true", help="do not save a grid of each prompt's images")
    out.add_argument("--skip_save", "--skip-save", dest="skip_save", action="store_true", help="do not save individual images (speed runs)")
    out.add_argument("--verbose", "-v", action="store_true", help="log model, device, precision and timings")
    return parser


def _version() -> str:
    from leansd import __version__

    return __version__


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
    from leansd.errors import LeansdError, one_line

    try:
        if args.command == "txt2img":
            return run_txt2img(args)
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
        if type(exc).__name__ == "OutOfMemoryError":
            print(
                "leansd: error: the GPU ran out of memory; try a smaller --n_samples or --H/--W, or --device cpu",
                file=sys.stderr,
            )
            return 1
        raise
    return EXIT_USAGE


def _read_prompts(args: argparse.Namespace) -> list[str]:
    from leansd.errors import InvalidRequestError

    if args.from_file:
        path = Path(args.from_file)
        try:
            text = path.read_text(encoding="utf-8-sig")  # -sig: a Windows byte-order mark is not a prompt
        except FileNotFoundError:
            raise InvalidRequestError(f"--from-file {path}: no such file") from None
        except IsADirectoryError:
            raise InvalidRequestError(f"--from-file {path}: is a folder, expected a text file") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise InvalidRequestError(f"--from-file {path}: cannot read it ({exc})") from None
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
        if not prompts:
            raise InvalidRequestError(f"--from-file {path}: the file holds no prompts (it is empty)")
        return prompts
    if args.prompt is None:
        raise InvalidRequestError("give a prompt with --prompt TEXT (or --from-file FILE)")
    return [args.prompt]


def run_txt2img(args: argparse.Namespace) -> int:
    from leansd.errors import InvalidRequestError
    from leansd.request import GenerationRequest

    # 1. Validate everything cheap before the (slow) model load.
    if not args.model:
        raise InvalidRequestError("no model given: pass --model PATH|owner/name|tiny (or set LEANSD_MODEL)")
    prompts = _read_prompts(args)
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
            ).validated()
        )
    writer = None
    if not (args.skip_save and args.skip_grid):
        from leansd.outputs.writer import ImageWriter

        # Checks the folder can be made; creates nothing until the first image is written.
        writer = ImageWriter(Path(args.outdir), fmt=args.fmt)

    # 2. Load the model once.
    from leansd.engine.engine import Engine

    engine = Engine.load(args.model, device=args.device, precision=args.precision)
    if random_seed_chosen:
        print(f"leansd: seed {seed} (random)", file=sys.stderr)

    # 3. Generate and save, prompt by prompt.
    show_bar = sys.stderr.isatty()
    for request in requests:
        result = engine.generate(request, progress_bar=show_bar)
        print(f"prompt: {request.prompt!r}  seeds {result.seeds[0]}..{result.seeds[-1]}", file=sys.stderr)
        if writer is not None and not args.skip_save:
            for image, seed, info in zip(result.images, result.seeds, result.infotexts):
                path = writer.save(image, seed=seed, infotext=info)
                print(path)
        if writer is not None and not args.skip_grid and len(result.images) > 1:
            from leansd.outputs.writer import make_grid

            grid = make_grid(result.images, n_rows=request.n_iter)
            print(writer.save_grid(grid, infotext=result.infotexts[0]))
        logging.getLogger("leansd.cli").info(
            "timings: %s; peak device memory: %s",
            ", ".join(f"{k} {v:.2f}s" for k, v in result.timings.items()),
            "n/a" if result.peak_memory_bytes is None else f"{result.peak_memory_bytes / 2**20:.0f} MiB",
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
