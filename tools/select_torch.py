#!/usr/bin/env python3
"""Choose the PyTorch build for this machine and print the pip arguments that install it.

    python tools/select_torch.py [auto|cu126|cu130|cpu]      # what `make install` runs

Standard library only: it runs before anything is installed. The explanation goes to stderr, the
pip arguments to stdout, one per line, e.g.

    torch==2.13.0+cu126
    --index-url
    https://download.pytorch.org/whl/cu126

Builds (torch pinned to TORCH_VERSION; PyTorch 2.15 drops Maxwell and Pascal, and CUDA 12.6 wheels
exist up to 2.14):

- cu126: CUDA 12.6, compute capability 5.0-9.0 (Maxwell, Pascal, Volta, Turing, Ampere, Ada,
  Hopper); NVIDIA driver 525.60.13 or newer.
- cu130: CUDA 13.0, compute capability 7.5-12.x (Turing to Blackwell); driver 580.65.06 or newer.
  CUDA 13 no longer builds for Maxwell, Pascal or Volta.
- cpu: no NVIDIA GPU. Plain `torch==TORCH_VERSION` is used where it already is a CPU build (macOS,
  Windows, a local CPU wheel); where it would be a multi-GB CUDA build (Linux from PyPI), the
  official CPU index is used instead.

`auto` asks `nvidia-smi` for every GPU's compute capability and the driver version and picks the
build that runs on the most of them (cu130 where it covers as many as cu126: it is the newer one).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass

TORCH_VERSION = "2.13.0"
INDEX_BASE = "https://download.pytorch.org/whl"
CHOICES = ("auto", "cu126", "cu130", "cpu")
NVIDIA_SMI_TIMEOUT = 20.0


@dataclass(frozen=True)
class Build:
    name: str
    description: str
    min_capability: tuple[int, int]
    max_major: int
    """Newest compute-capability major version with kernels in this build."""
    min_driver: str


BUILDS = (
    # Newest first: on a tie (same GPUs covered) the newer CUDA wins.
    Build("cu130", "CUDA 13.0", (7, 5), 12, "580.65.06"),
    Build("cu126", "CUDA 12.6", (5, 0), 9, "525.60.13"),
)


@dataclass(frozen=True)
class Gpu:
    name: str
    capability: tuple[int, int] | None
    """None when the driver is too old to report it."""
    driver: str
    """As nvidia-smi prints it, e.g. 535.183.01."""


@dataclass(frozen=True)
class Choice:
    build: str
    """cu126, cu130 or cpu."""
    reason: str
    warnings: tuple[str, ...] = ()


def _version(text: str) -> tuple[int, ...]:
    if not re.fullmatch(r"\d+(\.\d+)*", text):
        raise ValueError(f"not a version number: {text!r}")
    return tuple(int(part) for part in text.split("."))


def _dotted(version: tuple[int, ...]) -> str:
    return ".".join(str(part) for part in version)


def parse_gpus(text: str, *, with_capability: bool = True) -> list[Gpu]:
    """GPUs from `nvidia-smi --query-gpu=[compute_cap,]driver_version,name --format=csv,noheader`.

    One line per GPU, e.g. `6.1, 535.183.01, NVIDIA GeForce GTX 1060 6GB`. Raises ValueError on
    any line it cannot read (the caller then falls back to the CPU build and says why).
    """
    gpus = []
    for line in text.splitlines():
        if not line.strip():
            continue
        fields = [field.strip() for field in line.split(",", 2 if with_capability else 1)]
        if len(fields) != (3 if with_capability else 2):
            raise ValueError(f"unexpected nvidia-smi line {line.strip()!r}")
        capability = None
        if with_capability:
            cap = _version(fields.pop(0))
            if len(cap) != 2:
                raise ValueError(f"unexpected compute capability in {line.strip()!r}")
            capability = (cap[0], cap[1])
        driver, name = fields
        _version(driver)  # must be a version number
        gpus.append(Gpu(name=name or "NVIDIA GPU", capability=capability, driver=driver))
    return gpus


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT, check=False)


def detect_gpus() -> tuple[list[Gpu], str | None]:
    """(GPUs, problem). No nvidia-smi or no GPU: ([], None). Unreadable answer: ([], why)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return [], None
    query = [smi, "--query-gpu=compute_cap,driver_version,name", "--format=csv,noheader"]
    try:
        done = _run(query)
        if done.returncode == 0:
            return parse_gpus(done.stdout), None
        # Drivers before ~510 do not know the compute_cap field: ask for the driver alone.
        older = _run([smi, "--query-gpu=driver_version,name", "--format=csv,noheader"])
        if older.returncode == 0:
            return parse_gpus(older.stdout, with_capability=False), None
        message = " ".join((done.stderr or done.stdout).split()) or f"exit status {done.returncode}"
        return [], f"nvidia-smi failed ({message[:200]})"
    except subprocess.TimeoutExpired:
        return [], f"nvidia-smi did not answer within {NVIDIA_SMI_TIMEOUT:.0f} s"
    except (OSError, ValueError) as exc:
        return [], f"nvidia-smi gave an answer this script cannot read ({' '.join(str(exc).split())[:200]})"


