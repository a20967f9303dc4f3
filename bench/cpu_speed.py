"""CPU speed: diffusers torch vs leansd torch vs leansd OpenVINO on the same full-size random weights.

    python bench/cpu_speed.py                                  # SD 1.5, 256 and 512, all variants
    python bench/cpu_speed.py --sizes 256 --steps 3 --rounds 2
    python bench/cpu_speed.py --variants leansd-torch --threads 1,2 --wait-policy default,passive
    python bench/cpu_speed.py --variants ov-spike --ov-threads 1,2 --ov-precision f32,bf16
    python bench/cpu_speed.py --convert-only --strategies fp32,fp16-save,export   # conversion RAM
    python bench/cpu_speed.py --models sdxl                    # SDXL (not run by default)

Variants (each timed config gets the same prompt, seed, sampler "Euler" and CFG 7.5):
- diffusers: `StableDiffusionPipeline` (fp32, torch eager) on the very module objects leansd uses,
  the pipeline a user would pick instead of leansd;
- leansd-torch: `Engine(bundle, device="cpu", precision="full")`, same process as diffusers (same
  modules, so the same picture is expected);
- leansd-ov: `Engine(bundle, device="cpu", backend="openvino")` in its own process (needs leansd's
  OpenVINO backend);
- ov-spike: OpenVINO used directly on the same UNet and VAE decoder (`openvino.convert_model` once,
  dynamic height/width, then `reshape` to the static shape and `compile_model`), text encoder and
  scheduler from torch/diffusers: what the backend can reach at best, for the harness before it lands.

Every process is started fresh (imports and model build not timed), warms up once per size, then
rounds interleave the configs in a rotating order so a busy machine slows them alike. Per image:
s/step (median interval between step callbacks, first step excluded), VAE decode, whole image
(prompt encode + N steps + decode), process CPU seconds (`resource.getrusage`) beside wall seconds,
and how many cores OTHER processes kept busy meanwhile (this machine may be shared). Per process:
start-up seconds and peak RSS (`ru_maxrss`). OpenVINO conversion runs in a fresh subprocess per
strategy (its own `ru_maxrss`), then a second process reads the cached IR (cache hit start time);
disk use of the cache is listed. Ratios are against diffusers in the same run. Prints markdown;
never asserts.
"""

from __future__ import annotations

import argparse
import base64
import gc
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import GIB, PROMPT, OtherLoad, machine_lines, markdown_table  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULT = "@@cpu_speed "
SAMPLER = "Euler"
GUIDANCE = 7.5
SEED = 1234
VARIANTS = ("diffusers", "leansd-torch", "leansd-ov", "ov-spike")
DEFAULT_VARIANTS = ("diffusers", "leansd-torch", "leansd-ov")
STRATEGIES = ("fp32", "fp16-save", "fp16-module", "export", "free-module")
EST_STEPS = 20
ISA_LIMITS: dict[str, dict[str, str]] = {
    "native": {},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
}
"""Environment for the workers per --isa. OpenVINO's CPU plugin honours ONEDNN_MAX_CPU_ISA (its
convolutions run as brgconv_avx2 instead of brgconv_avx512 under it; its MLAS matrix products pick
their kernels themselves), so "avx2" approximates an AVX2-only machine rather than being one."""
# Rough resident GiB of one worker process (fp32 weights + runtime), to refuse runs that would not fit.
WORKER_GIB = {"sd15": {"torch": 4.6, "ov": 8.0, "spike": 4.5}, "sdxl": {"torch": 11.0, "ov": 18.0, "spike": 11.0}}


# ---------------------------------------------------------------------------------------------
# Machine facts
# ---------------------------------------------------------------------------------------------


