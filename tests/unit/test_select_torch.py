"""tools/select_torch.py: which PyTorch build `make install` picks, from fake nvidia-smi answers."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tools" / "select_torch.py"


def _load():
    spec = importlib.util.spec_from_file_location("select_torch", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["select_torch"] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


st = _load()
V = st.TORCH_VERSION


def gpu(cap: str | None, driver: str, name: str = "GPU"):
    capability = None if cap is None else tuple(int(p) for p in cap.split("."))
    return st.Gpu(name=name, capability=capability, driver=driver)


# ---------------------------------------------------------------------------------------------
# Parsing nvidia-smi's CSV


def test_parse_several_gpus_and_names_with_commas():
    text = (
        "6.1, 535.183.01, NVIDIA GeForce GTX 1060 6GB\n"
        "8.9, 535.183.01, NVIDIA GeForce RTX 4090, Founders Edition\n"
        "\n"
    )
    assert st.parse_gpus(text) == [
        st.Gpu("NVIDIA GeForce GTX 1060 6GB", (6, 1), "535.183.01"),
        st.Gpu("NVIDIA GeForce RTX 4090, Founders Edition", (8, 9), "535.183.01"),
    ]


def test_parse_without_capability_column():
    assert st.parse_gpus("470.256.02, Tesla K80\n", with_capability=False) == [
        st.Gpu("Tesla K80", None, "470.256.02")
    ]


@pytest.mark.parametrize("text", [
    "garbage",
    "8.6 550.54 RTX",  # no commas
    "[N/A], 550.54.14, NVIDIA A100",  # capability not reported
    "8, 550.54.14, GPU",  # capability without a minor version
    "8.6, five-fifty, GPU",
    "Failed to initialize NVML: Driver/library version mismatch",
])
def test_parse_rejects_garbage(text):
    with pytest.raises(ValueError):
        st.parse_gpus(text)


def test_parse_empty_answer_is_no_gpu():
    assert st.parse_gpus("\n\n") == []


# ---------------------------------------------------------------------------------------------
# Choosing a build (pure)

CASES = [
    # (GPUs as (capability, driver), expected build, words the reason must contain)
    ([("6.1", "535.183.01")], "cu126", "CUDA 12.6"),  # GTX 1060 (Pascal)
    ([("5.2", "580.95.05")], "cu126", "CUDA 12.6"),  # GTX 970 (Maxwell): a new driver does not help cu130
    ([("7.0", "580.95.05")], "cu126", "CUDA 12.6"),  # V100 (Volta)
    ([("7.5", "580.95.05")], "cu130", "CUDA 13.0"),  # T4 / GTX 1650 (Turing)
    ([("7.5", "535.104.05")], "cu126", "older than 580.65.06"),  # Turing with a CUDA 12 driver
    ([("8.6", "580.65.06")], "cu130", "CUDA 13.0"),  # exactly the minimum driver
    ([("8.6", "580.65.05")], "cu126", "older than"),  # just below it
    ([("9.0", "590.44.01")], "cu130", "CUDA 13.0"),  # H100/H200
    ([("12.0", "580.95.05")], "cu130", "CUDA 13.0"),  # RTX 5090 (Blackwell)
    ([("12.0", "575.57.08")], "cpu", "needs NVIDIA driver 580.65.06 or newer"),  # Blackwell, driver too old
    ([("3.7", "470.256.02")], "cpu", "no PyTorch"),  # K80 (Kepler): nothing runs on it
    ([("8.6", "515.65.01")], "cpu", "needs NVIDIA driver 525.60.13 or newer"),  # driver too old for any build
    ([("6.1", "580.95.05"), ("8.9", "580.95.05")], "cu126", "CUDA 12.6"),  # cu126 covers both
    ([("6.1", "580.95.05"), ("12.0", "580.95.05")], "cu130", "CUDA 13.0"),  # tie: the newer build
    ([("3.7", "535.183.01"), ("6.1", "535.183.01")], "cu126", "CUDA 12.6"),  # the Kepler card is left out
    ([(None, "470.256.02")], "cpu", "needs NVIDIA driver 525.60.13 or newer"),  # too old to report compute_cap
    ([(None, "525.60.13")], "cu126", "widest range"),
]


@pytest.mark.parametrize(("gpus", "build", "words"), CASES)
def test_choose(gpus, build, words):
    choice = st.choose([gpu(cap, driver) for cap, driver in gpus])
    assert choice.build == build
    assert words in choice.reason


def test_choose_warns_about_a_gpu_left_out():
    choice = st.choose([gpu("6.1", "580.95.05", "GTX 1080"), gpu("12.0", "580.95.05", "RTX 5090")])
    assert choice.build == "cu130"
    assert len(choice.warnings) == 1
    assert choice.warnings[0].startswith("GTX 1080 (compute capability 6.1, driver 580.95.05) is not supported")
    assert "--device cuda:N" in choice.warnings[0]


def test_choose_tells_how_to_update_an_old_driver():
    choice = st.choose([gpu("12.0", "575.57.08", "RTX 5090")])
    assert choice.warnings == ("update the NVIDIA driver to 580.65.06 or newer, then: make clean && make run",)


def test_choose_without_gpu_or_with_a_problem():
    assert st.choose([]).build == "cpu" and st.choose([]).warnings == ()
    broken = st.choose([], "nvidia-smi failed (boom)")
    assert broken.build == "cpu" and broken.reason.startswith("nvidia-smi failed (boom)")
    assert "TORCH=cu126" in broken.warnings[0]


def test_covers_table():
    cu126, cu130 = (next(b for b in st.BUILDS if b.name == n) for n in ("cu126", "cu130"))
    assert [st.covers(cu126, c) for c in [(3, 7), (5, 0), (6, 1), (7, 0), (8, 9), (9, 0), (10, 0), (12, 0)]] == [
        False, True, True, True, True, True, False, False]
    assert [st.covers(cu130, c) for c in [(6, 1), (7, 0), (7, 5), (8, 6), (9, 0), (10, 0), (12, 1), (13, 0)]] == [
        False, False, True, True, True, True, True, False]


# ---------------------------------------------------------------------------------------------
# pip arguments


def test_pip_arguments():
    assert st.pip_arguments("cpu", plain=V) == [f"torch=={V}"]
    assert st.pip_arguments("cpu", plain=f"{V}+cpu") == [f"torch=={V}+cpu"]
    assert st.pip_arguments("cpu") == [f"torch=={V}+cpu", "--index-url", "https://download.pytorch.org/whl/cpu"]
    assert st.pip_arguments("cu126", plain=V) == [
        f"torch=={V}+cu126", "--index-url", "https://download.pytorch.org/whl/cu126"]
    assert st.pip_arguments("cu130", index_base="http://mirror.local/whl/") == [
        f"torch=={V}+cu130", "--index-url", "http://mirror.local/whl/cu130"]


# ---------------------------------------------------------------------------------------------
# Fake executables: nvidia-smi on PATH, a Python whose pip writes a dry-run report


def _executable(folder: Path, name: str, body: str) -> Path:
    path = folder / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


@pytest.fixture
def fake_path(tmp_path, monkeypatch):
    """An empty PATH folder (plus /bin for sh itself): nvidia-smi exists only where a test writes it."""
    folder = tmp_path / "bin"
    folder.mkdir()
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}/usr/bin{os.pathsep}/bin")
    return folder


def test_detect_no_nvidia_smi(fake_path):
    assert st.detect_gpus() == ([], None)


def test_detect_two_gpus(fake_path):
    _executable(fake_path, "nvidia-smi", """
