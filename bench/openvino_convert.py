"""OpenVINO conversion of the full-size SD 1.5 UNet: time, peak RAM, disk, and a later start.

    python bench/openvino_convert.py [--size 512] [--weights f32 f16] [--workdir DIR] [--keep]

For each weight storage (fp32 IR, or fp16-stored weights computed in fp32) a FRESH Python process
builds the RANDOM-weight full-size SD 1.5 models (as `bench/common.py`), records its RSS (the
torch path's resident weights), then converts the UNet at batch 2 (CFG) and the given size through
`leansd.backends.openvino.OpenVinoBackend` into an empty cache folder, and records the conversion
time and the peak RSS (`ru_maxrss`). A second fresh process builds the same weights and compiles
the UNet from that cache (no conversion: checked), and times one UNet call on each backend and
the largest output difference. Needs about 8 GB of free RAM (check `free -g` first) and a few GB
of disk under --workdir (deleted at the end unless --keep).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def child(mode: str, size: int, weights: str, cache: str) -> dict:
    import time

    import torch

    from bench.common import build_sd15_components, peak_rss, proc_status
    from leansd.backends.ir_cache import IRCache
    from leansd.backends.openvino import OpenVinoBackend

    components = build_sd15_components(seed=0)
    out: dict = {"rss_torch_models": proc_status()["VmRSS"]}
    backend = OpenVinoBackend(cache=IRCache(cache), weights=weights)
    side = size // 8
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn((2, 4, side, side), generator=g), torch.full((2,), 500.0), torch.randn((2, 77, 768), generator=g)]
    started = time.perf_counter()
    compiled = backend.compiled("unet", components.unet, inputs, patches="")
    out["seconds_to_ready"] = time.perf_counter() - started
    out["conversions"] = backend.conversions
    out["conversion_seconds"] = backend.conversion_seconds
    out["peak_rss"] = peak_rss()
    out["disk_bytes"] = IRCache(cache).total_bytes()
    if mode == "reuse":
        arrays = [t.numpy() for t in inputs]
        started = time.perf_counter()
        got = torch.from_numpy(compiled(arrays)[0])
        out["openvino_call_seconds"] = time.perf_counter() - started
        with torch.inference_mode():
            started = time.perf_counter()
            expected = components.unet(inputs[0], inputs[1], encoder_hidden_states=inputs[2], return_dict=False)[0]
            out["torch_call_seconds"] = time.perf_counter() - started
        out["max_abs_difference"] = float((got - expected).abs().max())
        out["mean_abs_difference"] = float((got - expected).abs().mean())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--weights", nargs="+", default=["f32", "f16"], choices=["f32", "f16"])
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--child", nargs=4, metavar=("MODE", "SIZE", "WEIGHTS", "CACHE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, size, weights, cache = args.child
        print(json.dumps(child(mode, int(size), weights, cache)))
        return
    from bench.common import gib, machine_lines, markdown_table

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="leansd-ov-convert-"))
    rows = []
    try:
        for weights in args.weights:
            cache = workdir / f"cache-{weights}"
            results = {}
            for mode in ("convert", "reuse"):
                done = subprocess.run([sys.executable, __file__, "--child", mode, str(args.size), weights, str(cache)],
                                      capture_output=True, text=True, check=True)
                results[mode] = json.loads(done.stdout.strip().splitlines()[-1])
            first, later = results["convert"], results["reuse"]
            assert later["conversions"] == 0, "the second process converted again"
            rows.append([
                weights, gib(first["rss_torch_models"]), f"{first['conversion_seconds']:.0f}", gib(first["peak_rss"]),
                gib(first["disk_bytes"]), f"{later['seconds_to_ready']:.1f}", gib(later["peak_rss"]),
                f"{later['openvino_call_seconds'] / later['torch_call_seconds']:.2f}",
                f"{later['max_abs_difference']:.1e} / {later['mean_abs_difference']:.1e}",
            ])
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print(machine_lines())
    print(markdown_table(
        ["IR weights", "RSS torch models", "convert s", "convert peak RSS", "disk", "later start s",
         "later peak RSS", "UNet call OV/torch", "max / mean |diff|"],
        rows,
    ))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main()
