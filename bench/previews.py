"""Live preview overhead per sampling step, and TAESD against the full VAE as the final decoder.

    python bench/previews.py                 # CPU: SD 1.5 architecture (random weights), 512x512
    python bench/previews.py --size 256 --repeats 2
    python bench/previews.py --device cuda --precision fp16 --steps 10

Part 1 runs the real loop (SD 1.5 UNet, CFG batch 2, Euler) and after each step times one preview of
each kind from that step's state (x0 estimate + decode + 8-bit image, and separately the PNG
encoding the HTTP API adds); step times exclude the preview work, so both see the same load. The overhead per step at
an interval of N steps is preview seconds / (N x step seconds); the default interval is
`leansd.request.DEFAULT_PREVIEW_EVERY`. Part 2 decodes the same latents with the SD VAE (full
size) and TAESD (`AutoencoderTiny`, published architecture), interleaved, and prints the ratio.
All weights are seeded random: the costs are real, the pictures are noise. Prints markdown tables;
never asserts.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import build_sd15_components, machine_lines, markdown_table, sd15_bundle  # noqa: E402


def build_taesd():
    import torch
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    return AutoencoderTiny().eval().requires_grad_(False)  # madebyollin/taesd's architecture


def main(argv: list[str] | None = None) -> int:
    from leansd.engine.engine import Engine
    from leansd.engine.previews import Previewer
    from leansd.pipelines.steps import decode_latents
    from leansd.request import DEFAULT_PREVIEW_EVERY, GenerationRequest
    from leansd.sampling.loop import StepState

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=2, help="loop steps timed (one more runs first, not counted)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each final decoder")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="full", help="full, fp16, bf16, autocast (leansd's precisions)")
    args = parser.parse_args(argv)

    engine = Engine(sd15_bundle(build_sd15_components()), device=args.device, precision=args.precision,
                    prompt_cache=False, taesd=build_taesd())
    side = args.size

    # Part 1: the real loop (SD 1.5 UNet, CFG batch 2, Euler); after each step, one preview of each
    # kind from that step's state (x0 + decode + 8-bit image, then PNG encoding) is timed. The step
    # times exclude the preview work, so steps and previews interleave under the same machine load.
    from leansd.pipelines.steps import encode_conditioning, loop_length, make_scheduler, noise_for, run_denoise
    from leansd.sampling.noise import image_generators

    methods = ("approx-cheap", "taesd", "full")
    previewers = {m: Previewer(engine, GenerationRequest(prompt="x", preview_every=1, preview_method=m).validated())
                  for m in methods}
    request = GenerationRequest(prompt="a lighthouse", sampler="Euler", seed=1, width=side, height=side,
                                num_inference_steps=args.steps + 1).validated()
    text = encode_conditioning(engine, request, steps=loop_length(engine, request, steps=request.num_inference_steps))
    generators = image_generators([1])
    scheduler = make_scheduler(engine, request, seeds=[1], steps=request.num_inference_steps)
    start = noise_for(engine, generators, width=side, height=side) * scheduler.init_noise_sigma
    step_s: list[float] = []
    preview_s: dict[str, list[float]] = {m: [] for m in methods}
    png_s: dict[str, list[float]] = {m: [] for m in methods}
    sizes: dict[str, tuple[int, int]] = {}
    last = [time.perf_counter()]

    def on_step(state: StepState) -> None:
        engine.synchronize()  # why: CUDA runs asynchronously; the step's kernels must be done
        step_s.append(time.perf_counter() - last[0])
        if state.step > 1:  # the first step warms up (allocator, kernels): not counted
            for m in methods:
                t0 = time.perf_counter()
                image = previewers[m](state)
                t1 = time.perf_counter()
                image.save(io.BytesIO(), format="PNG")
                preview_s[m].append(t1 - t0)
                png_s[m].append(time.perf_counter() - t1)
                sizes[m] = image.size
        engine.synchronize()  # why: no preview work may spill into the next step's time
        last[0] = time.perf_counter()

    latents = run_denoise(engine, request, scheduler=scheduler, latents=start, generators=generators, text=text,
                          on_step=on_step)
    step_seconds = statistics.median(step_s[1:])
    rows = []
    for m in methods:
        seconds = statistics.median(preview_s[m])
        png = statistics.median(png_s[m])
        size = sizes[m]
        rows.append([m, f"{size[0]}x{size[1]}", f"{seconds:.4f}", f"{png:.4f}", f"{step_seconds:.2f}",
                     f"{100 * (seconds + png) / (DEFAULT_PREVIEW_EVERY * step_seconds):.3f} %",
                     f"{100 * (seconds + png) / step_seconds:.2f} %"])

    # Part 2: final decode of the loop's latents, full VAE vs TAESD, interleaved.
    decode = {"full": [], "taesd": []}
    for _ in range(args.repeats):
        for name in decode:
            t0 = time.perf_counter()
            decode_latents(engine, latents, decoder=name)
            decode[name].append(time.perf_counter() - t0)
    full, tiny = statistics.median(decode["full"]), statistics.median(decode["taesd"])

    where = f"{engine.device.type} {engine.precision.name}"
    print(f"## Live preview overhead: SD 1.5 architecture (random weights), {side}x{side}, {where}, CFG batch 2\n")
    print(machine_lines())
    print(f"- loop steps timed: {len(step_s) - 1} (medians; previews timed after each)\n")
    print(markdown_table(
        ["preview", "image", "preview s", "PNG encode s", "loop step s",
         f"overhead per step, every {DEFAULT_PREVIEW_EVERY} (default)", "overhead, every step"], rows))
    print(f"\n## Final decode: SD VAE vs TAESD, {side}x{side}, {where}, batch 1\n")
    print(markdown_table(
        ["decoder", "runs (s)", "median s", "vs full VAE"],
        [["full VAE (AutoencoderKL)", ", ".join(f"{s:.2f}" for s in decode["full"]), f"{full:.2f}", "1.00"],
         ["TAESD (AutoencoderTiny)", ", ".join(f"{s:.3f}" for s in decode["taesd"]), f"{tiny:.3f}",
          f"{tiny / full:.3f} ({full / tiny:.0f}x faster)"]]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
