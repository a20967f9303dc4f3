"""Only PNG, JPEG, WebP, BMP, TIFF and GIF are decoded: an EPS upload never reaches Ghostscript."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from leansd.errors import InvalidRequestError
from leansd.inputs.images import ACCEPTED_NAMES, load_image, load_image_bytes, load_mask


def _picture() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (64, 48, 3), dtype=np.uint8))


def _fake_gs(folder: Path) -> Path:
    """A `gs` first on PATH that records every call (Pillow's EPS plugin runs `gs` to decode)."""
    marker = folder / "gs-was-run"
    script = folder / "bin" / "gs"
    script.parent.mkdir()
    script.write_text(f"#!/bin/sh\necho \"$@\" >> {marker}\nexit 0\n")
    script.chmod(0o755)
    return marker


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF"])
def test_accepted_formats_decode(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"picture.{fmt.lower()}"
    _picture().save(path, format=fmt)
    image = load_image(path)
    assert image.size == (48, 64) and image.mode == "RGB"
    assert load_image_bytes(path.read_bytes(), label="init_images[0]").size == (48, 64)


def test_eps_is_refused_without_running_ghostscript(tmp_path: Path) -> None:
    eps = tmp_path / "picture.eps"
    _picture().save(eps, format="EPS")
    marker = _fake_gs(tmp_path)
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    # The reproduction: a plain Image.open + load hands the file to `gs`.
    plain = subprocess.run(
        [sys.executable, "-c", f"from PIL import Image\ntry:\n Image.open({str(eps)!r}).load()\nexcept Exception: pass"],
        env=env, capture_output=True, text=True, timeout=60,
    )
    assert plain.returncode == 0 and marker.exists(), "the fake gs should show that Pillow runs it for EPS"
    marker.unlink()
    # Our loaders, from a file (CLI) and from bytes (uploads), in a fresh process with the same PATH.
    code = (
        "import sys\nfrom leansd.inputs.images import load_image, load_mask, load_image_bytes\n"
        "from leansd.errors import InvalidRequestError\n"
        f"path = {str(eps)!r}\n"
        "for call in (lambda: load_image(path), lambda: load_mask(path),\n"
        "             lambda: load_image_bytes(open(path, 'rb').read(), label='init_images[0]')):\n"
        "    try:\n        call()\n    except InvalidRequestError as exc:\n        print(exc)\n"
        "    else:\n        sys.exit('decoded an EPS')\n"
    )
    ours = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert ours.returncode == 0, ours.stderr
    lines = ours.stdout.splitlines()
    assert lines == [
        f"image {eps}: is not an image in an accepted format ({ACCEPTED_NAMES})",
        f"mask {eps}: is not an image in an accepted format ({ACCEPTED_NAMES})",
        f"init_images[0]: is not an image in an accepted format ({ACCEPTED_NAMES})",
    ]
    assert not marker.exists()
    # The CLI: exit 2, one line naming the accepted formats, gs never run.
    cli = subprocess.run(
        [sys.executable, "-m", "leansd.frontends.cli", "img2img", "--model", "tiny", "--prompt", "x",
         "--init-img", str(eps), "--outdir", str(tmp_path / "out")],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert cli.returncode == 2
    assert cli.stderr.strip() == f"leansd: error: --init-img {eps}: is not an image in an accepted format ({ACCEPTED_NAMES})"
    assert not marker.exists()


@pytest.mark.parametrize("fmt", ["PDF", "ICO", "TGA", "PPM"])
def test_other_formats_are_refused_naming_the_accepted_ones(tmp_path: Path, fmt: str) -> None:
    buffer = io.BytesIO()
    _picture().save(buffer, format=fmt)
    with pytest.raises(InvalidRequestError) as info:
        load_image_bytes(buffer.getvalue(), label="mask")
    assert str(info.value) == f"mask: is not an image in an accepted format ({ACCEPTED_NAMES})"
    path = tmp_path / f"x.{fmt.lower()}"
    path.write_bytes(buffer.getvalue())
    with pytest.raises(InvalidRequestError, match="accepted format"):
        load_mask(path)


def test_gif_uses_the_first_frame() -> None:
    frames = [Image.new("RGB", (16, 16), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    image = load_image_bytes(buffer.getvalue())
    assert image.getpixel((8, 8)) == (255, 0, 0)
