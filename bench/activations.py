"""Activation memory measured against the planner's estimates, without a GPU.

    python bench/activations.py                 # full-size SD 1.5 on the meta device, fp16, 512..2048 px
    python bench/activations.py --dtype fp32    # the same at fp32
    python bench/activations.py --tiny          # tiny random model on the CPU (real compute), 64/128 px

Each stage runs once under `leansd.engine.measure.ActivationTracker`: the peak of live tensor bytes
it allocates (CUDA 512-byte blocks; weights and inputs not counted), the CPU-side proxy for
`torch.cuda.max_memory_allocated()` minus the weights. On the meta device full-size models cost
no memory and a forward pass takes well under a second. Attention modes:
- efficient: the allocations of flash / memory-efficient SDPA (CUDA, half precision): no scores;
- math: materialised scores (torch's math SDPA, which upcasts fp16 to fp32);
- chunk N: leansd's ChunkedAttnProcessor(N) over the math path: scores of N queries at a time.
The planner columns call `leansd.engine.planner.unet_activation / vae_activation / text_activation`
for the same request; "est/meas" above 1 means the planner over-estimates. "factor" is the measured
peak in the planner's own units (d = bytes per element, b = UNet batch, N = latent tokens, C = the
first block's width, q = query chunk): UNet efficient / (b*N*C*d) (the planner's 20); UNet math or
chunk / (b*heads*q*N), bytes per score element with the features included (the planner's 2*d); VAE
efficient / (C_vae*d*pixels) (the planner's 16); VAE math / tokens^2 (the planner's d); text /
(77*hidden*d*b) (the planner's 8). Prints markdown; never asserts.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import machine_lines, markdown_table  # noqa: E402

MiB = 2**20
FULL_SIZES = (512, 768, 1024, 1536, 2048)
TINY_SIZES = (64, 128)
FULL_CHUNKS = (4096, 1024)
TINY_CHUNKS = (32, 8)
TEXT_TOKENS = 77


def build_models(tiny: bool, dtype) -> SimpleNamespace:
    """unet, vae, text_encoder, vae_scale_factor, device: what `model_sizes` and the stages need."""
    import torch

    if tiny:
        from tests.helpers import tiny_bundle

        bundle = tiny_bundle()
        models = SimpleNamespace(unet=bundle.unet, vae=bundle.vae, text_encoder=bundle.text_encoder,
                                 vae_scale_factor=bundle.vae_scale_factor, device=torch.device("cpu"))
    else:
        import accelerate
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel

        from leansd.models.configs import SD15_TEXT_CONFIG, SD15_UNET_CONFIG, SD15_VAE_CONFIG

        with accelerate.init_empty_weights(include_buffers=True):
            unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
            vae = AutoencoderKL(**SD15_VAE_CONFIG)
            text_encoder = CLIPTextModel(CLIPTextConfig(**SD15_TEXT_CONFIG))
        scale = 2 ** (len(vae.config.block_out_channels) - 1)
        models = SimpleNamespace(unet=unet, vae=vae, text_encoder=text_encoder, vae_scale_factor=scale,
                                 device=torch.device("meta"))
    for module in (models.unet, models.vae, models.text_encoder):
        module.to(dtype).eval().requires_grad_(False)
    return models


def measure(fn, attention: str) -> int:
    """Peak activation bytes of `fn()` without autograd, `attention` as in leansd.engine.measure."""
    import torch

    from leansd.engine.measure import activation_peak

    with torch.no_grad():
        _, peak = activation_peak(fn, attention=attention)
    return peak


def unet_rows(models, sizes, size: int, dtype, chunks) -> list[list]:
    import torch

    from leansd.engine.attention import ChunkedAttnProcessor
    from leansd.engine.planner import PlanRequest, unet_activation

    unet, dev = models.unet, models.device
    default = dict(unet.attn_processors)
    latent = size // models.vae_scale_factor
    hidden = unet.config.cross_attention_dim
    modes = [("efficient", None), ("math", None)] + [(f"chunk {c}", c) for c in chunks]
    rows = []
    for cfg_batched, b in ((True, 2), (False, 1)):
        sample = torch.zeros(b, unet.config.in_channels, latent, latent, dtype=dtype, device=dev)
        context = torch.zeros(b, TEXT_TOKENS, hidden, dtype=dtype, device=dev)
        for name, chunk in modes:
            if chunk is None:
                unet.set_attn_processor(dict(default))
            else:
                unet.set_attn_processor(ChunkedAttnProcessor(chunk))
            efficient = name == "efficient"
            peak = measure(lambda: unet(sample, 999, encoder_hidden_states=context),  # noqa: B023 - run at once
                           "efficient" if efficient else "math")
            request = PlanRequest(width=size, height=size, batch=1, passes=2, efficient_attention=efficient)
            estimate = unet_activation(sizes, request, cfg_batched=cfg_batched, chunk=chunk)
            n = latent * latent
            if efficient:
                unit = b * n * sizes.unet_channels * dtype.itemsize
            else:
                unit = b * sizes.unet_heads * min(chunk or n, n) * n
            mode = f"{'cfg batched' if cfg_batched else 'cfg split'}, {name}"
            rows.append(["unet", size, mode, b, peak, estimate, peak / unit])
    unet.set_attn_processor(dict(default))
    return rows


def vae_rows(models, sizes, size: int, dtype) -> list[list]:
    import torch

    from leansd.engine.planner import PlanRequest, vae_activation

    vae, dev = models.vae, models.device
    latent = size // models.vae_scale_factor
    z = torch.zeros(1, vae.config.latent_channels, latent, latent, dtype=dtype, device=dev)
    image = torch.zeros(1, vae.config.in_channels, size, size, dtype=dtype, device=dev)
    rows = []
    for attention in ("efficient", "math"):
        request = PlanRequest(width=size, height=size, efficient_attention=attention == "efficient")
        estimate = vae_activation(sizes, request, tile=None)
        unit = sizes.vae_channels * dtype.itemsize * size * size if attention == "efficient" else latent**4
        for stage, fn in (("vae decode", lambda: vae.decode(z)), ("vae encode", lambda: vae.encode(image))):
            peak = measure(fn, attention)
            rows.append([stage, size, attention, 1, peak, estimate, peak / unit])
    return rows


def tiled_vae_rows(models, sizes, size: int, dtype) -> list[list]:
    """leansd's exact tiles (tile = a quarter of the side) as on a GPU: crops copied to the device,
    maps in host memory. The planner column leaves out the decoded image brought back to the device."""
    import torch

    from leansd.engine.measure import ActivationTracker, host_store_runner
    from leansd.engine.planner import PlanRequest, vae_activation
    from leansd.engine.tiled_vae import tiled_decode, tiled_encode

    vae, dev = models.vae, models.device
    tile = max(64, size // 4)
    latent = size // models.vae_scale_factor
    z = torch.zeros(1, vae.config.latent_channels, latent, latent, dtype=dtype, device=dev)
    image = torch.zeros(1, vae.config.in_channels, size, size, dtype=dtype, device=dev)
    rows = []
    for attention in ("efficient", "math"):
        efficient = attention == "efficient"
        request = PlanRequest(width=size, height=size, efficient_attention=efficient)
        estimate = vae_activation(sizes, request, tile=tile) - 3 * size * size * (dtype.itemsize + 4)
        unit = sizes.vae_channels * tile * tile
        for stage, run in (("vae decode", tiled_decode), ("vae encode", tiled_encode)):
            tracker = ActivationTracker(attention=attention)
            with torch.no_grad(), tracker:
                run(vae, z if run is tiled_decode else image, tile, efficient_attention=efficient,
                    runner_type=host_store_runner(tracker))
            rows.append([f"{stage} tiled {tile}px", size, attention, 1, tracker.peak, estimate, tracker.peak / unit])
    return rows


def text_rows(models, sizes, dtype) -> list[list]:
    import torch

    from leansd.engine.planner import PlanRequest, text_activation

    ids = torch.zeros(2, TEXT_TOKENS, dtype=torch.long, device=models.device)
    estimate = text_activation(sizes, PlanRequest(width=512, height=512, passes=2))
    unit = TEXT_TOKENS * sizes.text_hidden * dtype.itemsize * 2
    rows = []
    for attention in ("efficient", "math"):
        peak = measure(lambda: models.text_encoder(ids), attention)
        rows.append(["text", "-", attention, 2, peak, estimate, peak / unit])
    return rows


def mib(n: int) -> str:
    return f"{n / MiB:.1f}" if n >= MiB else f"{n / MiB:.3f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true",
                        help="the tiny random model on the CPU instead of SD 1.5 on meta")
    parser.add_argument("--dtype", choices=("fp16", "fp32"), default=None,
                        help="default: fp16 (full size, meta), fp32 (tiny, CPU)")
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="square image sides in pixels")
    args = parser.parse_args(argv)

    import torch
    from diffusers.utils import logging as diffusers_logging

    from leansd.engine.memory import model_sizes

    diffusers_logging.set_verbosity_error()  # not the "cast with to()" advice for every module

    dtype_name = args.dtype or ("fp32" if args.tiny else "fp16")
    dtype = {"fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    sizes_px = args.sizes or (TINY_SIZES if args.tiny else FULL_SIZES)
    chunks = TINY_CHUNKS if args.tiny else FULL_CHUNKS
    t0 = time.perf_counter()
    models = build_models(args.tiny, dtype)
    sizes = model_sizes(models, dtype_bytes=dtype.itemsize)
    rows = text_rows(models, sizes, dtype)
    for size in sizes_px:
        rows += unet_rows(models, sizes, size, dtype, chunks)
    for size in sizes_px:
        rows += vae_rows(models, sizes, size, dtype)
        if not args.tiny and size >= 1024:
            rows += tiled_vae_rows(models, sizes, size, dtype)
    seconds = time.perf_counter() - t0

    table = [[stage, size, mode, b, mib(peak), mib(est), f"{est / peak:.2f}" if peak else "-", f"{factor:.2f}"]
             for stage, size, mode, b, peak, est, factor in rows]
    model = "tiny random SD1-shaped model, CPU" if args.tiny else "SD 1.5 architecture, meta device"
    print(f"## Activation peaks measured vs planned: {model}, {dtype_name}, batch 1 image\n")
    print(machine_lines())
    print(f"- measured: leansd.engine.measure (live tensor bytes, 512-byte blocks, weights/inputs excluded); "
          f"{seconds:.1f} s in all")
    print("- chunks: ChunkedAttnProcessor over the math path; planner for the same chunk")
    print("- tiled rows: leansd's exact tiled VAE as on a GPU (crops copied to the device, layer maps in host"
          " memory); planner without the decoded image; factor = bytes per element of C_vae x tile^2\n")
    headers = ["stage", "size", "mode", "batch", "measured MiB", "planner MiB", "est/meas", "factor"]
    print(markdown_table(headers, table))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
