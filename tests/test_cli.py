"""The CLI, driven as a user drives it: a subprocess on the tiny model, and the bad-input table."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from leansd.frontends.cli import main
from leansd.outputs.infotext import parse_infotext
from leansd.outputs.writer import read_infotext


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "leansd.frontends.cli", *args],
        capture_output=True, text=True, env=env, cwd=cwd, timeout=300,
    )


@pytest.fixture(scope="session")
def tiny_file(tmp_path_factory) -> Path:
    from leansd.models.tiny import write_tiny_single_file

    return write_tiny_single_file(tmp_path_factory.mktemp("ckpt") / "tiny-sd.safetensors")


def test_help_is_fast_and_lists_flags() -> None:
    # "Fast" is checked by what --help imports (below), not by a wall-clock limit that a busy machine breaks.
    top = subprocess.run([sys.executable, "-m", "leansd.frontends.cli", "--help"], capture_output=True, text=True)
    assert top.returncode == 0 and "txt2img" in top.stdout
    out = run_cli("txt2img", "--help")
    assert out.returncode == 0
    for flag in ("--prompt", "--nprompt", "--H", "--W", "--n_samples", "--n_iter", "--ddim_steps", "--scale",
                 "--seed", "--sampler", "--ddim_eta", "--precision", "--outdir", "--from-file", "--format",
                 "--skip_grid", "--skip_save", "--fixed_code", "--device", "--ckpt", "--negative-prompt",
                 "--steps", "--cfg-scale", "--model"):
        assert flag in out.stdout, flag
    # No torch/diffusers import behind --help.
    probe = subprocess.run(
        [sys.executable, "-c", "import sys; from leansd.frontends.cli import build_parser; build_parser(); "
         "print('torch' in sys.modules, 'diffusers' in sys.modules)"],
        capture_output=True, text=True,
    )
    assert probe.stdout.split() == ["False", "False"]


def test_txt2img_end_to_end(tmp_path: Path, tiny_file: Path) -> None:
    outdir = tmp_path / "out"
    out = run_cli(
        "txt2img", "--ckpt", str(tiny_file), "--prompt", "a red fox", "--nprompt", "blurry", "--H", "64", "--W", "64",
        "--n_samples", "2", "--n_iter", "2", "--ddim_steps", "3", "--seed", "100", "--sampler", "euler_a",
        "--outdir", str(outdir),
    )
    assert out.returncode == 0, out.stderr
    names = sorted(p.name for p in outdir.iterdir())
    assert names == ["grid-0000.png", "seed_100_00000.png", "seed_101_00001.png", "seed_102_00002.png", "seed_103_00003.png"]
    assert Image.open(outdir / "grid-0000.png").size == (128, 128)
    img = Image.open(outdir / "seed_102_00002.png")
    assert img.size == (64, 64) and img.mode == "RGB"
    info = parse_infotext(read_infotext(outdir / "seed_102_00002.png"))
    assert info["Prompt"] == "a red fox"
    assert info["Negative prompt"] == "blurry"
    assert info["Steps"] == "3" and info["Sampler"] == "Euler a" and info["CFG scale"] == "7.5"
    assert info["Seed"] == "102" and info["Size"] == "64x64"
    import hashlib

    assert info["Model hash"] == hashlib.sha256(tiny_file.read_bytes()).hexdigest()[:10]
    assert info["Model"] == "tiny-sd"
    # The same request through the Python API gives identical pixels.
    from leansd import Engine, GenerationRequest

    engine = Engine.load(str(tiny_file), device="cpu")
    again = engine.generate(
        GenerationRequest(prompt="a red fox", negative_prompt="blurry", width=64, height=64, num_inference_steps=3,
                          seed=100, sampler="Euler a", batch_size=2, n_iter=2),
        progress_bar=False,
    )
    assert again.seeds[2] == 102
    assert np.array_equal(np.asarray(again.images[2]), np.asarray(img))
    # A second run numbers after the existing images.
    out = run_cli("txt2img", "--model", str(tiny_file), "--prompt", "x", "--steps", "1", "--seed", "7",
                  "--outdir", str(outdir), "--format", "jpg")
    assert out.returncode == 0, out.stderr
    assert (outdir / "seed_7_00004.jpg").exists()
    assert parse_infotext(read_infotext(outdir / "seed_7_00004.jpg"))["Seed"] == "7"


def test_from_file_and_tiny_model(tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n\n  a dog  \n", encoding="utf-8")
    outdir = tmp_path / "o"
    code = main(["txt2img", "--model", "tiny", "--from-file", str(prompts), "--steps", "1", "--seed", "5",
                 "--outdir", str(outdir), "--skip_grid"])
    assert code == 0
    files = sorted(p.name for p in outdir.iterdir())
    assert files == ["seed_5_00000.png", "seed_6_00001.png"]
    assert parse_infotext(read_infotext(outdir / "seed_6_00001.png"))["Prompt"] == "a dog"
    assert Image.open(outdir / "seed_5_00000.png").size == (64, 64)  # tiny's native size


def test_prompt_chunks_and_cache_flags(tmp_path: Path, capsys) -> None:
    long_prompt = " ".join(["red fox"] * 45)
    assert main(["txt2img", "--model", "tiny", "--prompt", long_prompt, "--steps", "1", "--seed", "1",
                 "--no-prompt-cache", "--prompt-syntax", "a1111", "--outdir", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "(a1111 syntax, 2 chunks of 77 tokens)" in err
    assert (tmp_path / "seed_1_00000.png").exists()


def test_skip_save_writes_nothing(tmp_path: Path) -> None:
    outdir = tmp_path / "o"
    assert main(["txt2img", "--model", "tiny", "--prompt", "x", "--steps", "1", "--outdir", str(outdir),
                 "--skip_save", "--skip_grid"]) == 0
    assert not outdir.exists()


@pytest.fixture(scope="session")
def bad_files(tmp_path_factory, tiny_file: Path) -> dict[str, Path]:
    import torch
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("bad")
    files = {}
    files["truncated"] = d / "truncated.safetensors"
    data = tiny_file.read_bytes()
    files["truncated"].write_bytes(data[: len(data) // 2])
    files["corrupt_ckpt"] = d / "corrupt.ckpt"
    files["corrupt_ckpt"].write_bytes(os.urandom(4096))
    files["lfs"] = d / "model.safetensors"
    files["lfs"].write_text("version https://git-lfs.github.com/spec/v1\noid sha256:" + "a" * 64 + "\nsize 4265380512\n")
    files["empty"] = d / "empty.ckpt"
    files["empty"].write_bytes(b"")
    files["sdxl"] = d / "sdxl.safetensors"
    save_file(
        {
            "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
            "model.diffusion_model.label_emb.0.0.weight": torch.zeros(1280, 2816),
            "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(8, 768),
            "conditioner.embedders.1.model.token_embedding.weight": torch.zeros(8, 1280),
        },
        str(files["sdxl"]),
    )
    files["unknown"] = d / "unknown.safetensors"
    save_file(
        {
            "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 8, 3, 3),
            "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(320, 512),
        },
        str(files["unknown"]),
    )
    return files


BAD_ARGS = [
    (["--model", "/nonexistent/model.safetensors"], "no such file"),
    (["--model", "{truncated}"], "truncated.safetensors"),
    (["--model", "{corrupt_ckpt}"], "corrupt.ckpt"),
    (["--model", "{lfs}"], "git-LFS pointer"),
    (["--model", "{empty}"], "empty.ckpt"),
    (["--model", "{sdxl}"], "sdxl.safetensors: not a complete SDXL checkpoint: cannot infer"),
    (["--model", "{unknown}"], "could not recognise the model family"),
    (["--n_iter", "0"], "n_iter must be between 1"),
    (["--prompt-syntax", "fancy"], "unknown prompt_syntax 'fancy'"),
    (["--sampler", "DDIM", "--steps", "1000"], "steps must be between 1 and 999 for DDIM"),
    (["--sampler", "LCM", "--steps", "51"], "steps must be between 1 and 50 for LCM"),
    (["--prompt", "a", "--from-file", "{empty_prompts}"], "not allowed with argument"),
    (["--H", "100"], "height must be a multiple of 8"),
    (["--W", "32"], "width must be between 64 and 4096"),
    (["--W", "100000"], "width must be between 64 and 4096"),
    (["--steps", "0"], "steps must be between 1"),
    (["--n_samples", "0"], "n_samples (batch size) must be between 1"),
    (["--scale", "-1"], "scale (CFG) must be between 0 and 30"),
    (["--sampler", "nonsense"], "unknown sampler 'nonsense'; valid samplers: DDIM, PLMS"),
    (["--outdir", "{file_as_dir}/sub"], "cannot create output folder"),
    (["--from-file", "/nonexistent/prompts.txt"], "no such file"),
    (["--from-file", "{empty_prompts}"], "holds no prompts"),
    (["--precision", "fp8"], "unknown precision 'fp8'"),
    (["--device", "cuda:7"], "device"),
    (["--steps", "many"], "expected an integer"),
    (["--prediction-type", "sample"], "unknown prediction type 'sample'; valid: epsilon, v_prediction"),
    (["--guidance-rescale", "2"], "guidance_rescale must be between 0 and 1, got 2"),
]


@pytest.mark.parametrize(("args", "message"), BAD_ARGS, ids=[" ".join(a) for a, _ in BAD_ARGS])
def test_bad_input_is_one_line_exit_2(args, message, tmp_path: Path, bad_files, tiny_file: Path, capsys) -> None:
    file_as_dir = tmp_path / "a-file"
    file_as_dir.write_text("x")
    empty_prompts = tmp_path / "empty.txt"
    empty_prompts.write_text("\n  \n")
    subst = {**{k: str(v) for k, v in bad_files.items()}, "file_as_dir": str(file_as_dir), "empty_prompts": str(empty_prompts)}
    args = [a.format(**subst) for a in args]
    if "--model" not in args:
        args = ["--model", str(tiny_file), *args]
    if "--from-file" not in args and "--prompt" not in args:
        args = [*args, "--prompt", "x"]
    outdir = tmp_path / "out"
    if "--outdir" not in args:
        args = [*args, "--outdir", str(outdir)]
    try:
        code = main(["txt2img", "--steps", "1", *args])
    except SystemExit as exc:  # argparse's own type errors
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert message in err
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    # Nothing half-written: not even the output folder.
    assert not outdir.exists()


def test_bad_input_as_subprocess_has_no_traceback(tmp_path: Path) -> None:
    lfs = tmp_path / "model.ckpt"
    lfs.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 12\n")
    out = run_cli("txt2img", "--model", str(lfs), "--prompt", "x", "--outdir", str(tmp_path / "o"))
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "git-LFS pointer" in out.stderr
    assert not (tmp_path / "o").exists()
    out = run_cli("txt2img", "--model", "tiny", "--prompt", "x", "--sampler", "zzz")
    assert out.returncode == 2 and "unknown sampler" in out.stderr and out.stderr.count("\n") == 1
    out = run_cli("txt2img", "--prompt", "x")
    assert out.returncode == 2 and "no model given" in out.stderr
