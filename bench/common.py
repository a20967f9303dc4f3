"""Shared pieces of the benchmarks: full-size random SD 1.5 models, the machine, markdown tables.

The models have the published SD 1.5 architecture (`leansd.models.configs.SD15_*_CONFIG`) and
seeded RANDOM weights: they cost exactly what the real ones cost to load and run, and their
pictures are noise. Nothing here touches the network.
"""

from __future__ import annotations

import datetime
import os
import platform
import re
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

# Run as `python bench/<name>.py` from the repository root: make `bench` and `leansd` importable.
REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

if TYPE_CHECKING:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from leansd.models.bundle import ModelBundle

GIB = 1024**3
MIB = 1024**2
PROMPT = "a photograph of an astronaut riding a horse"


@dataclass
class Components:
    unet: "UNet2DConditionModel"
    vae: "AutoencoderKL"
    text_encoder: "CLIPTextModel"


def build_sd15_components(*, seed: int = 0, dtype: "torch.dtype | None" = None) -> Components:
    """Full-size SD 1.5 UNet, VAE and CLIP text encoder with seeded random weights, on the CPU, eval mode.

    The modules are built with parameters on the meta device (no default init, which takes
    minutes at this size), then every parameter gets fresh seeded values: matrices and
    convolutions N(0, 1/fan_in) (activations keep their scale through the 100+ layers), norm
    weights 1 + N(0, 0.1^2), everything else N(0, 0.02^2). Same seed, same tensors.
    """
    parts = [build_sd15_part(part, seed=seed, dtype=dtype) for part in SD15_PARTS]
    return Components(unet=parts[0], vae=parts[1], text_encoder=parts[2])


SD15_PARTS = ("unet", "vae", "text_encoder")


def build_sd15_part(part: str, *, seed: int = 0, dtype: "torch.dtype | None" = None) -> Any:
    """One module of `build_sd15_components` ("unet", "vae" or "text_encoder"): the same tensors, alone."""
    import accelerate
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from leansd.models.configs import SD15_TEXT_CONFIG, SD15_UNET_CONFIG, SD15_VAE_CONFIG

    dtype = dtype or torch.float32
    # Parameters on meta, buffers real (CLIP's position_ids is a buffer the weights do not carry).
    with accelerate.init_empty_weights(include_buffers=False):
        if part == "unet":
            module = UNet2DConditionModel(**SD15_UNET_CONFIG)
        elif part == "vae":
            module = AutoencoderKL(**SD15_VAE_CONFIG)
        elif part == "text_encoder":
            module = CLIPTextModel(CLIPTextConfig(**SD15_TEXT_CONFIG))
        else:
            raise ValueError(f"unknown SD 1.5 part {part!r}; valid: {', '.join(SD15_PARTS)}")
    fill_random(module, torch.Generator().manual_seed(seed * 1000 + SD15_PARTS.index(part) + 1), dtype)
    return module


def fill_random(module: "torch.nn.Module", generator: "torch.Generator", dtype: "torch.dtype") -> None:
    """Seeded random values for every parameter still on meta (see build_sd15_components); eval mode."""
    import torch

    weights = {}
    for name, param in module.named_parameters():
        value = torch.empty(param.shape, dtype=torch.float32)
        if name.endswith("weight") and param.ndim >= 2:
            value.normal_(0.0, param[0].numel() ** -0.5, generator=generator)
        elif "norm" in name and name.endswith("weight"):
            value.normal_(1.0, 0.1, generator=generator)
        else:
            value.normal_(0.0, 0.02, generator=generator)
        weights[name] = value if dtype == torch.float32 else value.to(dtype)
    module.load_state_dict(weights, strict=False, assign=True)
    left = [n for n, p in module.named_parameters() if p.is_meta]
    left += [n for n, b in module.named_buffers() if b.is_meta]
    if left:
        raise RuntimeError(f"{type(module).__name__}: {len(left)} tensors left on meta ({left[:3]})")
    module.eval()
    module.requires_grad_(False)


