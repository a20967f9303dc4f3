"""`leansd img2img` / `leansd inpaint` / hires and tiling flags from the command line."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from leansd.frontends.cli import main
from leansd.outputs.infotext import parse_infotext
from leansd.outputs.writer import read_infotext
from tests.test_cli import run_cli


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("imgs")
    y, x = np.mgrid[0:80, 0:72]
    rgb = np.stack([x * 3, y * 3, 128 + 0 * x], axis=-1).astype(np.uint8)
    out = {"image": d / "in.png", "mask": d / "mask.png", "wrong_aspect": d / "wide-mask.png",
           "black": d / "black.png", "text": d / "notes.png", "empty": d / "empty.png", "corrupt": d / "corrupt.png",
           "huge": d / "huge.png"}
    Image.fromarray(rgb).save(out["image"])
    mask = np.zeros((80, 72), np.uint8)
    mask[16:48, 24:56] = 255
    Image.fromarray(mask).save(out["mask"])
    Image.new("L", (144, 40), 255).save(out["wrong_aspect"])
    Image.new("L", (72, 80), 0).save(out["black"])
    out["text"].write_text("this is not an image\n")
    out["empty"].write_bytes(b"")
    data = out["image"].read_bytes()
    out["corrupt"].write_bytes(data[: len(data) // 2])
    # A PNG header claiming 100000 x 100000 pixels, with no image data.
    ihdr = struct.pack(">IIBBBBB", 100000, 100000, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    idat = struct.pack(">I", 0) + b"IDAT" + struct.pack(">I", zlib.crc32(b"IDAT"))
    iend = struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))
    out["huge"].write_bytes(b"\x89PNG\r\n\x1a\n" + chunk + idat + iend)
    return out


def test_img2img_and_inpaint_end_to_end(tmp_path: Path, files) -> None:
    outdir = tmp_path / "i2i"
    r = run_cli("img2img", "--model", "tiny", "--prompt", "a red barn", "--init-img", str(files["image"]),
                "--strength", "0.6", "--steps", "5", "--seed", "3", "--n_samples", "2", "--outdir", str(outdir))
    assert r.returncode == 0, r.stderr
    names = sorted(p.name for p in outdir.iterdir())
    assert names == ["grid-0000.png", "seed_3_00000.png", "seed_4_00001.png"]
    assert Image.open(outdir / "seed_4_00001.png").size == (72, 80)  # the init image's size
    info = parse_infotext(read_infotext(outdir / "seed_3_00000.png"))
    assert info["Denoising strength"] == "0.6" and info["Size"] == "72x80"

    # Inpaint: outside the blurred mask the output equals the input exactly.
    code = main(["inpaint", "--model", "tiny", "--prompt", "x", "--init-img", str(files["image"]),
                 "--mask", str(files["mask"]), "--mask-blur", "2", "--steps", "4", "--seed", "1",
                 "--outdir", str(tmp_path / "inp")])
    assert code == 0
    got = np.asarray(Image.open(tmp_path / "inp" / "seed_1_00000.png"))
    original = np.asarray(Image.open(files["image"]))
    far = np.ones((80, 72), bool)
    far[16 - 8 : 48 + 8, 24 - 8 : 56 + 8] = False
    assert np.array_equal(got[far], original[far])
    assert np.abs(got[20:44, 28:52].astype(int) - original[20:44, 28:52]).max() > 10
    assert parse_infotext(read_infotext(tmp_path / "inp" / "seed_1_00000.png"))["Mask blur"] == "2"


def test_hires_and_tiling_flags(tmp_path: Path) -> None:
    code = main(["txt2img", "--model", "tiny", "--prompt", "x", "--steps", "2", "--seed", "1", "--hires", "96x80",
                 "--hires-steps", "2", "--tiling", "--outdir", str(tmp_path)])
    assert code == 0
    path = tmp_path / "seed_1_00000.png"
    assert Image.open(path).size == (96, 80)
    info = parse_infotext(read_infotext(path))
    assert info["Hires resize"] == "96x80" and info["Tiling"] == "True" and info["Size"] == "64x64"


BAD = [
    (["img2img", "--init-img", "{missing}"], "no such file"),
    (["img2img", "--init-img", "{text}"], "is not an image"),
    (["img2img", "--init-img", "{empty}"], "empty"),
    (["img2img", "--init-img", "{corrupt}"], "truncated or corrupt"),
    (["img2img", "--init-img", "{huge}"], "too large"),
    (["img2img", "--init-img", "{image}", "--strength", "1.5"], "strength must be between 0 and 1"),
    (["img2img", "--init-img", "{image}", "--resize-mode", "zoom"], "unknown resize"),
    (["inpaint", "--init-img", "{image}", "--mask", "{wrong_aspect}"], "aspect"),
    (["inpaint", "--init-img", "{image}", "--mask", "{black}"], "all black"),
    (["inpaint", "--init-img", "{image}", "--mask", "{mask}", "--mask-blur", "-1"], "mask_blur must be between 0"),
    (["inpaint", "--init-img", "{image}", "--mask", "{mask}", "--inpainting-fill", "magic"], "unknown inpainting_fill"),
    (["inpaint", "--init-img", "{image}"], "the following arguments are required: --mask"),
    (["txt2img", "--hires", "big"], "--hires expects WIDTHxHEIGHT"),
    (["txt2img", "--hires-scale", "9"], "hires_scale must be between 1 and 4"),
]


@pytest.mark.parametrize(("args", "message"), BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_image_input_is_one_line_exit_2(args, message, files, tmp_path: Path, capsys) -> None:
    subst = {k: str(v) for k, v in files.items()} | {"missing": str(tmp_path / "nope.png")}
    args = [a.format(**subst) for a in args]
    outdir = tmp_path / "out"
    try:
        code = main([*args, "--model", "tiny", "--prompt", "x", "--steps", "1", "--outdir", str(outdir)])
    except SystemExit as exc:
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert message in err, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert not outdir.exists()