case "$1" in
  --query-gpu=compute_cap,driver_version,name)
    echo "6.1, 535.183.01, NVIDIA GeForce GTX 1060 6GB"
    echo "8.6, 535.183.01, NVIDIA GeForce RTX 3060";;
  *) exit 3;;
esac
""")
    gpus, problem = st.detect_gpus()
    assert problem is None
    assert [(g.capability, g.driver) for g in gpus] == [((6, 1), "535.183.01"), ((8, 6), "535.183.01")]
    assert st.choose(gpus, problem).build == "cu126"


def test_detect_old_driver_without_compute_cap(fake_path):
    _executable(fake_path, "nvidia-smi", """
case "$1" in
  --query-gpu=compute_cap,driver_version,name)
    echo 'Field "compute_cap" is not a valid field to query.'; exit 2;;
  --query-gpu=driver_version,name) echo "470.256.02, Tesla K80";;
  *) exit 3;;
esac
""")
    gpus, problem = st.detect_gpus()
    assert problem is None and gpus == [st.Gpu("Tesla K80", None, "470.256.02")]
    assert st.choose(gpus).build == "cpu"


def test_detect_failing_nvidia_smi(fake_path):
    _executable(fake_path, "nvidia-smi", """
echo "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver." >&2
exit 9
""")
    gpus, problem = st.detect_gpus()
    assert gpus == []
    assert problem == "nvidia-smi failed (NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.)"
    assert st.choose(gpus, problem).build == "cpu"


def test_detect_garbage(fake_path):
    _executable(fake_path, "nvidia-smi", 'echo "something unexpected"\n')
    gpus, problem = st.detect_gpus()
    assert gpus == [] and problem.startswith("nvidia-smi gave an answer this script cannot read")
    assert "something unexpected" in problem


def test_detect_hanging_nvidia_smi(fake_path, monkeypatch):
    monkeypatch.setattr(st, "NVIDIA_SMI_TIMEOUT", 0.3)
    _executable(fake_path, "nvidia-smi", "exec sleep 5\n")
    assert st.detect_gpus() == ([], "nvidia-smi did not answer within 0 s")


def _run_script(*args: str, path: Path, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{path}{os.pathsep}/usr/bin{os.pathsep}/bin", **(env_extra or {})}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=60)


def test_script_prints_pip_arguments_for_a_pascal_gpu(fake_path):
    _executable(fake_path, "nvidia-smi", 'echo "6.1, 535.183.01, NVIDIA GeForce GTX 1060 6GB"\n')
    done = _run_script(path=fake_path)
    assert done.returncode == 0
    assert done.stdout.split() == [f"torch=={V}+cu126", "--index-url", "https://download.pytorch.org/whl/cu126"]
    assert "NVIDIA GeForce GTX 1060 6GB (compute capability 6.1, driver 535.183.01): CUDA 12.6 build" in done.stderr


def test_script_override_and_mirror(fake_path):
    _executable(fake_path, "nvidia-smi", 'echo "6.1, 535.183.01, GTX 1060"\n')
    done = _run_script("cu130", path=fake_path, env_extra={"TORCH_INDEX_BASE": "https://mirror.example/whl"})
    assert done.returncode == 0
    assert done.stdout.split() == [f"torch=={V}+cu130", "--index-url", "https://mirror.example/whl/cu130"]
    assert "TORCH=cu130 requested" in done.stderr


def test_script_rejects_an_unknown_choice(fake_path):
    done = _run_script("cu118", path=fake_path)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip() == "select_torch: unknown TORCH='cu118'; use one of auto, cu126, cu130, cpu"


def _fake_python(folder: Path, report: dict | None, status: int = 0) -> Path:
    """A 'python' whose `-m pip install --dry-run --report FILE ...` writes `report` to FILE."""
    payload = json.dumps(report) if report is not None else ""
    return _executable(folder, "python", f"""