def cpu_flags() -> str:
    """The ISA features that decide CPU speed (AVX2 only vs AVX-512 / bf16 / AMX), from /proc/cpuinfo."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "unknown"
    match = re.search(r"^flags\s*:\s*(.+)$", text, re.M)
    flags = set(match.group(1).split()) if match else set()
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16", "amx_tile",
              "amx_bf16", "amx_int8")
    return ", ".join(f for f in wanted if f in flags) or "none of avx2/avx512/amx"


def mem_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


def build_bundle(model: str) -> Any:
    from bench.common import build_sd15_components, sd15_bundle

    if model == "sd15":
        return sd15_bundle(build_sd15_components(seed=0))
    raise SystemExit(f"unknown model {model!r}; valid: sd15 (sdxl is not available yet)")


class UNetGraph:
    """The UNet as a graph OpenVINO can trace: (sample, timestep, encoder_hidden_states) -> noise."""

    @staticmethod
    def wrap(unet: Any) -> Any:
        import torch

        class Wrapper(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.unet = unet

            def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor) -> Any:
                return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]

        return Wrapper().eval()


def vae_decoder_wrap(vae: Any) -> Any:
    import torch

    class Wrapper(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.vae = vae

        def forward(self, latents: torch.Tensor) -> Any:
            return self.vae.decode(latents, return_dict=False)[0]

    return Wrapper().eval()


def unet_example(dtype: Any = None) -> tuple[Any, ...]:
    import torch

    dtype = dtype or torch.float32
    return (torch.randn(2, 4, 64, 64, dtype=dtype), torch.tensor([999.0], dtype=dtype),
            torch.randn(2, 77, 768, dtype=dtype))


def convert_unet(strategy: str, out: Path, *, seed: int = 0) -> dict[str, Any]:
    """Convert the full-size random SD 1.5 UNet to an OpenVINO IR at `out` with one strategy.

    Strategies (all give an IR with dynamic height/width, batch 2, ready for `reshape`):
    - fp32: fp32 module, `convert_model` (TorchScript trace), `save_model(compress_to_fp16=False)`;
    - fp16-save: the same, stored with fp16 weights (`compress_to_fp16=True`, computed in fp32);
    - fp16-module: the module cast to fp16 in torch first, traced in fp16 (an fp16 graph);
    - export: `torch.export.export` first, then `convert_model` on the ExportedProgram;
    - free-module: fp32 trace, then the torch module is freed before `save_model`.
    """
    import openvino as ov
    import torch

    from bench.common import build_sd15_part

    marks: dict[str, Any] = {}
    t0 = time.perf_counter()
    unet = build_sd15_part("unet", seed=seed)
    marks["built_rss"] = peak_rss()
    dtype = torch.float16 if strategy == "fp16-module" else torch.float32
    if strategy == "fp16-module":
        unet = unet.to(torch.float16)
    graph = UNetGraph.wrap(unet)
    example = unet_example(dtype)
    shapes = [ov.PartialShape([2, 4, -1, -1]), ov.PartialShape([1]), ov.PartialShape([2, 77, 768])]
    t1 = time.perf_counter()
    with torch.no_grad():
        if strategy == "export":
            h = torch.export.Dim("h", min=8, max=256)
            w = torch.export.Dim("w", min=8, max=256)
            program = torch.export.export(graph, example, dynamic_shapes=({2: 8 * h, 3: 8 * w}, None, None))
            model = ov.convert_model(program)
            del program
        else:
            model = ov.convert_model(graph, example_input=example, input=shapes)
    convert_s = time.perf_counter() - t1
    if strategy == "free-module":
        del graph, unet
        gc.collect()
    t2 = time.perf_counter()
    ov.save_model(model, str(out), compress_to_fp16=strategy in ("fp16-save", "fp16-module"))
    save_s = time.perf_counter() - t2
    return {"strategy": strategy, "build_s": t1 - t0, "convert_s": convert_s, "save_s": save_s,
            "peak_rss": peak_rss(), "built_rss": marks["built_rss"], "disk": disk_bytes(out.parent)}


def convert_vae_decoder(out: Path, *, seed: int = 0) -> dict[str, Any]:
    import openvino as ov
    import torch

    from bench.common import build_sd15_part

    t0 = time.perf_counter()
    graph = vae_decoder_wrap(build_sd15_part("vae", seed=seed))
    with torch.no_grad():
        model = ov.convert_model(graph, example_input=(torch.randn(1, 4, 32, 32),),
                                 input=[ov.PartialShape([1, 4, -1, -1])])
    ov.save_model(model, str(out), compress_to_fp16=False)
    return {"convert_s": time.perf_counter() - t0, "peak_rss": peak_rss()}


# ---------------------------------------------------------------------------------------------
# Workers: one process per variant group, driven by JSON lines on stdin
# ---------------------------------------------------------------------------------------------


def request_for(size: int, steps: int) -> Any:
    from leansd.request import GenerationRequest

    return GenerationRequest(prompt=PROMPT, width=size, height=size, num_inference_steps=steps,
                             guidance_scale=GUIDANCE, sampler=SAMPLER, seed=SEED).validated()


def to_uint8(pixels: Any) -> Any:
    import numpy as np

    return (np.clip(np.asarray(pixels, dtype=np.float32), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


class Timed:
    """Wall, CPU and other-load of one image, plus the step callback times."""

    def __init__(self) -> None:
        self.ticks: list[float] = []
        self.meter = OtherLoad()

    def __enter__(self) -> "Timed":
        self.meter.start()
        self.cpu0 = cpu_seconds()
        self.t0 = time.perf_counter()
        return self

    def tick(self, *_: Any, **__: Any) -> None:
        self.ticks.append(time.perf_counter())

    def __exit__(self, *exc: Any) -> None:
        self.wall = time.perf_counter() - self.t0
        self.cpu = cpu_seconds() - self.cpu0
        self.other = self.meter.stop()

    def step_s(self) -> float | None:
        gaps = [b - a for a, b in zip(self.ticks, self.ticks[1:], strict=False)]
        return statistics.median(gaps) if gaps else None


def run_diffusers(state: dict[str, Any], size: int, steps: int) -> dict[str, Any]:
    import torch

    from leansd.sampling.samplers import build_scheduler

    bundle = state["bundle"]
    pipe = state.get("pipe")
    if pipe is None:
        from bench.txt2img_speed import diffusers_pipeline

        pipe = state["pipe"] = diffusers_pipeline(bundle, build_scheduler(SAMPLER, bundle.scheduler_config, seeds=[SEED]))
    pipe.scheduler = build_scheduler(SAMPLER, bundle.scheduler_config, seeds=[SEED])
    timed = Timed()

    def on_step(_pipe: Any, _i: int, _t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        timed.tick()
        return kwargs

    with timed:
        latents = pipe(prompt=PROMPT, height=size, width=size, num_inference_steps=steps, guidance_scale=GUIDANCE,
                       generator=[torch.Generator("cpu").manual_seed(SEED)], output_type="latent",
                       callback_on_step_end=on_step).images
        t0 = time.perf_counter()
        with torch.no_grad():
            decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
        pixels = pipe.image_processor.postprocess(decoded, output_type="np")
        decode_s = time.perf_counter() - t0
    return result(timed, decode_s, pixels[0])


def run_leansd(state: dict[str, Any], size: int, steps: int) -> dict[str, Any]:
    engine = state["engine"]
    timed = Timed()
    with timed:
        out = engine.generate(request_for(size, steps), progress=timed.tick, progress_bar=False)
    return result(timed, out.timings.get("decode"), out.pixels[0])


def run_spike(state: dict[str, Any], size: int, steps: int) -> dict[str, Any]:
    """OpenVINO UNet and VAE decoder called directly; prompt encode and scheduler as diffusers does."""
    import numpy as np
    import torch

    from leansd.sampling.samplers import build_scheduler

    bundle = state["bundle"]
    unet, vae = spike_models(state, size)
    pipe = state.get("pipe")
    if pipe is None:
        from bench.txt2img_speed import diffusers_pipeline

        pipe = state["pipe"] = diffusers_pipeline(bundle, build_scheduler(SAMPLER, bundle.scheduler_config, seeds=[SEED]))
    scheduler = build_scheduler(SAMPLER, bundle.scheduler_config, seeds=[SEED])
    timed = Timed()
    with timed, torch.no_grad():
        cond, uncond = pipe.encode_prompt(PROMPT, "cpu", 1, True)
        text = torch.cat([uncond, cond]).numpy()
        scheduler.set_timesteps(steps)
        latents = torch.randn((1, 4, size // 8, size // 8), generator=torch.Generator("cpu").manual_seed(SEED))
        latents = latents * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            x = scheduler.scale_model_input(torch.cat([latents] * 2), t)
            noise = torch.from_numpy(unet([x.numpy(), np.array([float(t)], dtype=np.float32), text])[0])
            uncond_noise, cond_noise = noise.chunk(2)
            noise = uncond_noise + GUIDANCE * (cond_noise - uncond_noise)
            latents = scheduler.step(noise, t, latents, return_dict=False)[0]
            timed.tick()
        t0 = time.perf_counter()
        decoded = torch.from_numpy(vae([(latents / bundle.vae.config.scaling_factor).numpy()])[0])
        pixels = pipe.image_processor.postprocess(decoded, output_type="np")
        decode_s = time.perf_counter() - t0
    return result(timed, decode_s, pixels[0])


def spike_models(state: dict[str, Any], size: int) -> tuple[Any, Any]:
    """The compiled UNet and VAE decoder for this size (recompiled when size or config changes)."""
    import openvino as ov

    key = (size, state["ov_threads"], state["ov_precision"])
    if state.get("compiled_key") != key:
        state.pop("compiled", None)
        gc.collect()
        core = state.setdefault("core", ov.Core())
        config = {"INFERENCE_PRECISION_HINT": state["ov_precision"], "PERFORMANCE_HINT": "LATENCY"}
        if state["ov_threads"]:
            config["INFERENCE_NUM_THREADS"] = state["ov_threads"]
        h = size // 8
        unet = core.read_model(str(state["cache"] / "unet.xml"))
        vae = core.read_model(str(state["cache"] / "vae_decoder.xml"))
        if not state.get("dynamic"):
            unet.reshape({0: [2, 4, h, h], 1: [1], 2: [2, 77, 768]})
            vae.reshape({0: [1, 4, h, h]})
        t0 = time.perf_counter()
        state["compiled"] = (core.compile_model(unet, "CPU", config), core.compile_model(vae, "CPU", config))
        state.setdefault("compile_s", []).append(time.perf_counter() - t0)
        state["compiled_key"] = key
    return state["compiled"]


def result(timed: Timed, decode_s: float | None, pixels: Any) -> dict[str, Any]:
    image = to_uint8(pixels)
    return {"wall": timed.wall, "cpu": timed.cpu, "other": timed.other, "step_s": timed.step_s(),
            "decode_s": decode_s, "shape": list(image.shape), "image": base64.b64encode(image.tobytes()).decode()}


RUNNERS: dict[str, Callable[[dict[str, Any], int, int], dict[str, Any]]] = {
    "diffusers": run_diffusers, "leansd-torch": run_leansd, "leansd-ov": run_leansd, "ov-spike": run_spike}


def worker(kind: str, model: str, options: dict[str, Any]) -> None:
    """Serve `{"variant", "size", "steps", "threads"}` lines; answer one JSON line each on stdout."""
    import torch

    t0 = time.perf_counter()
    state: dict[str, Any] = dict(options)
    state["bundle"] = bundle = build_bundle(model)
    build_s = time.perf_counter() - t0
    if kind == "torch":
        from leansd.engine.engine import Engine

        state["engine"] = Engine(bundle, device="cpu", precision="full", prompt_cache=False, backend="torch")
    elif kind == "ov":
        from leansd.engine.engine import Engine

        state["engine"] = Engine(bundle, device="cpu", precision="full", prompt_cache=False, backend="openvino")
    elif kind == "spike":
        state["cache"] = Path(options["cache"])
        del bundle.unet  # the spike runs the converted UNet only
        gc.collect()
    send({"ready": True, "build_s": build_s, "start_s": time.perf_counter() - t0, "peak_rss": peak_rss()})
    for line in sys.stdin:
        command = json.loads(line)
        if command.get("op") == "stats":
            send({"peak_rss": peak_rss(), "compile_s": state.get("compile_s", [])})
            continue
        if command.get("threads"):
            torch.set_num_threads(int(command["threads"]))
        t1 = time.perf_counter()
        out = RUNNERS[command["variant"]](state, int(command["size"]), int(command["steps"]))
        out["outside_s"] = time.perf_counter() - t1 - out["wall"]
        send(out)


def send(payload: dict[str, Any]) -> None:
    sys.stdout.write(RESULT + json.dumps(payload) + "\n")
    sys.stdout.flush()


class Worker:
    """A worker subprocess; `ask` sends a command and waits for its answer line."""

    def __init__(self, kind: str, model: str, *, env: dict[str, str], options: dict[str, Any]) -> None:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--models", model,
               "--worker-options", json.dumps(options)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env={**os.environ, **env, "PYTHONPATH": str(ROOT)})
        self.ready = self._read()

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(RESULT):
                return json.loads(line[len(RESULT):])
        raise RuntimeError(f"worker exited with {self.proc.wait()}")

    def ask(self, **command: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait(timeout=120)


# ---------------------------------------------------------------------------------------------
# Conversion measurements
# ---------------------------------------------------------------------------------------------


def first_conversion(model: str, sizes: list[int]) -> dict[str, Any]:
    """A fresh process with an empty cache: leansd's OpenVINO engine makes one 1-step image per size
    (converting the UNet and VAE decoder for each shape); times, peak RSS."""
    from leansd.engine.engine import Engine

    t0 = time.perf_counter()
    bundle = build_bundle(model)
    build_s = time.perf_counter() - t0
    built_rss = peak_rss()
    engine = Engine(bundle, device="cpu", precision="full", prompt_cache=False, backend="openvino")
    images = {}
    for size in sizes:
        t1 = time.perf_counter()
        engine.generate(request_for(size, 1), progress_bar=False)
        images[size] = time.perf_counter() - t1
    backend = engine.backend
    return {"build_s": build_s, "built_rss": built_rss, "images_s": images, "peak_rss": peak_rss(),
            "conversions": getattr(backend, "conversions", None),
            "conversion_s": getattr(backend, "conversion_seconds", None)}


def child_json(args: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), *args]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, **(env or {}),
                                                                       "PYTHONPATH": str(ROOT)})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT)]
    if proc.returncode != 0 or not lines:
        return {"error": f"exit {proc.returncode}"}
    return json.loads(lines[-1][len(RESULT):])


def later_start(cache: Path, size: int) -> dict[str, Any]:
    """A fresh process: read the cached IRs, reshape to `size`, compile, one UNet call."""
    import numpy as np
    import openvino as ov

    t0 = time.perf_counter()
    core = ov.Core()
    unet = core.read_model(str(cache / "unet.xml"))
    h = size // 8
    unet.reshape({0: [2, 4, h, h], 1: [1], 2: [2, 77, 768]})
    compiled = core.compile_model(unet, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    compile_s = time.perf_counter() - t0
    inputs = [np.zeros((2, 4, h, h), np.float32), np.array([999.0], np.float32), np.zeros((2, 77, 768), np.float32)]
    compiled(inputs)
    return {"compile_s": compile_s, "first_call_s": time.perf_counter() - t0 - compile_s, "peak_rss": peak_rss()}


def conversion_table(strategies: list[str], cache_root: Path, *, size: int) -> tuple[str, Path | None]:
    rows = []
    keep: Path | None = None
    for strategy in strategies:
        free = mem_available()
        print(f"converting the UNet ({strategy}); MemAvailable {gib_text(free)} GiB ...", file=sys.stderr, flush=True)
        folder = cache_root / f"unet-{strategy}"
        folder.mkdir(parents=True, exist_ok=True)
        got = child_json(["--convert-child", strategy, "--out", str(folder / "unet.xml")])
        if "error" in got:
            rows.append([strategy, got["error"], "-", "-", "-", "-", "-"])
            continue
        start = child_json(["--later-start", str(folder), "--size", str(size)]) if strategy != "fp16-module" else {}
        rows.append([strategy, f"{got['build_s']:.0f}", f"{got['convert_s']:.0f}", f"{got['save_s']:.0f}",
                     gib_text(got["built_rss"]), gib_text(got["peak_rss"]), gib_text(got["disk"]),
                     f"{start['compile_s']:.1f}" if "compile_s" in start else "-",
                     gib_text(start.get("peak_rss"))])
        if strategy in ("fp32", "free-module") and keep is None:
            keep = folder
    table = markdown_table(["strategy", "build s", "convert s", "save s", "RSS after build GiB", "peak RSS GiB",
                            "IR on disk GiB", f"later start: read+reshape {size}+compile s", "later start peak GiB"],
                           rows)
    return table, keep


def gib_text(n: float | None) -> str:
    return "-" if n is None else f"{n / GIB:.2f}"


# ---------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------


def pixel_diff(a: dict[str, Any], b: dict[str, Any]) -> str:
    import numpy as np

    if a["shape"] != b["shape"]:
        return "shape differs"
    x = np.frombuffer(base64.b64decode(a["image"]), np.uint8).astype(np.int16)
    y = np.frombuffer(base64.b64decode(b["image"]), np.uint8).astype(np.int16)
    d = np.abs(x - y)
    return f"{d.max()} / {d.mean():.3f}"


def fmt(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def med(values: list[float | None]) -> float | None:
    clean = [v for v in values if v is not None]
    return statistics.median(clean) if clean else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="sd15", help="sd15 or sdxl (default sd15)")
    parser.add_argument("--sizes", default="256,512", help="comma list of square sizes (default 256,512)")
    parser.add_argument("--steps", type=int, default=4, help="sampling steps per timed image (default 4)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds per size (default 2)")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                        help=f"comma list of {', '.join(VARIANTS)} (default {','.join(DEFAULT_VARIANTS)})")
    parser.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                        help="untimed warm-up first: OpenVINO configs one 1-step image per size (compiles it), "
                             "torch configs one 64x64 image (default on)")
    parser.add_argument("--threads", default="", help="torch threads, comma list (default: torch's own choice)")
    parser.add_argument("--wait-policy", default="default",
                        help="torch OMP_WAIT_POLICY per torch process: comma list of default, passive")
    parser.add_argument("--ov-threads", default="0", help="OpenVINO INFERENCE_NUM_THREADS, comma list (0: its own)")
    parser.add_argument("--ov-precision", default="f32", help="spike: INFERENCE_PRECISION_HINT, comma list of f32, bf16")
    parser.add_argument("--dynamic", action="store_true", help="spike: compile the dynamic-shape IR without reshape")
    parser.add_argument("--cache", default=None, help="OpenVINO IR folder for the spike (default: a temporary one)")
    parser.add_argument("--strategies", default="fp32", help=f"conversion strategies: comma list of {', '.join(STRATEGIES)}")
    parser.add_argument("--convert-only", action="store_true", help="only the conversion measurements")
    parser.add_argument("--ram-budget", type=float, default=10.0,
                        help="GiB this benchmark may hold at once; processes that do not fit together run in "
                             "successive phases (default 10)")
    parser.add_argument("--isa", choices=sorted(ISA_LIMITS), default="native",
                        help="native (default) or avx2: every worker limits torch (ATen, oneDNN, MKL) and OpenVINO "
                             "(oneDNN) to AVX2 kernels, to stand in for an AVX2-only CPU on a newer one")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-options", default="{}", help=argparse.SUPPRESS)
    parser.add_argument("--convert-child", help=argparse.SUPPRESS)
    parser.add_argument("--convert-vae-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--later-start", help=argparse.SUPPRESS)
    parser.add_argument("--first-conversion-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--first-conversion", action=argparse.BooleanOptionalAction, default=True,
                        help="leansd-ov: first measure a conversion in a fresh process with an empty cache (default "
                             "on; off reuses --cache as it is)")
    parser.add_argument("--size", type=int, default=512, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]  # tables survive an interrupted run

    if args.worker:
        worker(args.worker, args.models, json.loads(args.worker_options))
        return 0
    if args.convert_child:
        send(convert_unet(args.convert_child, Path(args.out)))
        return 0
    if args.convert_vae_child:
        send(convert_vae_decoder(Path(args.out)))
        return 0
    if args.first_conversion_child:
        send(first_conversion(args.models, [int(x) for x in args.sizes.split(",")]))
        return 0
    if args.later_start:
        send(later_start(Path(args.later_start), args.size))
        return 0

    def split(text: str) -> list[str]:
        return [x.strip() for x in text.split(",") if x.strip()]

    variants = split(args.variants)
    strategies = split(args.strategies)
    policies = split(args.wait_policy)
    for name, values, valid in (("variant", variants, VARIANTS), ("strategy", strategies, STRATEGIES),
                                ("wait policy", policies, ("default", "passive")),
                                ("ov precision", split(args.ov_precision), ("f32", "bf16"))):
        bad = [v for v in values if v not in valid]
        if bad or not values:
            parser.error(f"unknown {name} {bad}; valid: {', '.join(valid)}")
    if args.models not in WORKER_GIB:
        parser.error(f"unknown model {args.models!r}; valid: {', '.join(WORKER_GIB)}")
    if args.models == "sdxl":
        parser.error("--models sdxl is not available yet: it needs a random SDXL bundle builder in bench/common.py "
                     "and about 11 GiB per fp32 torch process")
    if args.steps < 2 or args.rounds < 1:
        parser.error("--steps must be >= 2 (one step interval is timed) and --rounds >= 1")
    sizes = [int(s) for s in split(args.sizes)]
    threads = [int(t) for t in split(args.threads)] or [0]
    ov_threads = [int(t) for t in split(args.ov_threads)] or [0]
    ov_precisions = split(args.ov_precision)

    os.environ.update(ISA_LIMITS[args.isa])  # inherited by every worker and conversion process
    print(f"# CPU speed: {args.models} (random weights), {', '.join(f'{s}x{s}' for s in sizes)}\n")
    print(machine_lines())
    print(f"- CPU flags: {cpu_flags()}")
    print(f"- allowed cores (sched_getaffinity): {len(os.sched_getaffinity(0))}")
    print(f"- ISA limit: {args.isa}" + "".join(f", {k}={v}" for k, v in ISA_LIMITS[args.isa].items()))
    print(f"- openvino: {openvino_version()}")
    print(f"- command: python bench/cpu_speed.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(f"- sampler {SAMPLER}, CFG {GUIDANCE} (UNet batch 2), seed {SEED}, {args.steps} steps per image, "
          f"{args.rounds} rounds\n")

    cache_root = Path(args.cache) if args.cache else Path(tempfile.mkdtemp(prefix="cpu_speed-"))
    cache_root.mkdir(parents=True, exist_ok=True)
    try:
        spike_cache = None
        if args.convert_only or "ov-spike" in variants:
            have = (cache_root / "unet-fp32" / "unet.xml").exists() and not args.convert_only
            if have:
                spike_cache = cache_root / "unet-fp32"
            else:
                table, spike_cache = conversion_table(strategies, cache_root, size=max(sizes))
                print("## OpenVINO UNet conversion (fresh process per strategy)\n")
                print(table + "\n")
            if args.convert_only:
                return 0
            if spike_cache is None:
                parser.error("the spike needs the fp32 or free-module strategy in --strategies")
            if not (spike_cache / "vae_decoder.xml").exists():
                vae = child_json(["--convert-vae-child", "--out", str(spike_cache / "vae_decoder.xml")])
                print(f"- VAE decoder conversion: {fmt(vae.get('convert_s'), 0)} s, peak RSS "
                      f"{gib_text(vae.get('peak_rss'))} GiB\n")
        if "leansd-ov" in variants and args.first_conversion:
            leansd_cache = cache_root / "leansd"
            print(f"first OpenVINO conversion (fresh process); MemAvailable {gib_text(mem_available())} GiB ...",
                  file=sys.stderr, flush=True)
            first = child_json(["--first-conversion-child", "--models", args.models, "--sizes", args.sizes],
                               env={"LEANSD_CACHE_DIR": str(leansd_cache)})
            print("## leansd OpenVINO: first conversion (fresh process, empty cache)\n")
            if "error" in first:
                print(f"failed: {first['error']}\n")
            else:
                per_size = ", ".join(f"{s}: {v:.0f} s" for s, v in first["images_s"].items())
                print(f"- model build {first['build_s']:.0f} s (RSS {gib_text(first['built_rss'])} GiB); first 1-step "
                      f"image per size, conversion included: {per_size}; parts converted: {first['conversions']} in "
                      f"{fmt(first['conversion_s'], 0)} s; process peak RSS {gib_text(first['peak_rss'])} GiB; "
                      f"cache on disk {gib_text(disk_bytes(leansd_cache))} GiB\n")
        bench(args, variants, sizes, threads, policies, ov_threads, ov_precisions, spike_cache, cache_root)
    finally:
        if not args.cache:
            shutil.rmtree(cache_root, ignore_errors=True)
    return 0


def openvino_version() -> str:
    from bench.common import _version

    return _version("openvino")


def bench(args: argparse.Namespace, variants: list[str], sizes: list[int], threads: list[int], policies: list[str],
          ov_threads: list[int], ov_precisions: list[str], spike_cache: Path | None, cache_root: Path) -> None:
    # The processes and the configs each one serves.
    specs: list[tuple[str, str, dict[str, str], dict[str, Any]]] = []  # (label, kind, env, options)
    configs: list[tuple[str, str, dict[str, Any]]] = []  # (config label, process label, command)
    torch_variants = [v for v in variants if v in ("diffusers", "leansd-torch")]
    for policy in policies if torch_variants else []:
        label = f"torch {policy}"
        specs.append((label, "torch", {"OMP_WAIT_POLICY": "PASSIVE"} if policy == "passive" else {}, {}))
        for v in torch_variants:
            for t in threads:
                name = v + (f" {t}t" if t else "") + (" passive" if policy == "passive" else "")
                configs.append((name, label, {"variant": v, "threads": t}))
    if "leansd-ov" in variants:
        specs.append(("openvino", "ov", {"LEANSD_CACHE_DIR": str(cache_root / "leansd")}, {}))
        configs.append(("leansd-ov", "openvino", {"variant": "leansd-ov", "threads": 0}))
    if "ov-spike" in variants:
        for prec in ov_precisions:
            for t in ov_threads:
                label = f"ov-spike {prec}" + (f" {t}t" if t else "") + (" dynamic" if args.dynamic else "")
                specs.append((label, "spike", {}, {"cache": str(spike_cache), "ov_threads": t, "ov_precision": prec,
                                                   "dynamic": args.dynamic}))
                configs.append((label, label, {"variant": "ov-spike", "threads": 0}))

    # Processes that fit together in the RAM budget run at the same time (their configs interleave);
    # the rest run in later phases.
    phases: list[list[str]] = [[]]
    need = 0.0
    for label, kind, _, _ in specs:
        gib = WORKER_GIB[args.models][kind]
        if phases[-1] and need + gib > args.ram_budget:
            phases.append([])
            need = 0.0
        phases[-1].append(label)
        need += gib
    kinds = {label: kind for label, kind, _, _ in specs}
    free = mem_available()
    print(f"- processes: {len(specs)} in {len(phases)} phase(s) ({' | '.join(', '.join(p) for p in phases)}); "
          f"MemAvailable {gib_text(free)} GiB\n")

    results: dict[tuple[str, int], list[dict[str, Any]]] = {}
    warm: dict[tuple[str, int], dict[str, Any]] = {}
    ready: dict[str, dict[str, Any]] = {}
    stats: dict[str, dict[str, Any]] = {}
    phase_of: dict[str, int] = {}
    for number, phase in enumerate(phases, start=1):
        workers: dict[str, Worker] = {}
        phase_configs = [c for c in configs if c[1] in phase]
        try:
            for label, kind, env, options in specs:
                if label in phase:
                    print(f"phase {number}: starting {label}; MemAvailable {gib_text(mem_available())} GiB ...",
                          file=sys.stderr, flush=True)
                    workers[label] = Worker(kind, args.models, env=env, options=options)
                    ready[label] = workers[label].ready
                    phase_of[label] = number
            for size in sizes:
                for name, process, command in phase_configs if args.warmup else []:
                    # OpenVINO: compile for this shape (from the cache); torch: one cheap 64x64 image warms
                    # the allocator and kernels (its first step is excluded from s/step anyway).
                    ov_kind = kinds[process] != "torch"
                    if ov_kind or size == sizes[0]:
                        print(f"warm-up {name} {size} ...", file=sys.stderr, flush=True)
                        warm[(name, size)] = workers[process].ask(**command, size=size if ov_kind else 64, steps=1)
                for r in range(args.rounds):
                    order = phase_configs[r % len(phase_configs):] + phase_configs[:r % len(phase_configs)]
                    for name, process, command in order:
                        print(f"round {r + 1} {name} {size} ...", file=sys.stderr, flush=True)
                        results.setdefault((name, size), []).append(
                            workers[process].ask(**command, size=size, steps=args.steps))
            stats.update({label: w.ask(op="stats") for label, w in workers.items()})
        finally:
            for w in workers.values():
                w.close()

    process_of = {name: process for name, process, _ in configs}
    rows = []
    reference = configs[0][0]
    for size in sizes:
        ref = results.get((reference, size), [])
        ref_step, ref_image = med([x["step_s"] for x in ref]), med([x["wall"] for x in ref])
        for name, _, _ in configs:
            runs = results[(name, size)]
            step, decode, image = med([x["step_s"] for x in runs]), med([x["decode_s"] for x in runs]), \
                med([x["wall"] for x in runs])
            cpu = med([x["cpu"] for x in runs])
            est = None if image is None or step is None else image + (EST_STEPS - args.steps) * step
            first = warm.get((name, size))
            rows.append([
                name, phase_of[process_of[name]], f"{size}x{size}",
                fmt(first["wall"], 1) if first and kinds[process_of[name]] != "torch" else "-", fmt(step), fmt(decode), fmt(image), fmt(est, 1), fmt(cpu, 1),
                fmt(cpu / image if cpu and image else None), fmt(med([x["other"] for x in runs])),
                fmt(step / ref_step if step and ref_step else None) + "x",
                fmt(image / ref_image if image and ref_image else None) + "x",
                pixel_diff(runs[-1], ref[-1]) if ref else "-",
            ])
    print(f"## Time per image ({args.steps} steps; medians of {args.rounds} interleaved rounds)\n")
    print(markdown_table(
        ["config", "phase", "size", "first 1-step image s (cache hit, compile incl.)", "s/step", "VAE decode s", "s/image", f"s/image at {EST_STEPS} steps (est.)",
         "CPU s/image", "CPU/wall", "other load (cores)", f"step vs {reference}", f"image vs {reference}",
         f"8-bit diff vs {reference} (max / mean)"], rows))
    print("\n## Processes\n")
    proc_rows = []
    for label, info in ready.items():
        compile_s = stats[label].get("compile_s") or []
        proc_rows.append([label, fmt(info["build_s"], 1), fmt(info["start_s"], 1),
                          ", ".join(f"{c:.1f}" for c in compile_s) or "-", gib_text(info["peak_rss"]),
                          gib_text(stats[label]["peak_rss"])])
    print(markdown_table(["process", "model build s", "start-up s (build + engine)", "OpenVINO compile s",
                          "peak RSS after start GiB", "peak RSS GiB"], proc_rows))


if __name__ == "__main__":
    raise SystemExit(main())