def covers(build: Build, capability: tuple[int, int]) -> bool:
    """Whether `build` has kernels for a GPU of this compute capability."""
    return build.min_capability <= capability and capability[0] <= build.max_major


def _describe(gpu: Gpu) -> str:
    cap = "compute capability unknown" if gpu.capability is None else f"compute capability {_dotted(gpu.capability)}"
    return f"{gpu.name} ({cap}, driver {gpu.driver})"


def choose(gpus: list[Gpu], problem: str | None = None) -> Choice:
    """The build for these GPUs (pure: the tests feed it parsed nvidia-smi answers)."""
    if problem is not None:
        return Choice("cpu", f"{problem}; installing the CPU build",
                      ("if this machine has a working NVIDIA GPU, choose its build: make run TORCH=cu126 or TORCH=cu130",))
    if not gpus:
        return Choice("cpu", "no NVIDIA GPU found (no nvidia-smi, or it lists no GPU): CPU build")
    listing = "; ".join(_describe(gpu) for gpu in gpus)
    known = [gpu.capability for gpu in gpus if gpu.capability is not None]
    supported = [cap for cap in known if any(covers(build, cap) for build in BUILDS)]
    if known and not supported:
        return Choice("cpu", f"{listing}: no PyTorch {TORCH_VERSION} CUDA build runs on this GPU "
                             f"(the oldest supported is compute capability {_dotted(BUILDS[-1].min_capability)}); "
                             "installing the CPU build")
    driver = min(_version(gpu.driver) for gpu in gpus)  # one driver serves every GPU; the oldest reported
    usable = [build for build in BUILDS if driver >= _version(build.min_driver)]
    # Among the builds this driver runs, the one with kernels for the most GPUs; newest on a tie.
    scored = [(sum(covers(build, cap) for cap in known), -i, build) for i, build in enumerate(usable)]
    count, _, build = max(scored, key=lambda item: item[:2]) if scored else (0, 0, None)
    if build is None or (known and count == 0):
        # The GPUs need a build this driver cannot run: name the one with the oldest driver minimum.
        needed = next((b for b in reversed(BUILDS) if any(covers(b, cap) for cap in supported)), BUILDS[-1])
        return Choice("cpu", f"{listing}: the {needed.description} build needs NVIDIA driver "
                             f"{needed.min_driver} or newer; installing the CPU build", (
            f"update the NVIDIA driver to {needed.min_driver} or newer, then: make clean && make run",))
    if not known:  # a driver too old to report compute capabilities: the build with the most GPUs
        build = usable[-1]
        return Choice(build.name, f"{listing}: {build.description} build (the widest range of GPUs)")
    warnings = tuple(
        f"{_describe(gpu)} is not supported by the {build.description} build: leansd refuses it "
        "(pick a supported GPU with --device cuda:N)"
        for gpu in gpus if gpu.capability is not None and not covers(build, gpu.capability)
    )
    reason = f"{listing}: {build.description} build"
    if build is not BUILDS[0] and driver < _version(BUILDS[0].min_driver):
        reason += f" (the driver is older than {BUILDS[0].min_driver}, which {BUILDS[0].description} needs)"
    return Choice(build.name, reason, warnings)


def pypi_torch_is_cuda(platform_tag: str | None = None) -> bool:
    """Whether PyPI's torch for this platform (`sys.platform-machine`, e.g. linux-x86_64) is a CUDA build.

    On Linux x86_64 it is (a multi-GB download with its nvidia-* packages); on macOS, Windows and
    Linux aarch64 it is not assumed to be.
    """
    tag = platform_tag or f"{sys.platform}-{platform.machine()}"
    return tag.lower() in ("linux-x86_64", "linux-amd64")


