"""Host RAM and time to load a full-size SD 1.5 single-file checkpoint: leansd vs diffusers.

    python bench/load_ram.py [--workdir DIR] [--keep] [--no-first-image]

Writes a RANDOM-weight SD 1.5 checkpoint in the original CompVis single-file layout (what
`v1-5-pruned-emaonly.safetensors` holds: same tensors, same sizes) three ways: fp32 and fp16
`.safetensors`, and an fp32 zip `.ckpt` (`torch.save({"state_dict": sd})`). Then, each in a
FRESH Python process (so one measurement cannot inherit another's memory), it loads every file
with

- leansd: `leansd.models.loader.load_model(path)`
- diffusers: `StableDiffusionPipeline.from_single_file(path, config=<local config folder>,
  torch_dtype=torch.float32, local_files_only=True)`; the folder (configs, scheduler,
  tokenizer, no weights) is written here, since offline that is the only way it loads.

and records the load time and the peak RSS (`ru_maxrss`). Then it makes the modules ready to run
in fp32 on the CPU (leansd keeps an fp16 file's dtype in the bundle and casts in
`Engine(bundle, device="cpu", precision="full")`; diffusers casts while loading) and records the
time, the peak RSS and the RSS split into anonymous (private copies) and file-backed (mmapped
checkpoint pages, which the kernel can drop and re-read) memory, from /proc/self/status. Unless
`--no-first-image`, each process then makes one 64x64, 1-step image, which touches every weight,
and the memory is recorded again.

The page cache cannot be dropped here (no root): each file is read once before its
measurements, so every load reads from a warm cache. The parent process imports no torch, so
its memory does not leak into the children's `ru_maxrss`. Files go to a fresh folder under
/tmp (about 11 GB) and are deleted at the end unless `--keep`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    PROMPT,
    gib,
    machine_lines,
    markdown_table,
    peak_rss,
    proc_status,
)

FORMATS = {
    "fp32.safetensors": "safetensors fp32",
    "fp16.safetensors": "safetensors fp16",
    "fp32.ckpt": "ckpt (zip) fp32",
}
LOADERS = ("leansd", "diffusers")
FILE_STEM = "random-sd15"
CONFIG_DIR = "diffusers-config"
RESULT_PREFIX = "RESULT "


# ---------------------------------------------------------------------------------------------
# Children: each runs in a fresh interpreter
# ---------------------------------------------------------------------------------------------


def child_write(workdir: Path) -> None:
    """Build the random SD 1.5 modules and write the three checkpoints and the config folder."""
    import torch
    from safetensors.torch import save_file

    from bench.common import build_sd15_components, write_sd15_diffusers_config
    from leansd.models.convert import diffusers_to_ldm

    started = time.perf_counter()
    paths = {fmt: workdir / f"{FILE_STEM}-{fmt}" for fmt in FORMATS}
    if all(p.exists() for p in paths.values()):  # reuse an earlier run's files (--workdir)
        write_sd15_diffusers_config(workdir / CONFIG_DIR)
        result = {"files": {fmt: str(p) for fmt, p in paths.items()}, "seconds": time.perf_counter() - started}
        print(RESULT_PREFIX + json.dumps(result), flush=True)
        return
    parts = build_sd15_components(seed=0)
    # The modules' own tensors (VAE attention as 1x1-conv views): contiguous, nothing shared.
    sd = {k: v.contiguous() for k, v in diffusers_to_ldm(parts.unet, parts.vae, parts.text_encoder).items()}
    written = {}
    for fmt in FORMATS:
        path = paths[fmt]
        if path.exists():
            written[fmt] = str(path)
            continue
        tmp = path.with_name(path.name + ".partial")
        if fmt == "fp16.safetensors":
            half = {k: v.to(torch.float16) if v.is_floating_point() else v for k, v in sd.items()}
            save_file(half, str(tmp))
            del half
        elif fmt == "fp32.safetensors":
            save_file(sd, str(tmp))
        else:
            torch.save({"state_dict": sd}, str(tmp))
        os.replace(tmp, path)
        written[fmt] = str(path)
    write_sd15_diffusers_config(workdir / CONFIG_DIR)
    print(RESULT_PREFIX + json.dumps({"files": written, "seconds": time.perf_counter() - started}), flush=True)


def child_measure(loader: str, path: str, config: str, first_image: bool) -> None:
    """Load `path` with `loader`, report time and memory (and again after one tiny image)."""
    # Both processes import the same libraries before the clock starts, so the load time is the
    # load alone (importing torch + diffusers + transformers costs 5-8 s either way).
    import accelerate  # noqa: F401
    import safetensors.torch  # noqa: F401
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel  # noqa: F401
    from transformers import CLIPTextModel  # noqa: F401

    from leansd.engine.engine import Engine
    from leansd.models.loader import load_model
    from leansd.request import GenerationRequest

    result: dict = {"loader": loader, "path": path}
    result["before"] = {**proc_status(), "peak": peak_rss()}

    t0 = time.perf_counter()
    if loader == "leansd":
        bundle = load_model(path)
        modules = (bundle.unet, bundle.vae, bundle.text_encoder)
    else:
        pipe = StableDiffusionPipeline.from_single_file(
            path, config=config, torch_dtype=torch.float32, local_files_only=True
        )
        modules = (pipe.unet, pipe.vae, pipe.text_encoder)
    result["load_seconds"] = time.perf_counter() - t0
    result["after_load"] = {**proc_status(), "peak": peak_rss()}
    result["load_dtype"] = str(modules[0].dtype).replace("torch.", "")
    result["params"] = sum(p.numel() for m in modules for p in m.parameters())

    # Ready to run on the CPU in fp32: leansd keeps a file's dtype in the bundle and casts in the
    # Engine; diffusers casts inside from_single_file (torch_dtype=float32).
    t0 = time.perf_counter()
    if loader == "leansd":
        engine = Engine(bundle, device="cpu", precision="full")
    result["ready_seconds"] = result["load_seconds"] + time.perf_counter() - t0
    result["after_ready"] = {**proc_status(), "peak": peak_rss()}
    result["ready_dtype"] = str(modules[0].dtype).replace("torch.", "")

    if first_image:
        # 64x64, 1 step: cheap, yet every weight of all three models is read once.
        t0 = time.perf_counter()
        if loader == "leansd":
            request = GenerationRequest(
                prompt=PROMPT, width=64, height=64, num_inference_steps=1, sampler="Euler", seed=0
            )
            engine.generate(request, progress_bar=False)
        else:
            pipe.set_progress_bar_config(disable=True)
            pipe(
                PROMPT,
                height=64,
                width=64,
                num_inference_steps=1,
                generator=torch.Generator("cpu").manual_seed(0),
                output_type="np",
            )
        result["image_seconds"] = time.perf_counter() - t0
        result["after_image"] = {**proc_status(), "peak": peak_rss()}
    print(RESULT_PREFIX + json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------------------
# Parent: no torch here
# ---------------------------------------------------------------------------------------------


def run_child(args: list[str], env: dict[str, str]) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        return {"error": f"exit {proc.returncode}: {tail[0][:300]}"}
    return json.loads(lines[-1][len(RESULT_PREFIX):])


def warm_page_cache(path: Path) -> float:
    """Read the file once so every measured load finds it in the page cache."""
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.read(64 << 20):
            pass
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, help="folder for the checkpoints (default: a new one in /tmp); "
                        "existing checkpoints there are reused")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints and config folder")
    parser.add_argument("--formats", default=",".join(FORMATS), help=f"comma list of {', '.join(FORMATS)}")
    parser.add_argument("--loaders", default=",".join(LOADERS), help="comma list of leansd, diffusers")
    parser.add_argument("--no-first-image", dest="first_image", action="store_false",
                        help="skip the 64x64 1-step image after each load")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        kind, *rest = args.child
        if kind == "write":
            child_write(Path(rest[0]))
        else:
            path, config, first = rest
            child_measure(kind, path, config, first == "1")
        return

    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    loaders = [name.strip() for name in args.loaders.split(",") if name.strip()]
    bad = [f for f in formats if f not in FORMATS] + [name for name in loaders if name not in LOADERS]
    if bad:
        parser.error(f"unknown format/loader {bad}; formats: {', '.join(FORMATS)}; loaders: {', '.join(LOADERS)}")

    created = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="leansd-load-ram-")) if created else args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    # leansd hashes a checkpoint on its first load and caches the hash: keep that cache here.
    env["LEANSD_CACHE_DIR"] = str(workdir / "cache")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent.parent),
                                                       env.get("PYTHONPATH")]))
    try:
        print(f"writing checkpoints to {workdir} ...", file=sys.stderr, flush=True)
        written = run_child(["--child", "write", str(workdir)], env)
        if "error" in written:
            sys.exit(f"writing the checkpoints failed: {written['error']}")
        config = str(workdir / CONFIG_DIR)
        rows = []
        notes = []
        before: list[int] = []
        for fmt in formats:
            path = Path(written["files"][fmt])
            size = path.stat().st_size
            read_s = warm_page_cache(path)
            notes.append(f"{path.name}: {size / 1e9:.2f} GB, read once in {read_s:.1f} s to warm the page cache")
            if "leansd" in loaders:
                # First leansd load of a file also computes its sha256 (A1111's model hash) and
                # caches it; measure that once, separately, so the table shows the steady state.
                first = run_child(["--child", "leansd", str(path), config, "0"], env)
                if "error" not in first:
                    notes.append(f"{path.name}: leansd first load incl. sha256 hashing {first['load_seconds']:.1f} s")
            for loader in loaders:
                print(f"measuring {loader} on {path.name} ...", file=sys.stderr, flush=True)
                r = run_child(["--child", loader, str(path), config, "1" if args.first_image else "0"], env)
                if "error" in r:
                    rows.append([FORMATS[fmt], gib(size), loader, "failed: " + r["error"], *[""] * 7])
                    continue
                before.append(r["before"]["VmRSS"])
                load, ready, image = r["after_load"], r["after_ready"], r.get("after_image", {})
                rows.append([
                    FORMATS[fmt],
                    gib(size),
                    loader,
                    f"{r['load_seconds']:.1f}",
                    f"{gib(load['peak'])} ({r['load_dtype']})",
                    f"{r['ready_seconds']:.1f}",
                    gib(ready["peak"]),
                    gib(ready["RssAnon"]),
                    gib(ready["RssFile"]),
                    gib(image.get("peak")),
                    gib(image.get("RssAnon")),
                ])
                print(json.dumps(r), file=sys.stderr, flush=True)
        headers = [
            "file", "size GiB", "loader", "load s", "peak RSS after load GiB (dtype)", "ready fp32 s",
            "peak RSS ready GiB", "anon ready GiB", "file-backed ready GiB", "peak RSS 1st image GiB",
            "anon 1st image GiB",
        ]
        print("## Load RAM: full-size SD 1.5 (random weights), single file, CPU\n")
        print(machine_lines() + "\n")
        print(markdown_table(headers, rows) + "\n")
        for note in notes:
            print(f"- {note}")
        if before:
            print(f"- every process holds {gib(min(before))}-{gib(max(before))} GiB after importing torch, diffusers,"
                  " transformers and leansd, before the load; the numbers above include it.")
        print("- load: `load_model(path)` / `from_single_file(...)`; ready fp32: plus `Engine(bundle, device='cpu',"
              " precision='full')` for leansd (it casts an fp16 file's modules); diffusers is ready after loading.")
        print("- anon = RssAnon (private copies); file-backed = RssFile (mmapped checkpoint pages: page cache,"
              " shared and droppable). Peak RSS = ru_maxrss (both kinds).")
        print("- 1st image: 64x64, 1 step, Euler/default scheduler, once ready (reads every weight).")
    finally:
        if not args.keep:
            if created:
                shutil.rmtree(workdir, ignore_errors=True)
            else:
                for fmt in FORMATS:
                    (workdir / f"{FILE_STEM}-{fmt}").unlink(missing_ok=True)
                shutil.rmtree(workdir / CONFIG_DIR, ignore_errors=True)
                shutil.rmtree(workdir / "cache", ignore_errors=True)


if __name__ == "__main__":
    main()
