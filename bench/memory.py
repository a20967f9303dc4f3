"""Memory modes side by side: leansd's budgets against diffusers' offload modes, in ONE run.

    python bench/memory.py                      # GPU: full-size SD 1.5 (random weights), 512x512, fp16, 20 steps
    python bench/memory.py --family sdxl --steps 4      # GPU: full-size SDXL base, 1024x1024
    python bench/memory.py --family sd2 --steps 6       # GPU: full-size SD 2.1 (768-v), 768x768
    python bench/memory.py --tiny --size 64 --steps 4   # CPU: tiny model, virtual budgets (accounted peaks)
    python bench/memory.py --plot docs/memory.png       # also draw s/step against peak memory

Prints a markdown table; never asserts. On the CPU the budgets are virtual (the engine accounts
as if the CPU were the budgeted device) and diffusers' modes are reported as "needs CUDA".
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import machine_lines, markdown_table  # noqa: E402

MiB = 2**20
GPU_BUDGETS = {  # per family: the budgets around its target (SD 2.1 under 2G, SDXL under 4G)
    "sd1": ("none", "4G", "2G", "1.5G", "1G", "750M", "500M", "minimum"),
    "sd2": ("none", "4G", "2G", "1G", "minimum"),
    "sdxl": ("none", "8G", "4G", "3G", "2G", "minimum"),
}
NATIVE = {"sd1": 512, "sd2": 768, "sdxl": 1024}
SEARCH_SIZES = {"sd1": (1024, 1536, 2048, 3072), "sd2": (1024, 1536, 2048), "sdxl": (1024, 1536, 2048)}
"""Square sides tried under the 4 GiB cap, smallest first."""
LABELS = {"sd1": "SD 1.5", "sd2": "SD 2.1 (768-v)", "sdxl": "SDXL base"}


def build_bundle(tiny: bool, dtype, family: str = "sd1"):
    if tiny:
        if family == "sd1":
            from tests.helpers import tiny_bundle

            return tiny_bundle()
        import tempfile

        from leansd.models.family import ModelFamily
        from leansd.models.loader import load_model
        from leansd.models.tiny import write_tiny_single_file

        with tempfile.TemporaryDirectory() as folder:
            path = write_tiny_single_file(Path(folder) / f"tiny-{family}.safetensors", family=ModelFamily(family))
            return load_model(str(path))
    from bench.common import family_bundle

    return family_bundle(family, dtype=dtype)


def request_for(args):
    from leansd import GenerationRequest

    return GenerationRequest(prompt="a lighthouse at dusk", num_inference_steps=args.steps, guidance_scale=7.5,
                             seed=1, width=args.size, height=args.size)


def h2d_bandwidth() -> float | None:
    """Pinned host -> device copy bandwidth in bytes/s (CUDA only)."""
    import torch

    if not torch.cuda.is_available():
        return None
    host = torch.empty(256 * MiB, dtype=torch.uint8).pin_memory()
    dev = torch.empty_like(host, device="cuda")
    dev.copy_(host, non_blocking=True)
    torch.cuda.synchronize()  # why: exclude the first (warm-up) copy from the timing
    t0 = time.perf_counter()
    for _ in range(5):
        dev.copy_(host, non_blocking=True)
    torch.cuda.synchronize()  # why: the copies are asynchronous; wait before reading the clock
    return 5 * host.numel() / (time.perf_counter() - t0)


def budgets_for(args, engine) -> list[str | int | None]:
    """GPU: the issue's budgets. CPU/tiny: fractions of the all-resident peak, then the minimum."""
    from leansd.engine.planner import PlanRequest, candidate_plans
    from leansd.engine.tiled_vae import efficient_sdpa

    request = PlanRequest(width=args.size, height=args.size, efficient_attention=efficient_sdpa(engine.device))
    plans = [p for _, p in candidate_plans(engine.sizes, request, None)]
    resident = max(p.peak for p in plans)
    minimum = min(p.peak for p in plans)
    if args.tiny or engine.device.type == "cpu":
        return [None] + [int(resident * f / 0.9) for f in (0.8, 0.6, 0.45)] + [minimum]
    return [None if b == "none" else (minimum if b == "minimum" else b) for b in GPU_BUDGETS[args.family]]