def plain_torch(python: str = sys.executable, *, platform_tag: str | None = None) -> tuple[bool, str, str]:
    """(CPU build?, exact version, why) for `pip install torch==TORCH_VERSION` from the configured indexes.

    Asks pip to resolve it without installing (`--dry-run --report`; only metadata is fetched). A
    CUDA build from PyPI requires nvidia-* packages; a CPU build (macOS, Windows, a local
    `+cpu` wheel) does not. If pip cannot tell (a pip older than 22.2, as in Ubuntu 22.04's venvs,
    has no `--dry-run`), the platform decides: on Linux x86_64 PyPI's torch is the CUDA build, so
    the answer is (False, ...) and the CPU index is used; elsewhere (True, TORCH_VERSION).
    """
    unknown = not pypi_torch_is_cuda(platform_tag)
    with tempfile.TemporaryDirectory() as folder:
        report = os.path.join(folder, "report.json")
        argv = [python, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--no-deps", "--quiet",
                "--disable-pip-version-check", "--report", report, f"torch=={TORCH_VERSION}"]
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
            with open(report, encoding="utf-8") as file:
                installs = json.load(file).get("install", [])
        except (OSError, ValueError, subprocess.TimeoutExpired) as exc:
            return unknown, TORCH_VERSION, f"could not ask pip which torch it would install ({' '.join(str(exc).split())[:120]})"
    if done.returncode != 0 or not installs:
        return unknown, TORCH_VERSION, "pip could not resolve torch for a dry run"
    metadata = installs[0].get("metadata", {})
    version = str(metadata.get("version", ""))
    requires = [str(r) for r in metadata.get("requires_dist", []) or []]
    cuda = [r for r in requires if re.match(r"(nvidia-|cuda-)", r, re.IGNORECASE) and "extra ==" not in r]
    if not re.fullmatch(re.escape(TORCH_VERSION) + r"(\+[A-Za-z0-9.]+)?", version):
        return unknown, TORCH_VERSION, f"pip's dry run reported torch {version!r}"
    if version.endswith("+cpu") or not cuda:
        return True, version, f"pip's torch {version} is a CPU build"
    return False, version, f"pip's torch {version} is a CUDA build ({len(cuda)} nvidia packages)"


def pip_arguments(build: str, *, plain: str | None = None, index_base: str = INDEX_BASE) -> list[str]:
    """The `pip install` arguments for a build; `plain`: the CPU build's version from the default indexes.

    Versions are exact (`2.13.0+cu126`, or `2.13.0+cpu` for a local CPU wheel) so that pip replaces
    another build of the same release when the choice changes.
    """
    if build == "cpu" and plain is not None:
        return [f"torch=={plain}"]
    return [f"torch=={TORCH_VERSION}+{build}", "--index-url", f"{index_base.rstrip('/')}/{build}"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("choice", nargs="?", default="auto", help=f"one of {', '.join(CHOICES)} (default: auto)")
    parser.add_argument("--index-base", default=os.environ.get("TORCH_INDEX_BASE") or INDEX_BASE,
                        help=f"where the PyTorch wheel indexes live (default: {INDEX_BASE}; env TORCH_INDEX_BASE)")
    parser.add_argument("--python", default=sys.executable, help="the interpreter whose pip installs torch")
    args = parser.parse_args(argv)
    choice = args.choice.strip().lower()
    if choice not in CHOICES:
        print(f"select_torch: unknown TORCH={args.choice!r}; use one of {', '.join(CHOICES)}", file=sys.stderr)
        return 2
    if choice == "auto":
        chosen = choose(*detect_gpus())
    else:
        chosen = Choice(choice, f"TORCH={choice} requested")
    print(f"select_torch: {chosen.reason}", file=sys.stderr)
    for warning in chosen.warnings:
        print(f"select_torch: warning: {warning}", file=sys.stderr)
    plain = None
    if chosen.build == "cpu":
        is_cpu, version, why = plain_torch(args.python)
        plain = version if is_cpu else None
        where = "the default indexes" if is_cpu else "the official CPU index"
        print(f"select_torch: {why}: installing from {where}", file=sys.stderr)
    print("\n".join(pip_arguments(chosen.build, plain=plain, index_base=args.index_base)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
