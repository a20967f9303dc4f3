"""Hostile .ckpt files: every one is refused without running code, in one line, and the CLI exits 2."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from leansd.errors import ModelLoadError
from leansd.models.checkpoint import LIGHTNING_MODEL_CHECKPOINT_NAMES, read_state_dict

_MOD, _, _CLS = LIGHTNING_MODEL_CHECKPOINT_NAMES[0].rpartition(".")
_LIGHTNING = f"c{_MOD}\n{_CLS}\n".encode()


def _canary(tmp_path: Path) -> Path:
    return tmp_path / "pwned"


def _payloads(canary: Path) -> dict[str, bytes]:
    """data.pkl bodies: code execution attempts, stand-in abuse and malformed pickles."""
    touch = f"open({str(canary)!r}, 'w').write('x')"
    return {
        # protocol 0: builtins.eval / os.system called through REDUCE
        "eval-protocol0": f"cbuiltins\neval\n(S{touch!r}\ntR.".encode(),
        "os-system": f"cos\nsystem\n(S'touch {canary}'\ntR.".encode(),
        "exec-protocol2": b"\x80\x02cbuiltins\nexec\nX" + len(touch).to_bytes(4, "little") + touch.encode() + b"\x85R.",
        # the Lightning stand-in called with arguments, built with state, made by NEWOBJ
        "lightning-args": b"\x80\x02" + _LIGHTNING + b"X\x01\x00\x00\x00x\x85R.",
        "lightning-build": b"\x80\x02" + _LIGHTNING + b")R}X\x01\x00\x00\x00aK\x01sb.",
        "lightning-newobj": b"\x80\x02" + _LIGHTNING + b")\x81.",
        # malformed or unusual pickles
        "unhashable-key": b"\x80\x02}q\x00h\x00h\x00s.",
        "bad-opcode": b"\x80\x02\xff\xff\xff",
        "persistent-id-protocol0": b"P1\n.",
        "empty-stack": b"(" * 1000 + b".",
        "memo-miss": b"\x80\x02h\x63.",
    }


def _zip_ckpt(path: Path, pkl: bytes) -> Path:
    """A torch zip checkpoint whose data.pkl is replaced by `pkl`."""
    buffer = io.BytesIO()
    torch.save({"a": torch.zeros(2)}, buffer)
    source = zipfile.ZipFile(io.BytesIO(buffer.getvalue()))
    with zipfile.ZipFile(path, "w") as archive:
        for info in source.infolist():
            archive.writestr(info.filename, pkl if info.filename.endswith("data.pkl") else source.read(info.filename))
    return path


@pytest.mark.parametrize("kind", sorted(_payloads(Path("x"))))
def test_hostile_ckpt_refused_in_one_line(tmp_path: Path, kind: str) -> None:
    canary = _canary(tmp_path)
    path = _zip_ckpt(tmp_path / f"{kind}.ckpt", _payloads(canary)[kind])
    with pytest.raises(ModelLoadError) as exc_info:
        read_state_dict(path)
    message = str(exc_info.value)
    assert "\n" not in message and message.startswith(str(path))
    assert not canary.exists()


def test_cli_refuses_each_hostile_ckpt_with_exit_2(tmp_path: Path) -> None:
    canary = _canary(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    for kind in ("eval-protocol0", "lightning-args", "unhashable-key", "memo-miss"):
        path = _zip_ckpt(tmp_path / f"{kind}.ckpt", _payloads(canary)[kind])
        out = subprocess.run(
            [sys.executable, "-m", "leansd.frontends.cli", "txt2img", "--ckpt", str(path), "--prompt", "x",
             "--outdir", str(tmp_path / "out"), "--seed", "1"],
            capture_output=True, text=True, env=env, timeout=120,
        )
        assert out.returncode == 2, (kind, out.stderr)
        lines = [line for line in out.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("leansd: error: "), (kind, out.stderr)
        assert "Traceback" not in out.stderr
    assert not canary.exists()
