"""--refiner / --refiner-switch-at on the CLI: a subprocess run equals the Python API, bad input exits 2 in one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from leansd.frontends.cli import main
from leansd.models.family import ModelFamily
from leansd.outputs.infotext import parse_infotext
from leansd.outputs.writer import read_infotext
from tests.test_cli import run_cli

COMMON = ["--steps", "4", "--sampler", "Euler", "--seed", "7", "--H", "64", "--W", "64", "--precision", "full",
          "--device", "cpu", "--no-prompt-cache"]


@pytest.fixture(scope="module")
def xl_files(tmp_path_factory) -> dict[str, Path]:
    from leansd.models.tiny import write_tiny_diffusers_folder, write_tiny_single_file

    root = tmp_path_factory.mktemp("xl")
    broken = root / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    return {
        "base": write_tiny_single_file(root / "xl-base.safetensors", family=ModelFamily.SDXL),
        "refiner": write_tiny_single_file(root / "xl-refiner.safetensors", family=ModelFamily.SDXL_REFINER),
        "refiner_folder": write_tiny_diffusers_folder(root / "xl-refiner-folder", family=ModelFamily.SDXL_REFINER),
        "broken": broken,
    }


def test_txt2img_with_refiner_as_subprocess_equals_the_python_api(tmp_path: Path, xl_files) -> None:
    from leansd import Engine, GenerationRequest
    from leansd.models.loader import load_model

    out = run_cli("txt2img", "--model", str(xl_files["base"]), "--refiner", str(xl_files["refiner"]),
                  "--refiner-switch-at", "0.6", "--prompt", "a red fox", *COMMON, "--outdir", str(tmp_path))
    assert out.returncode == 0, out.stderr
    [path] = [Path(line) for line in out.stdout.splitlines()]
    info = parse_infotext(read_infotext(path))
    assert info["Refiner"].startswith("xl-refiner [") and info["Refiner switch at"] == "0.6"
    engine = Engine(load_model(xl_files["base"]), device="cpu", precision="full", prompt_cache=False)
    expected = engine.generate(GenerationRequest(
        prompt="a red fox", num_inference_steps=4, sampler="Euler", seed=7, width=64, height=64,
        refiner_checkpoint=str(xl_files["refiner"]), refiner_switch_at=0.6), progress_bar=False)
    np.testing.assert_array_equal(np.asarray(Image.open(path)), np.asarray(expected.images[0]))


def test_img2img_and_inpaint_with_a_refiner_folder(tmp_path: Path, xl_files) -> None:
    init = tmp_path / "init.png"
    Image.fromarray((np.random.default_rng(1).random((64, 64, 3)) * 255).astype("uint8")).save(init)
    mask = tmp_path / "mask.png"
    Image.new("L", (64, 64), 255).save(mask)
    for task, extra in (("img2img", []), ("inpaint", ["--mask", str(mask)])):
        outdir = tmp_path / task
        code = main([task, "--model", str(xl_files["base"]), "--refiner", str(xl_files["refiner_folder"]),
                     "--init-img", str(init), *extra, "--strength", "0.9", "--prompt", "a red fox", *COMMON,
                     "--outdir", str(outdir)])
        assert code == 0
        [path] = sorted(outdir.glob("*.png"))
        info = parse_infotext(read_infotext(path))
        assert info["Refiner"] == "xl-refiner-folder" and info["Refiner switch at"] == "0.8"


@pytest.mark.parametrize(("model", "args", "message"), [
    ("base", ["--refiner", "{missing}"], "--refiner {missing}: no such file or folder"),
    ("base", ["--refiner", "{base}"], "recognised an SDXL checkpoint, not an SDXL refiner"),
    ("base", ["--refiner", "{broken}"], "broken.safetensors"),
    ("base", ["--refiner", "{refiner}", "--refiner-switch-at", "0"], "refiner_switch_at must be above 0"),
    ("base", ["--refiner", "{refiner}", "--refiner-switch-at", "1.2"], "refiner_switch_at must be above 0"),
    ("tiny", ["--refiner", "{refiner}"], "a refiner runs after an SDXL base model"),
    ("refiner", [], "recognised an SDXL refiner checkpoint, which cannot be used as the base model"),
])
def test_bad_refiner_input_is_one_line_exit_2(model, args, message, tmp_path: Path, xl_files, capsys) -> None:
    subst = {**{k: str(v) for k, v in xl_files.items()}, "missing": str(tmp_path / "nope.safetensors")}
    model_arg = "tiny" if model == "tiny" else str(xl_files[model])
    outdir = tmp_path / "out"
    try:
        code = main(["txt2img", "--model", model_arg, *[a.format(**subst) for a in args], "--prompt", "x",
                     "--steps", "1", "--outdir", str(outdir)])
    except SystemExit as exc:
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert message.format(**subst) in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert not outdir.exists()
