"""CLI live previews (--preview-dir/--preview-every/--preview-method) and --taesd/--vae-decoder, as a subprocess."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from leansd.outputs.infotext import parse_infotext
from leansd.outputs.writer import read_infotext
from tests.helpers import write_tiny_taesd
from tests.test_cli import run_cli

BASE = ("txt2img", "--model", "tiny", "--prompt", "a red fox", "--seed", "7", "--sampler", "Euler",
        "--no-prompt-cache")


@pytest.fixture(scope="module")
def taesd_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("taesd")
    write_tiny_taesd(folder)
    return folder


def test_previews_are_written_every_n_steps(tmp_path) -> None:
    previews = tmp_path / "previews"
    done = run_cli(*BASE, "--steps", "6", "--n_samples", "2", "--preview-dir", str(previews), "--preview-every", "3",
                   "--outdir", str(tmp_path / "out"), "--skip_grid")
    assert done.returncode == 0, done.stderr
    names = sorted(p.name for p in previews.iterdir())
    assert names == ["preview-00000-seed7-step0003.png", "preview-00001-seed7-step0006.png"]
    with Image.open(previews / names[0]) as image:
        assert image.size == (16, 8)  # Approx cheap: 64 / 8 per image, the batch of 2 side by side
        first = np.asarray(image.convert("RGB"))
    with Image.open(previews / names[1]) as image:
        assert not np.array_equal(first, np.asarray(image.convert("RGB")))
    # a second run numbers on, never overwriting
    again = run_cli(*BASE, "--steps", "2", "--preview-dir", str(previews), "--skip_save", "--skip_grid")
    assert again.returncode == 0 and len(list(previews.iterdir())) == 2  # 2 steps < the default interval 10
    assert run_cli(*BASE, "--steps", "2", "--preview-dir", str(previews), "--preview-every", "1",
                   "--skip_save", "--skip_grid").returncode == 0
    assert sorted(p.name for p in previews.iterdir())[2:] == ["preview-00002-seed7-step0001.png",
                                                              "preview-00003-seed7-step0002.png"]


def test_no_previews_by_default(tmp_path) -> None:
    done = run_cli(*BASE, "--steps", "2", "--outdir", str(tmp_path), "--skip_grid")
    assert done.returncode == 0 and [p.name for p in tmp_path.iterdir()] == ["seed_7_00000.png"]


def test_taesd_decoder_and_previews(tmp_path, taesd_dir) -> None:
    out = tmp_path / "out"
    done = run_cli(*BASE, "--steps", "2", "--taesd", str(taesd_dir), "--vae-decoder", "taesd", "--preview-dir",
                   str(tmp_path / "p"), "--preview-every", "1", "--preview-method", "taesd", "--outdir", str(out))
    assert done.returncode == 0, done.stderr
    assert parse_infotext(read_infotext(out / "seed_7_00000.png"))["VAE decoder"] == "TAESD (approximate)"
    with Image.open(tmp_path / "p" / "preview-00001-seed7-step0002.png") as image:
        assert image.size == (64, 64)
        preview = np.asarray(image.convert("RGB")).astype(int)
    with Image.open(out / "seed_7_00000.png") as image:  # Euler: the last x0 is the result
        assert np.abs(preview - np.asarray(image.convert("RGB")).astype(int)).max() <= 1


@pytest.mark.parametrize("args, message", [
    (("--preview-every", "3"), "--preview-every needs --preview-dir DIR"),
    (("--preview-dir", "PREVIEWS", "--preview-every", "0"), "--preview-every must be at least 1 step, got 0"),
    (("--preview-dir", "PREVIEWS", "--preview-method", "fancy"), "unknown preview_method 'fancy'"),
    (("--vae-decoder", "taesd"), "TAESD previews and --vae-decoder taesd need --taesd PATH|ID"),
    (("--vae-decoder", "tiny"), "unknown vae_decoder 'tiny'; valid: full, taesd"),
    (("--taesd", "MISSING"), "--taesd MISSING: no such folder"),
])
def test_bad_preview_flags(tmp_path, args, message) -> None:
    args = tuple(str(tmp_path / a) if a in ("PREVIEWS", "MISSING") else a for a in args)
    done = run_cli(*BASE, "--steps", "2", "--outdir", str(tmp_path / "out"), *args)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("leansd: error: ")
    assert message.replace("MISSING", str(tmp_path / "MISSING")) in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "PREVIEWS").exists()


def test_one_default_per_preview_knob() -> None:
    from leansd import request
    from leansd.frontends import a1111
    from leansd.frontends.cli import build_parser

    args = build_parser().parse_args(["txt2img", "--prompt", "x"])
    assert (args.preview_method, args.vae_decoder) == (request.DEFAULT_PREVIEW_METHOD, request.DEFAULT_VAE_DECODER)
    assert args.preview_dir is None  # off on the command line
    library = request.GenerationRequest(prompt="x")
    assert (library.preview_method, library.preview_content, library.vae_decoder) == (
        request.DEFAULT_PREVIEW_METHOD, request.DEFAULT_PREVIEW_CONTENT, request.DEFAULT_VAE_DECODER)
    fields = a1111.preview_fields(a1111.preview_options(), taesd=False)  # the server's (and web UI's) defaults
    assert fields == {"preview_every": request.DEFAULT_PREVIEW_EVERY, "preview_method": request.DEFAULT_PREVIEW_METHOD,
                      "preview_content": request.DEFAULT_PREVIEW_CONTENT}
