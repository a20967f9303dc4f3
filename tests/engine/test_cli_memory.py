"""The memory flags of the CLI: parsed, validated, passed to the engine."""

from __future__ import annotations

import subprocess
import sys


def run(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "leansd.frontends.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HOME": str(cwd)})


def test_bad_vram_is_one_line_error(tmp_path):
    out = run("txt2img", "--model", "tiny", "--prompt", "x", "--vram", "4X", cwd=tmp_path)
    assert out.returncode != 0 and "unknown memory size '4X'" in out.stderr and "Traceback" not in out.stderr


def test_presets_are_exclusive(tmp_path):
    out = run("txt2img", "--model", "tiny", "--prompt", "x", "--medvram", "--lowvram", cwd=tmp_path)
    assert out.returncode != 0 and "not allowed with" in out.stderr


def test_lowvram_runs_and_reports_the_plan(tmp_path):
    out = run("txt2img", "--model", "tiny", "--prompt", "x", "--steps", "2", "--lowvram", "--vae-on-cpu", "--turbo",
              "--verbose", "--outdir", str(tmp_path / "out"), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "placement stream" in out.stderr and "VAE cpu" in out.stderr and "accounted" in out.stderr