def family_bundle(family: str, *, seed: int = 0, dtype: "torch.dtype | None" = None) -> "ModelBundle":
    """A full-size model of `family` ("sd1", "sd2" = SD 2.1 768-v, "sdxl" = SDXL base) with seeded random
    weights (as build_sd15_components), as a leansd ModelBundle. SDXL in fp16 holds about 7 GB."""
    import accelerate
    import torch
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from leansd.models.bundle import ModelBundle
    from leansd.models.configs import SD1_SCHEDULER_CONFIG, full_size_configs
    from leansd.models.families import describe
    from leansd.models.family import ModelFamily
    from leansd.models.tokenizer import bundled_tokenizer

    if family == "sd1":
        return sd15_bundle(build_sd15_components(seed=seed, dtype=dtype))
    kind = ModelFamily(family)
    spec = describe(kind)
    dtype = dtype or torch.float32
    unet_config, vae_config, texts = full_size_configs(kind)
    with accelerate.init_empty_weights(include_buffers=False):
        unet = UNet2DConditionModel(**unet_config)
        vae = AutoencoderKL(**vae_config)
        encoders = [getattr(transformers, name)(transformers.CLIPTextConfig(**config)) for name, config in texts]
    for offset, module in enumerate((unet, vae, *encoders), start=1):
        fill_random(module, torch.Generator().manual_seed(seed * 1000 + offset), dtype)
    v = kind is ModelFamily.SD2  # SD 2.1 at 768 px is the v-prediction model
    pads = [encoder.pad_token for encoder in spec.text_encoders]
    return ModelBundle(
        unet=unet, vae=vae, text_encoder=encoders[0], tokenizer=bundled_tokenizer(pad_token=pads[0]),
        family=kind, name=f"random-{family}", source=f"random-{family}",
        scheduler_config=dict(SD1_SCHEDULER_CONFIG, prediction_type="v_prediction" if v else "epsilon"),
        default_size=spec.native_size_for("v_prediction" if v else "epsilon"), is_random=True,
        text_encoder_2=encoders[1] if len(encoders) > 1 else None,
        tokenizer_2=bundled_tokenizer(pad_token=pads[1]) if len(encoders) > 1 else None,
        text_layer=spec.text_encoders[0].layer,
    )


def sd15_bundle(components: Components, *, name: str = "random-sd15") -> "ModelBundle":
    """A leansd ModelBundle over these very module objects (nothing copied)."""
    from leansd.models.bundle import ModelBundle
    from leansd.models.configs import SD1_SCHEDULER_CONFIG
    from leansd.models.family import ModelFamily
    from leansd.models.tokenizer import bundled_tokenizer

    return ModelBundle(
        unet=components.unet,
        vae=components.vae,
        text_encoder=components.text_encoder,
        tokenizer=bundled_tokenizer(),
        family=ModelFamily.SD1,
        name=name,
        source=name,
        scheduler_config=dict(SD1_SCHEDULER_CONFIG),
        default_size=512,
        is_random=True,
    )


def write_sd15_diffusers_config(folder: str | os.PathLike[str]) -> Path:
    """A diffusers SD 1.5 pipeline folder with configs, scheduler and tokenizer but NO weights (~3.6 MB).

    This is what diffusers' `from_single_file(path, config=folder, local_files_only=True)` needs
    to work offline.
    """
    import accelerate
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig

    from leansd.models.configs import SD15_TEXT_CONFIG, SD15_UNET_CONFIG, SD15_VAE_CONFIG
    from leansd.models.tiny import write_pipeline_files

    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    with accelerate.init_empty_weights():
        UNet2DConditionModel(**SD15_UNET_CONFIG).save_config(root / "unet")
        AutoencoderKL(**SD15_VAE_CONFIG).save_config(root / "vae")
    text_config = CLIPTextConfig(**SD15_TEXT_CONFIG)
    text_config.architectures = ["CLIPTextModel"]
    text_config.save_pretrained(root / "text_encoder")
    write_pipeline_files(root)
    return root


# ---------------------------------------------------------------------------------------------
# Memory of this process (Linux)
# ---------------------------------------------------------------------------------------------


def proc_status() -> dict[str, int]:
    """Memory lines of /proc/self/status in bytes: VmRSS, VmHWM, RssAnon, RssFile, RssShmem."""
    out = {}
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(value.split()[0]) * 1024  # kB
    return out


