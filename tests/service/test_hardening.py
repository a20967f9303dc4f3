"""Regression tests for the hardening review (issue "Hardening"): each case reproduces a failure it found."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "leansd.frontends.cli", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


# ---- 4. --host is resolved, not matched as text ------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1.invalid", "127.evil.invalid", "localhost.invalid"])
def test_serve_host_that_only_looks_loopback_is_refused(host: str) -> None:
    out = run_cli("serve", "--model", "tiny", "--host", host)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert lines == [lines[0]] and lines[0].startswith(f"leansd: error: --host {host}: cannot resolve"), out.stderr


def test_loopback_check_resolves_addresses() -> None:
    from leansd.frontends.cli import is_loopback_host

    assert is_loopback_host("127.0.0.1") and is_loopback_host("127.3.4.5") and is_loopback_host("::1")
    assert is_loopback_host("[::1]") and is_loopback_host("localhost")
    assert not is_loopback_host("0.0.0.0") and not is_loopback_host("::") and not is_loopback_host("192.168.1.2")


# ---- 10. SIGTERM during a --from-file run leaves no hidden temp file -----------------------------


def test_sigterm_while_an_image_is_written_leaves_no_temp_file(tmp_path) -> None:
    import signal
    import time

    from PIL import Image

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"prompt {k}\n" for k in range(40)))
    outdir = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "leansd.frontends.cli", "txt2img", "--model", "tiny", "--from-file", str(prompts),
         "--W", "256", "--H", "256", "--steps", "1", "--seed", "1", "--skip_grid", "--outdir", str(outdir)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        deadline = time.monotonic() + 120
        caught = False
        while time.monotonic() < deadline and proc.poll() is None:
            names = os.listdir(outdir) if outdir.is_dir() else []
            if any(name.startswith(".seed_") and name.endswith(".tmp") for name in names):
                proc.send_signal(signal.SIGTERM)  # while the image is being encoded and written
                caught = True
                break
            time.sleep(0.001)
        assert caught, "never saw an image being written"
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143
    assert stderr.strip().splitlines()[-1].startswith("leansd: terminated (SIGTERM)")
    assert "Traceback" not in stderr
    left = os.listdir(outdir)
    assert not [name for name in left if name.startswith(".")], left
    for name in left:  # whatever was published is a whole PNG
        with Image.open(outdir / name) as image:
            image.load()


# ---- 9. the CLI proves its output folder writable before the model loads -------------------------


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's read-only /proc")
def test_cli_refuses_an_unwritable_outdir_before_loading(tmp_path) -> None:
    # /proc passes os.access(W_OK) for root, yet no file can be created there.
    out = run_cli("txt2img", "--model", str(tmp_path / "missing.safetensors"), "--prompt", "x",
                  "--outdir", "/proc/leansd-hardening-out")
    assert out.returncode == 2
    assert out.stderr.strip().startswith("leansd: error: cannot create output folder /proc/leansd-hardening-out")
    assert len(out.stderr.strip().splitlines()) == 1  # the missing model was never looked at