def run_leansd(args, bundle_factory, budget, *, turbo: bool, bandwidth):
    import torch

    from leansd import Engine
    from leansd.errors import InvalidRequestError

    device = "cuda" if torch.cuda.is_available() else "cpu"
    precision = args.precision or ("fp16" if device == "cuda" else "full")
    try:
        engine = Engine(bundle_factory(), device=device, precision=precision, prompt_cache=False, vram=budget,
                        turbo=turbo, virtual_device=device == "cpu")
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        engine.generate(request_for(args), progress_bar=False)  # warm-up (and the prompt encode)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        result = engine.generate(request_for(args), progress_bar=False)
    except InvalidRequestError as exc:
        return {"error": str(exc).split(";")[0]}
    plan = engine.plan
    calls = 1 if plan.cfg_batched else 2
    streamed = plan.streamed_bytes_per_step * calls
    return {
        "allocated": torch.cuda.max_memory_allocated() if device == "cuda" else None,
        "reserved": torch.cuda.max_memory_reserved() if device == "cuda" else None,
        "accounted": result.memory_peak_bytes,
        "s_step": result.timings["sample"] / args.steps,
        "s_image": result.timings["total"],
        "streamed": streamed,
        "bound": streamed / bandwidth if bandwidth and streamed else None,
        "plan": f"{plan.placement}, {'cfg x1' if plan.cfg_batched else 'cfg x2'}, "
        f"attn {plan.attention_chunk or 'full'}, VAE {'cpu' if plan.vae_on_cpu else plan.vae_tile or 'whole'}",
    }


