"""Tiled VAE decode: leansd's exact layer-by-layer tiles against diffusers' overlapping tiles.

    python bench/vae_tiles.py                    # CPU: SD VAE architecture, random weights, 256x256
    python bench/vae_tiles.py --size 1024 --tiles 512,256 --device cuda --precision fp16

For each mode: max and mean |difference| to the whole-image decode (pixels in [-1, 1]), seconds,
and on CUDA the peak allocated memory. Prints a markdown table; never asserts. Random weights have
the real layer shapes and cost; a random VAE amplifies differences more than a trained one.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import machine_lines, markdown_table  # noqa: E402

MiB = 2**20


def build_vae(dtype, device):
    import torch
    from diffusers import AutoencoderKL

    from leansd.models.configs import SD15_VAE_CONFIG

    torch.manual_seed(0)
    return AutoencoderKL(**SD15_VAE_CONFIG).eval().to(device=device, dtype=dtype)


def smooth_latents(size: int, device, dtype):
    import torch

    g = torch.Generator().manual_seed(0)
    coarse = torch.randn((1, 4, 6, 6), generator=g)
    z = torch.nn.functional.interpolate(coarse, size=(size // 8, size // 8), mode="bicubic", align_corners=True)
    return z.to(device=device, dtype=dtype)


def timed(device, fn):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()  # why: start the clock and the peak with an idle device
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()  # why: kernels run asynchronously; wait before reading the clock
        return out, time.perf_counter() - t0, torch.cuda.max_memory_allocated()
    return out, time.perf_counter() - t0, None


def main(argv: list[str] | None = None) -> int:
    import torch

    from leansd.engine.tiled_vae import tiled_decode
    from leansd.engine.vae import store_for, vae_tiling

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--tiles", default="128,64", help="tile sides in pixels, comma-separated")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=["full", "fp16"], default="full")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtype = torch.float16 if args.precision == "fp16" else torch.float32
    vae = build_vae(dtype, device)
    z = smooth_latents(args.size, device, dtype)
    rows = []
    with torch.inference_mode():
        whole, seconds, peak = timed(device, lambda: vae.decode(z, return_dict=False)[0])
        rows.append(["whole image", "-", "-", f"{seconds:.2f}", "-" if peak is None else f"{peak / MiB:.0f}"])
        for tile in [int(t) for t in args.tiles.split(",")]:
            ours, seconds, peak = timed(device, lambda: tiled_decode(vae, z, tile, store=store_for(device)).to(device))  # noqa: B023 - timed() runs it at once
            diff = (ours.float() - whole.float()).abs()
            rows.append([f"leansd exact tiles {tile}px", f"{float(diff.max()):.2e}", f"{float(diff.mean()):.2e}",
                         f"{seconds:.2f}", "-" if peak is None else f"{peak / MiB:.0f}"])

            def theirs(tile=tile):
                with vae_tiling(vae, tile, scale=8):
                    return vae.decode(z, return_dict=False)[0]

            out, seconds, peak = timed(device, theirs)
            diff = (out.float() - whole.float()).abs()
            rows.append([f"diffusers tiles {tile}px (25 % overlap)", f"{float(diff.max()):.2e}", f"{float(diff.mean()):.2e}",
                         f"{seconds:.2f}", "-" if peak is None else f"{peak / MiB:.0f}"])
    print(f"## Tiled VAE decode: SD VAE architecture (random weights), {args.size}x{args.size}, {args.precision}\n")
    print(machine_lines())
    print()
    print(markdown_table(["mode", "max abs diff to whole", "mean abs diff", "s", "peak alloc MiB"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
