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