def peak_rss() -> int:
    """Peak resident set of this process in bytes (ru_maxrss is in kB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _busy_seconds() -> float:
    """CPU seconds all processes have spent busy (user, system, irq, steal), from /proc/stat."""
    with open("/proc/stat", encoding="ascii") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class OtherLoad:
    """How many cores OTHER processes kept busy while this one ran (Linux; None elsewhere).

    On a shared 2-core machine one busy neighbour slows a 2-thread torch run far more than 2x;
    the benchmarks print this next to every timing so a disturbed number can be recognised.
    """

    def __init__(self) -> None:
        self._start: tuple[float, float, float] | None = None

    def start(self) -> None:
        try:
            self._start = (time.perf_counter(), _busy_seconds(), _own_seconds())
        except OSError:
            self._start = None

    def stop(self) -> float | None:
        if self._start is None:
            return None
        t0, busy0, own0 = self._start
        wall = time.perf_counter() - t0
        try:
            other = (_busy_seconds() - busy0) - (_own_seconds() - own0)
        except OSError:
            return None
        return max(other, 0.0) / wall if wall > 0 else None


def wait_until_quiet(*, max_seconds: float, threshold: float = 0.2, window: float = 2.0) -> float | None:
    """Wait (at most ``max_seconds``) until other processes use under ``threshold`` cores.

    Returns the other load of the last window (None where /proc/stat is unreadable).
    """
    deadline = time.perf_counter() + max_seconds
    while True:
        meter = OtherLoad()
        meter.start()
        time.sleep(window)
        load = meter.stop()
        if load is None or load < threshold or time.perf_counter() >= deadline:
            return load


# ---------------------------------------------------------------------------------------------
# The machine and the tables
# ---------------------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return platform.processor() or platform.machine()
    match = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    name = match.group(1).strip() if match else platform.machine()
    flags = re.search(r"^flags\s*:\s*(.+)$", text, re.M)
    if flags:
        wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "avx512_fp16")
        have = [f for f in wanted if f in flags.group(1).split()]
        name += f" ({', '.join(have) or 'no avx2'})"
    return name


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine_description() -> dict[str, str]:
    """CPU, cores, threads, RAM, library versions and date; imports nothing heavy."""
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        ram = f"{pages / GIB:.1f} GiB"
    except (ValueError, OSError):
        ram = "unknown"
    return {
        "cpu": _cpu_model(),
        "cores": str(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "unset"),
        "ram": ram,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "torch": _version("torch"),
        "diffusers": _version("diffusers"),
        "transformers": _version("transformers"),
        "safetensors": _version("safetensors"),
        "leansd": f"{_version('leansd')} ({_leansd_commit()})",
        "gpu": "none (CPU only)" if not _has_cuda_device() else "CUDA present",
        "date": datetime.date.today().isoformat(),
    }


def _leansd_commit() -> str:
    """Short commit of the leansd code these benchmarks import, flagged if leansd/ has local edits."""

    def git(*args: str) -> str:
        proc = subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, timeout=10)
        if proc.returncode != 0:
            raise OSError(proc.stderr.strip())
        return proc.stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--", "leansd")
    except (OSError, subprocess.SubprocessError):
        return "commit unknown: not a git checkout"
    return f"commit {commit}" + (", plus uncommitted changes in leansd/" if dirty else "")


def _has_cuda_device() -> bool:
    return Path("/dev/nvidia0").exists()


def machine_lines() -> str:
    return "\n".join(f"- {k}: {v}" for k, v in machine_description().items())


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; numbers right-aligned."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    numeric = [all(_is_number(r[i]) for r in cells) and bool(cells) for i in range(len(headers))]

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric, strict=True)]
        return "| " + " | ".join(parts) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if num else ("-" * (w + 2)) for w, num in zip(widths, numeric, strict=True)) + "|"
    return "\n".join([line(headers), rule, *(line(r) for r in cells)])


def _is_number(text: str) -> bool:
    return bool(re.fullmatch(r"[-+]?[0-9.,]+(e[-+]?\d+)?[x%]?", text))


def gib(n_bytes: float | None) -> str:
    return "-" if n_bytes is None else f"{n_bytes / GIB:.2f}"

