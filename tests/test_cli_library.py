"""The model library from the CLI: --data-dir and the folder flags, --model NAME, <lora:...>, embeddings, --vae."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from leansd.outputs.infotext import parse_infotext
from leansd.outputs.writer import read_infotext
from tests.helpers import tiny_kohya_lora


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "leansd.frontends.cli", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


def write_vae(path: Path, *, seed: int) -> Path:
    """The tiny model's VAE with other random weights, as an original-layout VAE file (no prefix)."""
    from leansd.models.convert import diffusers_to_ldm
    from leansd.models.tiny import build_tiny_components

    tiny = build_tiny_components(seed=seed)
    sd = diffusers_to_ldm(tiny.unet, tiny.vae, tiny.text_encoder)
    vae = {k[len("first_stage_model."):]: v.detach().contiguous().clone() for k, v in sd.items()
           if k.startswith("first_stage_model.")}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(vae, str(path))
    return path


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    from leansd.models.tiny import write_tiny_single_file

    root = tmp_path_factory.mktemp("webui")
    write_tiny_single_file(root / "models" / "Stable-diffusion" / "sd1" / "tinysd.safetensors")
    (root / "models" / "Lora").mkdir(parents=True)
    save_file(tiny_kohya_lora(seed=1), str(root / "models" / "Lora" / "ink.safetensors"))
    (root / "embeddings").mkdir()
    torch.save({"string_to_param": {"*": torch.randn(2, 32, generator=torch.Generator().manual_seed(3))}},
               root / "embeddings" / "badhands.pt")
    write_vae(root / "models" / "VAE" / "other.vae.safetensors", seed=5)
    return root


def generate(data_dir: Path, outdir: Path, *extra: str, prompt: str = "a red fox",
             model: str = "tinysd") -> tuple[np.ndarray, dict]:
    out = run_cli("txt2img", "--model", model, "--data-dir", str(data_dir), "--prompt", prompt, "--H", "64",
                  "--W", "64", "--steps", "2", "--seed", "5", "--sampler", "DDIM", "--outdir", str(outdir), *extra)
    assert out.returncode == 0, out.stderr
    [path] = sorted(outdir.glob("*.png"))
    return np.asarray(Image.open(path)), parse_infotext(read_infotext(path))


def test_model_by_name_lora_embedding_and_vae(data_dir: Path, tmp_path: Path) -> None:
    plain, info = generate(data_dir, tmp_path / "plain")
    assert info["Model"] == "tinysd" and "VAE" not in info
    lora, info = generate(data_dir, tmp_path / "lora", prompt="a red fox <lora:ink:0.8>, badhands")
    assert info["Prompt"] == "a red fox <lora:ink:0.8>, badhands"
    assert info["Lora hashes"].startswith("ink: ") and info["TI hashes"].startswith("badhands: ")
    assert np.abs(lora.astype(int) - plain.astype(int)).max() > 5
    vae_file = data_dir / "models" / "VAE" / "other.vae.safetensors"
    other, info = generate(data_dir, tmp_path / "vae", "--vae", "other.vae")
    assert info["VAE"] == "other.vae.safetensors"
    assert info["VAE hash"] == hashlib.sha256(vae_file.read_bytes()).hexdigest()[:10]
    assert np.abs(other.astype(int) - plain.astype(int)).max() > 5
    by_path, _ = generate(data_dir, tmp_path / "vaepath", "--vae-path", str(vae_file))
    np.testing.assert_array_equal(by_path, other)
    none, _ = generate(data_dir, tmp_path / "none", "--vae", "None")
    np.testing.assert_array_equal(none, plain)


def test_automatic_vae_beside_the_checkpoint(tmp_path: Path) -> None:
    from leansd.models.tiny import write_tiny_single_file

    ckpt = write_tiny_single_file(tmp_path / "ckpts" / "m.safetensors")
    plain, info = generate(tmp_path, tmp_path / "a", "--ckpt-dir", str(ckpt.parent), model="m.safetensors [0000000000]")
    assert "VAE" not in info
    write_vae(tmp_path / "ckpts" / "m.vae.safetensors", seed=5)
    auto, info = generate(tmp_path, tmp_path / "b", "--ckpt-dir", str(ckpt.parent), model="m")
    assert info["VAE"] == "m.vae.safetensors" and np.abs(auto.astype(int) - plain.astype(int)).max() > 5


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--lora-dir", "/nonexistent/loras"), "--lora-dir /nonexistent/loras: no such folder"),
        (("--vae", "nope"), "VAE 'nope': no such file"),
        (("--prompt", "x <lora:missing:1>"), "no lora named 'missing'"),
    ],
)
def test_bad_library_input_is_one_line_exit_2(data_dir: Path, tmp_path: Path, args, message) -> None:
    base = ["txt2img", "--model", "tinysd", "--data-dir", str(data_dir), "--steps", "1", "--H", "64", "--W", "64",
            "--outdir", str(tmp_path / "out")]
    if "--prompt" not in args:
        base += ["--prompt", "x"]
    out = run_cli(*base, *args)
    assert out.returncode == 2 and message in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
