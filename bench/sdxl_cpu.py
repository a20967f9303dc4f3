"""SDXL base on the CPU: load RAM and seconds per step, leansd vs diffusers, RANDOM weights.

    python bench/sdxl_cpu.py [--size 512] [--steps 3] [--rounds 2] [--file-dtype fp16|fp32]
                             [--reduced] [--workdir DIR] [--keep] [--skip-load] [--skip-speed]

Writes an SDXL base checkpoint with the published architecture (`leansd.models.configs.SDXL_*`,
2.57 B UNet parameters, CLIP-L + OpenCLIP-bigG) and seeded random weights as ONE single file in
Stability's (sgm) layout, plus a diffusers config folder (configs, tokenizers, scheduler, no
weights: what `from_single_file` needs offline). Then, each in a FRESH Python process, one at a
time (an fp32 SDXL needs ~13 GB: never two at once):

- load: leansd `Engine.load(file, device="cpu", precision="full")` vs diffusers
  `StableDiffusionXLPipeline.from_single_file(file, config=<folder>, torch_dtype=float32,
  local_files_only=True)`: load seconds, peak RSS, RSS split into anonymous and file-backed;
- speed: the file loaded once by leansd; then, alternately for `--rounds` rounds, leansd
  `Engine.generate` and diffusers' `StableDiffusionXLPipeline` built over THE SAME modules, txt2img
  at `--size` with `--steps` Euler steps, CFG 7.5 (batch 2 UNet calls). Seconds per step are taken
  between the first and the last step callbacks (text encoding and VAE decode excluded), and the
  ratio is leansd / diffusers per round.

`--reduced` shrinks the architecture (UNet widths halved, one transformer block per level, CLIP-L
2 and bigG 4 layers) for machines that cannot hold the full model: same code paths, smaller
numbers, and the table says so. Nothing touches the network. Files go to a fresh folder under
/tmp (full size: ~7 GB in fp16) and are deleted at the end unless `--keep`.
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

from bench.common import PROMPT, fill_random, gib, machine_lines, markdown_table, peak_rss, proc_status  # noqa: E402

RESULT_PREFIX = "RESULT "
FILE_NAME = "random-sdxl.safetensors"
CONFIG_DIR = "diffusers-config"
NEGATIVE = "blurry, low quality"
LOADERS = ("leansd", "diffusers")


def architecture(reduced: bool) -> tuple[dict, dict, dict, dict]:
    """(UNet, VAE, CLIP-L, bigG) configs: the published SDXL base, or the `--reduced` one."""
    from leansd.models.configs import SDXL_TEXT_2_CONFIG, SDXL_TEXT_CONFIG, SDXL_UNET_CONFIG, SDXL_VAE_CONFIG
    from leansd.models.families import describe
    from leansd.models.family import ModelFamily

    unet, vae = dict(SDXL_UNET_CONFIG), dict(SDXL_VAE_CONFIG)
    text, text_2 = dict(SDXL_TEXT_CONFIG), dict(SDXL_TEXT_2_CONFIG)
    if reduced:
        blocks = tuple(c // 2 for c in unet["block_out_channels"])
        unet.update(block_out_channels=blocks, transformer_layers_per_block=(1, 1, 1),
                    attention_head_dim=describe(ModelFamily.SDXL).unet_attention_heads(blocks))
        text.update(num_hidden_layers=2)
        text_2.update(num_hidden_layers=4)
    return unet, vae, text, text_2


# ---------------------------------------------------------------------------------------------
# Children: each runs in a fresh interpreter


def child_write(workdir: Path, reduced: bool, file_dtype: str) -> None:
    import accelerate
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from leansd.models.configs import SD1_SCHEDULER_CONFIG
    from leansd.models.convert import diffusers_to_sgm
    from leansd.models.family import ModelFamily
    from leansd.models.tiny import write_pipeline_files

    started = time.perf_counter()
    unet_c, vae_c, text_c, text_2_c = architecture(reduced)
    with accelerate.init_empty_weights(include_buffers=False):
        unet = UNet2DConditionModel(**unet_c)
        vae = AutoencoderKL(**vae_c)
        text = CLIPTextModel(CLIPTextConfig(**text_c))
        text_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text_2_c))
    dtype = torch.float16 if file_dtype == "fp16" else torch.float32
    for offset, module in enumerate((unet, vae, text, text_2), start=1):
        fill_random(module, torch.Generator().manual_seed(offset), dtype)
    sd = {k: v.contiguous() for k, v in diffusers_to_sgm(unet, vae, text, text_2).items()}
    path = workdir / FILE_NAME
    save_file(sd, str(path.with_name(path.name + ".partial")))
    os.replace(path.with_name(path.name + ".partial"), path)
    del sd
    config = workdir / CONFIG_DIR
    write_pipeline_files(config, family=ModelFamily.SDXL)
    EulerDiscreteScheduler.from_config(SD1_SCHEDULER_CONFIG).save_pretrained(config / "scheduler")
    unet.save_config(config / "unet")
    vae.save_config(config / "vae")
    text.config.save_pretrained(config / "text_encoder")
    text_2.config.save_pretrained(config / "text_encoder_2")
    params = sum(p.numel() for m in (unet, vae, text, text_2) for p in m.parameters())
    print(RESULT_PREFIX + json.dumps({"file": str(path), "config": str(config), "params": params,
                                      "unet_params": sum(p.numel() for p in unet.parameters()),
                                      "seconds": time.perf_counter() - started}), flush=True)


def _imports() -> None:
    """Both loaders import the same libraries before any clock starts."""
    import accelerate  # noqa: F401
    import safetensors.torch  # noqa: F401
    from diffusers import StableDiffusionXLPipeline  # noqa: F401
    from transformers import CLIPTextModel  # noqa: F401

    from leansd.engine.engine import Engine  # noqa: F401


def child_load(loader: str, path: str, config: str) -> None:
    _imports()
    import torch
    from diffusers import StableDiffusionXLPipeline

    from leansd.engine.engine import Engine

    result: dict = {"loader": loader, "before": {**proc_status(), "peak": peak_rss()}}
    t0 = time.perf_counter()
    if loader == "leansd":
        engine = Engine.load(path, device="cpu", precision="full", prompt_cache=False)
        modules = [engine.bundle.unet, engine.bundle.vae, *engine.bundle.text_encoders]
    else:
        pipe = StableDiffusionXLPipeline.from_single_file(path, config=config, torch_dtype=torch.float32,
                                                          local_files_only=True)
        modules = [pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2]
    result["seconds"] = time.perf_counter() - t0
    result["after"] = {**proc_status(), "peak": peak_rss()}
    result["dtype"] = str(modules[0].dtype).replace("torch.", "")
    result["params"] = sum(p.numel() for m in modules for p in m.parameters())
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def child_speed(path: str, size: int, steps: int, rounds: int) -> None:
    _imports()
    import torch
    from diffusers import StableDiffusionXLPipeline

    from leansd.engine.engine import Engine
    from leansd.request import GenerationRequest
    from leansd.sampling.samplers import build_scheduler

    engine = Engine.load(path, device="cpu", precision="full", prompt_cache=False)
    b = engine.bundle
    pipe = StableDiffusionXLPipeline(  # the very modules leansd loaded
        vae=b.vae, text_encoder=b.text_encoder, text_encoder_2=b.text_encoder_2, tokenizer=b.tokenizer,
        tokenizer_2=b.tokenizer_2, unet=b.unet, scheduler=build_scheduler("Euler", b.scheduler_config, seeds=[0]),
    )
    pipe.set_progress_bar_config(disable=True)
    request = GenerationRequest(PROMPT, negative_prompt=NEGATIVE, width=size, height=size, num_inference_steps=steps,
                                guidance_scale=7.5, sampler="Euler", seed=0)

    def leansd_run() -> float:
        stamps: list[float] = []
        engine.generate(request, progress=lambda event: stamps.append(time.perf_counter()), progress_bar=False)
        return (stamps[-1] - stamps[0]) / (len(stamps) - 1)

    def diffusers_run() -> float:
        stamps: list[float] = []

        def on_step(_pipe, _i, _t, kwargs):  # type: ignore[no-untyped-def]
            stamps.append(time.perf_counter())
            return kwargs

        pipe.scheduler = build_scheduler("Euler", b.scheduler_config, seeds=[0])
        pipe(PROMPT, negative_prompt=NEGATIVE, height=size, width=size, num_inference_steps=steps, guidance_scale=7.5,
             generator=torch.Generator("cpu").manual_seed(0), output_type="np", callback_on_step_end=on_step)
        return (stamps[-1] - stamps[0]) / (len(stamps) - 1)

    leansd_run()  # warm-up: first-call allocations and one-off setup are not a step
    results = []
    for index in range(rounds):
        order = (("leansd", leansd_run), ("diffusers", diffusers_run))
        if index % 2:
            order = order[::-1]
        row = {name: run() for name, run in order}
        results.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    print(RESULT_PREFIX + json.dumps({"rounds": results, "peak": peak_rss(),
                                      "threads": torch.get_num_threads()}), flush=True)


# ---------------------------------------------------------------------------------------------
# Parent: no torch here


def run_child(args: list[str], env: dict[str, str]) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), *args]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        return {"error": f"exit {proc.returncode}"}
    return json.loads(lines[-1][len(RESULT_PREFIX):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=512, help="image width and height for the speed runs (default 512)")
    parser.add_argument("--steps", type=int, default=3, help="Euler steps per speed run (>= 2; default 3)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved leansd/diffusers rounds (default 2)")
    parser.add_argument("--file-dtype", choices=("fp16", "fp32"), default="fp16",
                        help="dtype stored in the checkpoint (default fp16, as published SDXL files)")
    parser.add_argument("--reduced", action="store_true", help="a smaller SDXL-shaped model (see the docstring)")
    parser.add_argument("--workdir", type=Path, help="folder for the checkpoint (default: a new one in /tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint and the config folder")
    parser.add_argument("--skip-load", action="store_true", help="no load-RAM measurements")
    parser.add_argument("--skip-speed", action="store_true", help="no seconds-per-step measurements")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "write":
            child_write(Path(rest[0]), rest[1] == "1", rest[2])
        elif kind == "speed":
            child_speed(rest[0], int(rest[1]), int(rest[2]), int(rest[3]))
        else:
            child_load(kind, rest[0], rest[1])
        return
    if args.steps < 2:
        parser.error("--steps must be at least 2 (seconds per step are measured between step callbacks)")

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="leansd-sdxl-cpu-"))
    workdir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, LEANSD_CACHE_DIR=str(workdir / "cache"))
    env.setdefault("HF_HUB_OFFLINE", "1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent.parent),
                                                       env.get("PYTHONPATH")]))
    model = "reduced SDXL-shaped" if args.reduced else "full-size SDXL base"
    try:
        print(f"writing the checkpoint to {workdir} ...", file=sys.stderr, flush=True)
        written = run_child(["--child", "write", str(workdir), "1" if args.reduced else "0", args.file_dtype], env)
        if "error" in written:
            sys.exit(f"writing the checkpoint failed: {written['error']}")
        path, config = written["file"], written["config"]
        size = Path(path).stat().st_size
        print(f"## SDXL on the CPU: {model} (random weights), {args.file_dtype} single file\n")
        print(machine_lines() + "\n")
        print(f"- model: {written['params'] / 1e9:.2f} B parameters ({written['unet_params'] / 1e9:.2f} B UNet); "
              f"file {size / 1e9:.2f} GB")
        if not args.skip_load:
            rows = []
            for loader in LOADERS:
                print(f"loading with {loader} ...", file=sys.stderr, flush=True)
                r = run_child(["--child", loader, path, config], env)
                if "error" in r:
                    rows.append([loader, "failed: " + r["error"], "", "", "", ""])
                    continue
                rows.append([loader, f"{r['seconds']:.1f}", r["dtype"], gib(r["after"]["peak"]),
                             gib(r["after"]["RssAnon"]), gib(r["after"]["RssFile"])])
            print("\nLoad, ready to run in fp32 (each in a fresh process; the numbers include ~0.5-0.7 GiB of "
                  "imported libraries):\n")
            print(markdown_table(["loader", "load s", "dtype", "peak RSS GiB", "anon GiB", "file-backed GiB"], rows))
        if not args.skip_speed:
            print("running the speed rounds ...", file=sys.stderr, flush=True)
            r = run_child(["--child", "speed", path, str(args.size), str(args.steps), str(args.rounds)], env)
            if "error" in r:
                print(f"\nspeed: failed ({r['error']})")
            else:
                rows = [[i + 1, f"{row['leansd']:.2f}", f"{row['diffusers']:.2f}",
                         f"{row['leansd'] / row['diffusers']:.2f}x"] for i, row in enumerate(r["rounds"])]
                print(f"\nSeconds per step, txt2img {args.size}x{args.size}, Euler, CFG 7.5 (2 UNet passes), fp32, "
                      f"{r['threads']} torch threads, same modules, interleaved (peak RSS {gib(r['peak'])} GiB):\n")
                print(markdown_table(["round", "leansd s/step", "diffusers s/step", "leansd / diffusers"], rows))
    finally:
        if not args.keep:
            if args.workdir is None:
                shutil.rmtree(workdir, ignore_errors=True)
            else:
                (workdir / FILE_NAME).unlink(missing_ok=True)
                shutil.rmtree(workdir / CONFIG_DIR, ignore_errors=True)
                shutil.rmtree(workdir / "cache", ignore_errors=True)


if __name__ == "__main__":
    main()
