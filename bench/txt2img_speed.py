"""txt2img speed: leansd's Engine vs diffusers' StableDiffusionPipeline on the very same modules.

    python bench/txt2img_speed.py [--size 512] [--steps 4] [--sampler "Euler a"]
                                  [--precision full,bf16] [--repeats 1] [--device auto]

Both sides run the same full-size SD 1.5 RANDOM-weight module objects (`bench.common`), on the
same device in the same dtype, with a scheduler built by `leansd.sampling.samplers.build_scheduler`
from the same config, and with the same per-image CPU generators (seed, seed + 1, ...). So the
pictures must agree (up to floating-point noise), and the timing ratio isolates what each
pipeline adds around the models. The order alternates between runs (leansd first, then diffusers
first, ...), and each side first makes one 64x64 1-step image (not timed) to warm up.

Precisions: `full` (fp32) and `bf16` (weights and activations in bfloat16; diffusers gets the
same bf16 modules). Where the CPU has no native bf16 (no avx512_bf16 / AMX) bf16 matmuls are
emulated and 50-100x slower than fp32; the default list then skips bf16 with a note. Name it
explicitly (`--precision bf16`) to run it anyway. `fp16` is accepted for GPU runs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    PROMPT,
    OtherLoad,
    build_sd15_components,
    machine_lines,
    markdown_table,
    sd15_bundle,
    wait_until_quiet,
)

if TYPE_CHECKING:
    import numpy as np
    import torch
    from diffusers import SchedulerMixin, StableDiffusionPipeline

    from leansd.models.bundle import ModelBundle
    from leansd.request import GenerationRequest

PRECISIONS = ("full", "bf16", "fp16")
DEFAULT_PRECISIONS = ("full", "bf16")
EMULATED_SLOWDOWN = 3.0  # bf16 matmul this much slower than fp32 means "emulated"


def bf16_slowdown(device: torch.device) -> float:
    """How many times slower a 1024^2 bf16 matmul is than fp32 on `device` (~0.5 where native)."""
    import torch

    def timed(dtype: torch.dtype) -> float:
        a = torch.randn(1024, 1024, device=device).to(dtype)
        a @ a
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(3):
            a @ a
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    return timed(torch.bfloat16) / timed(torch.float32)


def diffusers_pipeline(bundle: ModelBundle, scheduler: SchedulerMixin) -> StableDiffusionPipeline:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=bundle.vae,
        text_encoder=bundle.text_encoder,
        tokenizer=bundle.tokenizer,
        unet=bundle.unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_diffusers(bundle: ModelBundle, request: GenerationRequest, seeds: list[int]) -> np.ndarray:
    """diffusers' own pipeline, with a fresh scheduler and fresh per-image generators, as leansd uses."""
    import torch

    from leansd.sampling.samplers import build_scheduler

    pipe = diffusers_pipeline(bundle, build_scheduler(request.sampler, bundle.scheduler_config, seeds=seeds))
    return pipe(
        prompt=request.prompt,
        negative_prompt=request.negative_prompt or None,
        height=request.height,
        width=request.width,
        num_inference_steps=request.num_inference_steps,
        guidance_scale=request.guidance_scale,
        eta=request.eta,
        num_images_per_prompt=len(seeds),
        generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
        output_type="np",
    ).images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=512, help="width = height in pixels (default 512)")
    parser.add_argument("--steps", type=int, default=4, help="sampling steps (default 4)")
    parser.add_argument("--sampler", default="Euler a", help='sampler name (default "Euler a")')
    parser.add_argument("--guidance", type=float, default=7.5, help="CFG scale (default 7.5: two UNet passes a step)")
    parser.add_argument("--batch-size", type=int, default=1, help="images per call (default 1)")
    parser.add_argument(
        "--precision",
        default=None,
        help="comma list of full, bf16, fp16 (default: full,bf16; bf16 skipped where the CPU emulates it)",
    )
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per side and precision (default 1)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default auto)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=60.0,
        help="before each timed run, wait up to this many seconds for other processes to go idle (default 60)",
    )
    args = parser.parse_args()

    explicit = args.precision is not None
    precisions = [p.strip() for p in (args.precision or ",".join(DEFAULT_PRECISIONS)).split(",") if p.strip()]
    bad = [p for p in precisions if p not in PRECISIONS]
    if bad or not precisions:
        parser.error(f"unknown precision {bad}; valid: {', '.join(PRECISIONS)}")
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")

    import numpy as np
    import torch

    from leansd.engine.device import resolve_device
    from leansd.engine.engine import Engine
    from leansd.request import GenerationRequest

    device = resolve_device(args.device)
    notes: list[str] = []
    if "bf16" in precisions:
        slowdown = bf16_slowdown(device)
        if slowdown > EMULATED_SLOWDOWN:
            message = (
                f"bf16 on this {device.type} is emulated: a 1024x1024 bf16 matmul is {slowdown:.0f}x slower "
                "than fp32"
            )
            if explicit:
                notes.append(message + "; run anyway (--precision bf16 named)")
            else:
                notes.append(message + "; bf16 skipped (name it in --precision to run it)")
                precisions.remove("bf16")

    print("building full-size random SD 1.5 modules ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    bundle = sd15_bundle(build_sd15_components(seed=0))
    notes.append(f"random SD 1.5 modules built in {time.perf_counter() - t0:.0f} s (not timed below)")

    request = GenerationRequest(
        prompt=PROMPT,
        width=args.size,
        height=args.size,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        sampler=args.sampler,
        seed=args.seed,
        batch_size=args.batch_size,
    ).validated()
    seeds = request.image_seeds()
    warmup = GenerationRequest(
        prompt=PROMPT, width=64, height=64, num_inference_steps=1, guidance_scale=args.guidance,
        sampler=request.sampler, seed=args.seed,
    ).validated()

    rows = []
    run_index = 0
    for precision in precisions:
        # Casts the shared modules in place: diffusers then runs the very same tensors.
        engine = Engine(bundle, device=str(device), precision=precision)
        print(f"{precision}: warm-up ...", file=sys.stderr, flush=True)
        engine.generate(warmup, progress_bar=False)
        run_diffusers(bundle, warmup, warmup.image_seeds())

        times: dict[str, list[float]] = {"leansd": [], "diffusers": []}
        loads: dict[str, list[float | None]] = {"leansd": [], "diffusers": []}
        stages: list[dict[str, float]] = []
        ours = ref = None
        for _ in range(args.repeats):
            order = ("leansd", "diffusers") if run_index % 2 == 0 else ("diffusers", "leansd")
            run_index += 1
            for side in order:
                wait_until_quiet(max_seconds=args.wait_quiet)
                print(f"{precision}: {side} ...", file=sys.stderr, flush=True)
                meter = OtherLoad()
                meter.start()
                t0 = time.perf_counter()
                if side == "leansd":
                    result = engine.generate(request, progress_bar=False)
                    ours = result.pixels
                    stages.append(result.timings)
                else:
                    ref = run_diffusers(bundle, request, seeds)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times[side].append((time.perf_counter() - t0) / len(seeds))
                loads[side].append(meter.stop())
        best = {side: min(range(len(t)), key=t.__getitem__) for side, t in times.items()}
        lean, diff = times["leansd"][best["leansd"]], times["diffusers"][best["diffusers"]]
        best_loads = [loads[side][best[side]] for side in times if loads[side][best[side]] is not None]
        median_ratio = statistics.median(times["leansd"]) / statistics.median(times["diffusers"])
        pixel_diff = float(np.abs(np.asarray(ours, dtype=np.float32) - np.asarray(ref, dtype=np.float32)).max())
        rows.append([
            precision,
            f"{args.size}x{args.size}",
            str(args.steps),
            request.sampler,
            f"{lean:.1f}",
            f"{diff:.1f}",
            f"{lean / diff:.3f}",
            f"{median_ratio:.3f}",
            f"{pixel_diff:.2e}",
            f"{float(np.std(ref)):.3f}",
            *(f"{stages[best['leansd']][k]:.1f}" for k in ("encode", "sample", "decode")),
            f"{max(best_loads):.2f}" if best_loads else "-",
        ])

        def fmt(side: str) -> str:
            return ", ".join(
                f"{t:.1f}" + ("" if load is None else f" (other load {load:.2f})")
                for t, load in zip(times[side], loads[side], strict=True)  # noqa: B023 - fmt() runs in this iteration
            )

        notes.append(f"{precision}: seconds per image, every run in order: leansd {fmt('leansd')}; "
                     f"diffusers {fmt('diffusers')}")

    headers = [
        "precision", "size", "steps", "sampler", "leansd s/img (best)", "diffusers s/img (best)",
        "leansd/diffusers (best)", "leansd/diffusers (median)", "max abs pixel diff", "image std",
        "leansd encode s", "leansd sample s", "leansd decode s", "other load (cores)",
    ]
    print("## txt2img speed: leansd vs diffusers, same SD 1.5 modules (random weights)\n")
    print(machine_lines() + "\n")
    print(f"- device: {device}; prompt {PROMPT!r}, CFG {args.guidance}, batch {args.batch_size}, "
          f"seeds {seeds}, repeats {args.repeats}, order alternating; best = fastest run of each side\n")
    print(markdown_table(headers, rows) + "\n")
    for note in notes:
        print(f"- {note}")
    print("- pixel diff: float RGB in [0, 1], leansd's `pixels` vs diffusers' `output_type=\"np\"` images;"
          " image std: the spread of diffusers' pixels (a diff of 0 between flat images would mean nothing).")
    print("- other load: cores other processes kept busy during a timed run (0 = quiet machine); in the table,"
          " the larger of the two best runs'. Stage timings are those of leansd's best run.")


if __name__ == "__main__":
    main()
