"""LoRA cost on a full-size SD 1.5 UNet: leansd's hooks against diffusers' load_lora_weights + fuse_lora.

    python bench/lora.py            # both methods, each in its own process, then the table
    python bench/lora.py --rank 32  # another LoRA rank

Random weights (bench/common.py) and two random kohya-format LoRAs (every attention projection,
feed-forward and proj_in/proj_out of the UNet, rank 16 by default, alpha = rank / 2). Each method
runs in a fresh process so its peak RSS is its own:

- apply: the first LoRA from its state dict in memory to a model that uses it;
- switch: from the first LoRA to the second (diffusers: unfuse, delete the adapter, load and fuse the
  next; leansd: replace the hook set);
- forward: one UNet call at 32x32 latents, batch 2, with the LoRA applied (hooks cost compute at
  every call; a fused LoRA costs nothing there), and without any LoRA;
- RSS growth: peak resident memory after the applies minus before them, against the LoRA's size.

Prints a markdown table; never asserts.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import MIB, machine_lines, markdown_table, peak_rss, proc_status  # noqa: E402

TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v",
           "attn2.to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")


def random_lora(unet, *, rank: int, seed: int) -> dict:
    """A random kohya LoRA for `unet` (alpha = rank / 2)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, module in unet.named_modules():
        if not name.endswith(TARGETS):
            continue
        w = module.weight
        key = "lora_unet_" + name.replace(".", "_")
        in_features = w.shape[1]
        down = torch.randn((rank, in_features, *w.shape[2:]), generator=g) * in_features**-0.5
        up = torch.randn((w.shape[0], rank, *([1] * (w.dim() - 2))), generator=g) * 0.01
        out[f"{key}.lora_down.weight"], out[f"{key}.lora_up.weight"] = down, up
        out[f"{key}.alpha"] = torch.tensor(rank / 2)
    return out


def _forward_seconds(unet, repeats: int = 2) -> float:
    import torch

    x = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    context = torch.randn(2, 77, 768, generator=torch.Generator().manual_seed(1))
    best = float("inf")
    with torch.inference_mode():
        for _ in range(repeats):
            start = time.perf_counter()
            unet(x, 500, encoder_hidden_states=context, return_dict=False)
            best = min(best, time.perf_counter() - start)
    return best


def run_method(method: str, rank: int) -> dict:
    import torch

    from bench.common import build_sd15_components

    torch.set_num_threads(max(1, torch.get_num_threads()))
    unet = build_sd15_components(seed=0).unet
    first, second = random_lora(unet, rank=rank, seed=1), random_lora(unet, rank=rank, seed=2)
    lora_bytes = sum(t.numel() * t.element_size() for t in first.values())
    plain = _forward_seconds(unet)
    before = proc_status()["VmRSS"]
    peak_before = peak_rss()
    if method == "leansd":
        from leansd.models.lora import ActiveLora, apply_loras, lora_from_state_dict

        start = time.perf_counter()
        patch = apply_loras({"unet": unet}, [ActiveLora(lora_from_state_dict(first, name="a"), unet=0.8)])
        applied = time.perf_counter() - start
        forward = _forward_seconds(unet)  # the first call also moves the LoRA to the compute dtype once
        start = time.perf_counter()
        patch.remove()
        patch = apply_loras({"unet": unet}, [ActiveLora(lora_from_state_dict(second, name="b"), unet=0.8)])
        switched = time.perf_counter() - start
        _forward_seconds(unet, repeats=1)
    else:
        from diffusers.loaders import StableDiffusionLoraLoaderMixin

        def load(state: dict, name: str) -> None:
            sd, alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(dict(state))
            StableDiffusionLoraLoaderMixin.load_lora_into_unet(sd, alphas, unet=unet, adapter_name=name)
            unet.fuse_lora(lora_scale=0.8, adapter_names=[name])

        start = time.perf_counter()
        load(first, "a")
        applied = time.perf_counter() - start
        forward = _forward_seconds(unet)
        start = time.perf_counter()
        unet.unfuse_lora()
        unet.delete_adapters(["a"])
        load(second, "b")
        switched = time.perf_counter() - start
    growth = max(peak_rss() - peak_before, proc_status()["VmRSS"] - before, 0)
    return {"method": method, "apply_s": applied, "switch_s": switched, "forward_s": forward, "plain_forward_s": plain,
            "rss_growth": growth, "lora_bytes": lora_bytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--method", choices=("leansd", "diffusers"), help="run one method here (used internally)")
    args = parser.parse_args()
    if args.method:
        print(json.dumps(run_method(args.method, args.rank)))
        return
    rows = []
    results = {}
    for method in ("diffusers", "leansd"):
        out = subprocess.run([sys.executable, __file__, "--method", method, "--rank", str(args.rank)],
                             capture_output=True, text=True, check=True)
        results[method] = json.loads(out.stdout.strip().splitlines()[-1])
    ref = results["diffusers"]
    for method, r in results.items():
        rows.append([
            method, f"{r['apply_s']:.3f}", f"{r['switch_s']:.3f}", f"{r['apply_s'] / ref['apply_s']:.3f}x",
            f"{r['forward_s']:.2f}", f"{r['forward_s'] / r['plain_forward_s']:.3f}x",
            f"{r['rss_growth'] / MIB:.0f}", f"{r['lora_bytes'] / MIB:.0f}",
        ])
    print(f"SD 1.5 UNet (random weights), random rank-{args.rank} kohya LoRA, fp32, CPU\n")
    print(markdown_table(
        ["method", "apply s", "switch s", "apply vs diffusers", "UNet call s (32x32, batch 2)", "call vs no LoRA",
         "peak RSS growth MiB", "LoRA MiB"], rows))
    print()
    print(machine_lines())


if __name__ == "__main__":
    main()