while [ "$#" -gt 0 ]; do
  if [ "$1" = "--report" ]; then shift; printf '%s' '{payload}' > "$1"; fi
  shift
done
exit {status}
""")


CUDA_METADATA = {"version": V, "requires_dist": [
    "filelock", "sympy>=1.13.3", 'nvidia-cublas-cu12==12.8.4.1; platform_system == "Linux"',
    'nvidia-cudnn-cu12==9.10.2.21; platform_system == "Linux"', 'opt-einsum>=3.3; extra == "opt-einsum"']}


@pytest.mark.parametrize(("report", "status", "is_cpu", "version", "why"), [
    ({"install": [{"metadata": {"version": f"{V}+cpu", "requires_dist": ["filelock"]}}]}, 0, True, f"{V}+cpu",
     f"pip's torch {V}+cpu is a CPU build"),  # a local CPU wheel (this project's CI)
    ({"install": [{"metadata": {"version": V, "requires_dist": ["filelock", "sympy"]}}]}, 0, True, V,
     f"pip's torch {V} is a CPU build"),  # macOS / Windows wheels from PyPI
    ({"install": [{"metadata": CUDA_METADATA}]}, 0, False, V, f"pip's torch {V} is a CUDA build (2 nvidia packages)"),
    ({"install": [{"metadata": {"version": "2.99.0", "requires_dist": []}}]}, 0, True, V,
     "pip's dry run reported torch '2.99.0'"),
    ({"install": []}, 1, True, V, "pip could not resolve torch for a dry run"),
    (None, 1, True, V, "could not ask pip which torch it would install"),
])
def test_plain_torch(tmp_path, report, status, is_cpu, version, why):
    python = _fake_python(tmp_path, report, status)
    got_cpu, got_version, reason = st.plain_torch(str(python), platform_tag="darwin-arm64")
    assert (got_cpu, got_version) == (is_cpu, version)
    assert reason.startswith(why)


@pytest.mark.parametrize(("report", "status"), [
    (None, 2),  # pip 22.0 (Ubuntu 22.04's venv): "no such option: --dry-run", no report
    ({"install": []}, 1),
    ({"install": [{"metadata": {"version": "2.99.0", "requires_dist": []}}]}, 0),
])
def test_plain_torch_on_linux_x86_64_falls_back_to_the_cpu_index(tmp_path, report, status):
    # There PyPI's torch is the multi-GB CUDA build: when pip cannot tell, the CPU index is used.
    python = _fake_python(tmp_path, report, status)
    assert st.plain_torch(str(python), platform_tag="linux-x86_64")[:2] == (False, V)
    assert st.plain_torch(str(python), platform_tag="linux-aarch64")[:2] == (True, V)
    assert st.pip_arguments("cpu", plain=None) == [f"torch=={V}+cpu", "--index-url", "https://download.pytorch.org/whl/cpu"]


@pytest.mark.parametrize(("tag", "cuda"), [
    ("linux-x86_64", True), ("linux-aarch64", False), ("darwin-arm64", False), ("win32-AMD64", False),
])
def test_pypi_torch_is_cuda(tag, cuda):
    assert st.pypi_torch_is_cuda(tag) is cuda


def test_script_cpu_uses_the_cpu_index_when_pip_would_pull_cuda(fake_path, tmp_path):
    python = _fake_python(tmp_path, {"install": [{"metadata": CUDA_METADATA}]})
    done = _run_script("--python", str(python), path=fake_path)  # no nvidia-smi: auto -> cpu
    assert done.returncode == 0
    assert done.stdout.split() == [f"torch=={V}+cpu", "--index-url", "https://download.pytorch.org/whl/cpu"]
    assert "installing from the official CPU index" in done.stderr


def test_script_cpu_keeps_a_local_cpu_wheel_exact(fake_path, tmp_path):
    python = _fake_python(tmp_path, {"install": [{"metadata": {"version": f"{V}+cpu", "requires_dist": []}}]})
    done = _run_script("cpu", "--python", str(python), path=fake_path)
    assert done.returncode == 0
    assert done.stdout.split() == [f"torch=={V}+cpu"]
    assert "installing from the default indexes" in done.stderr


def test_the_installer_and_the_runtime_check_share_one_table():
    # leansd's arch check (leansd.engine.device) names the build that tools/select_torch.py installs:
    # the same GPUs per build, the same index, and the torch pin of constraints.txt.
    from leansd.engine import device

    assert device.CUDA_BUILDS == tuple((b.name, b.min_capability, b.max_major) for b in st.BUILDS)
    assert device.TORCH_INDEX == st.INDEX_BASE
    pins = [line.split("==", 1)[1].strip() for line in (ROOT / "constraints.txt").read_text().splitlines()
            if line.startswith("torch==")]
    assert pins == [st.TORCH_VERSION]