def run_diffusers(args, bundle_factory, mode: str):
    import torch

    if not torch.cuda.is_available():
        return {"error": "needs CUDA"}
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.hooks import apply_group_offloading

    from leansd.sampling.samplers import build_scheduler

    b = bundle_factory()
    scheduler = build_scheduler("Euler a", b.scheduler_config, seeds=[1])
    if b.text_encoder_2 is not None:  # SDXL: both text encoders, pooled embedding and size ids
        pipe = StableDiffusionXLPipeline(vae=b.vae, text_encoder=b.text_encoder, text_encoder_2=b.text_encoder_2,
                                         tokenizer=b.tokenizer, tokenizer_2=b.tokenizer_2, unet=b.unet,
                                         scheduler=scheduler)
    else:
        pipe = StableDiffusionPipeline(vae=b.vae, text_encoder=b.text_encoder, tokenizer=b.tokenizer, unet=b.unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipe.to(torch.float16)
    pipe.set_progress_bar_config(disable=True)
    if mode == "model_cpu_offload":
        pipe.enable_model_cpu_offload()
    elif mode == "sequential_cpu_offload":
        pipe.enable_sequential_cpu_offload()
    else:
        for module in (pipe.unet, *b.text_encoders, pipe.vae):
            apply_group_offloading(module, onload_device=torch.device("cuda"), offload_type="block_level",
                                   num_blocks_per_group=1, use_stream=True)
    kwargs = dict(prompt="a lighthouse at dusk", num_inference_steps=args.steps, height=args.size, width=args.size)
    pipe(**kwargs)
    torch.cuda.synchronize()  # why: finish the warm-up before resetting the counters and the clock
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    pipe(**kwargs)
    torch.cuda.synchronize()  # why: the pipeline's kernels run asynchronously; wait before reading the clock
    total = time.perf_counter() - t0
    return {"allocated": torch.cuda.max_memory_allocated(), "reserved": torch.cuda.max_memory_reserved(),
            "s_step": total / args.steps, "s_image": total, "plan": mode}


def largest_under_cap(args, bundle_factory) -> str:
    import torch

    if not torch.cuda.is_available():
        return "needs CUDA"
    from leansd import Engine

    torch.cuda.set_per_process_memory_fraction(4 * 2**30 / torch.cuda.get_device_properties(0).total_memory)
    done = []
    for size in SEARCH_SIZES[args.family]:
        try:
            engine = Engine(bundle_factory(), device="cuda", precision="fp16", prompt_cache=False, vram="3.5G")
            engine.generate(request_for(argparse.Namespace(**{**vars(args), "size": size, "steps": 2})),
                            progress_bar=False)
            done.append(size)
        except Exception as exc:  # noqa: BLE001 - a benchmark reports, never stops
            return f"{done[-1] if done else 'none'} (at {size}: {type(exc).__name__})"
    return str(done[-1])


def mb(n) -> str:
    return "-" if n is None else f"{n / MiB:.0f}"


def main(argv: list[str] | None = None) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="the tiny random model instead of the full-size one")
    parser.add_argument("--family", choices=tuple(NATIVE), default="sd1",
                        help="sd1 (SD 1.5, default), sd2 (SD 2.1 768-v) or sdxl (SDXL base): full-size, random weights")
    parser.add_argument("--size", type=int, default=None, help="square side (default: the family's native size)")
    parser.add_argument("--modes", default="model_cpu_offload,sequential_cpu_offload,group_offloading_streams",
                        help="diffusers' offload modes to compare, comma-separated")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--precision", default=None, help="default: fp16 on CUDA, full on the CPU")
    parser.add_argument("--plot", metavar="PNG", help="write s/step against peak memory to this PNG")
    args = parser.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = sorted(set(modes) - {"model_cpu_offload", "sequential_cpu_offload", "group_offloading_streams"})
    if unknown:
        parser.error(f"unknown --modes {', '.join(unknown)}; valid: model_cpu_offload, sequential_cpu_offload, "
                     "group_offloading_streams")
    if args.size is None:
        args.size = 64 if args.tiny else NATIVE[args.family]

    cuda = torch.cuda.is_available()
    dtype = torch.float16 if cuda else torch.float32
    bundle = build_bundle(args.tiny, dtype, args.family)
    cache = {"bundle": bundle}

    def factory():
        import copy

        return copy.deepcopy(cache["bundle"]) if args.tiny else cache["bundle"]

    from leansd import Engine

    probe = Engine(factory(), device="cuda" if cuda else "cpu", precision=args.precision or ("fp16" if cuda else "full"),
                   prompt_cache=False, vram=None)
    bandwidth = h2d_bandwidth()
    rows, points = [], []
    base = None
    budgets = budgets_for(args, probe)
    del probe
    for i, budget in enumerate(budgets):
        label = "none" if budget is None else (budget if isinstance(budget, str) else f"{budget / MiB:.1f}M")
        if i == len(budgets) - 1:
            label = f"minimum ({label})"
        r = run_leansd(args, factory, budget, turbo=i == len(budgets) - 1, bandwidth=bandwidth)
        if "error" in r:
            rows.append([f"leansd {label}", r["error"]] + ["-"] * 8)
            continue
        base = base or r["s_step"]
        rows.append([f"leansd {label}", mb(r["allocated"]), mb(r["reserved"]), mb(r["accounted"]),
                     f"{r['s_step']:.3f}", f"{r['s_image']:.2f}", f"{r['s_step'] / base:.2f}x",
                     f"{r['streamed'] / 2**30:.2f}", "-" if r["bound"] is None else f"{r['bound']:.3f}", r["plan"]])
        points.append(("leansd", r["allocated"] or r["accounted"], r["s_step"], r["bound"]))
    for mode in modes:
        r = run_diffusers(args, factory, mode)
        if "error" in r:
            rows.append([f"diffusers {mode}", r["error"]] + ["-"] * 8)
            continue
        rows.append([f"diffusers {mode}", mb(r["allocated"]), mb(r["reserved"]), "-", f"{r['s_step']:.3f}",
                     f"{r['s_image']:.2f}", f"{r['s_step'] / base:.2f}x" if base else "-", "-", "-", mode])
        points.append(("diffusers", r["allocated"], r["s_step"], None))
    headers = ["mode / budget", "peak alloc MiB", "peak reserved MiB", "accounted MiB", "s/step", "s/image",
               "vs resident", "GB streamed/step", "stream bound s", "plan"]
    model = (f"tiny random {LABELS[args.family]}-shaped model" if args.tiny
             else f"{LABELS[args.family]} architecture, random weights")
    print(f"## Memory modes: {model}, {args.size}x{args.size}, {args.steps} steps, batch 1\n")
    print(machine_lines())
    bw = "n/a (CPU)" if bandwidth is None else f"{bandwidth / 1e9:.1f} GB/s"
    print(f"- pinned host->device bandwidth: {bw}\n")
    print(markdown_table(headers, rows))
    print(f"\nlargest square under a 4 GiB cap: {largest_under_cap(args, factory)}")
    if args.plot:
        plot(points, args.plot)
    return 0


def plot(points, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"\n--plot: matplotlib is not installed (pip install matplotlib); no plot written to {path}")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for who, colour in (("leansd", "tab:blue"), ("diffusers", "tab:orange")):
        xs = [p[1] / MiB for p in points if p[0] == who and p[1]]
        ys = [p[2] for p in points if p[0] == who and p[1]]
        ax.scatter(xs, ys, c=colour, label=who)
    bounds = [p[3] for p in points if p[3]]
    if bounds:
        ax.axhline(max(bounds), color="grey", linestyle="--", label="streaming bound")
    ax.set_xlabel("peak memory (MiB)")
    ax.set_ylabel("s/step")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    print(f"\nplot written to {path}")


if __name__ == "__main__":
    raise SystemExit(main())
