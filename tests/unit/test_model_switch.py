"""Switching checkpoints inside a job (A1111's sd_model_checkpoint), one model in memory at a time."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from leansd import Engine, GenerationRequest
from leansd.errors import InvalidRequestError, ModelLoadError
from leansd.models.library import ModelLibrary


@pytest.fixture(scope="module")
def library(tmp_path_factory) -> ModelLibrary:
    from leansd.models.tiny import write_tiny_single_file

    root = tmp_path_factory.mktemp("data")
    folder = root / "models" / "Stable-diffusion"
    write_tiny_single_file(folder / "alpha.safetensors", seed=0)
    write_tiny_single_file(folder / "sub" / "beta.safetensors", seed=1)
    (folder / "broken.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    return ModelLibrary(data_dir=root)


def request(**kw) -> GenerationRequest:
    base = dict(prompt="a red fox", width=64, height=64, num_inference_steps=2, sampler="DDIM", seed=9)
    base.update(kw)
    return GenerationRequest(**base)


def test_switch_by_name_and_back(library: ModelLibrary) -> None:
    alpha_path = library.require("checkpoint", "alpha").path
    beta_path = library.require("checkpoint", "beta").path
    engine = Engine.load(str(alpha_path), device="cpu", precision="full", prompt_cache=False, library=library)
    alpha = engine.generate(request(), progress_bar=False)
    expected_beta = Engine.load(str(beta_path), device="cpu", precision="full",
                                prompt_cache=False).generate(request(), progress_bar=False)
    beta = engine.generate(request(checkpoint="sub/beta.safetensors [0123456789]"), progress_bar=False)
    assert engine.bundle.name == "beta" and "Model: beta" in beta.infotexts[0]
    np.testing.assert_array_equal(beta.pixels, expected_beta.pixels)
    assert np.abs(beta.pixels - alpha.pixels).max() > 1e-3
    assert engine.switch_model("beta") is False  # already loaded: nothing happens
    again = engine.generate(request(checkpoint="alpha"), progress_bar=False)
    np.testing.assert_array_equal(again.pixels, alpha.pixels)


def test_unknown_or_broken_checkpoints_keep_a_working_model(library: ModelLibrary) -> None:
    alpha_path = library.require("checkpoint", "alpha").path
    engine = Engine.load(str(alpha_path), device="cpu", precision="full", prompt_cache=False, library=library)
    before = engine.generate(request(), progress_bar=False).pixels
    with pytest.raises(InvalidRequestError, match="no checkpoint named 'gamma'.*available: alpha, beta, broken"):
        engine.generate(request(checkpoint="gamma"), progress_bar=False)
    with pytest.raises(ModelLoadError, match="broken.safetensors"):
        engine.generate(request(checkpoint="broken"), progress_bar=False)
    assert engine.bundle.name == "alpha"  # loaded again after the failure
    np.testing.assert_array_equal(engine.generate(request(), progress_bar=False).pixels, before)
    with pytest.raises(InvalidRequestError, match="checkpoint must be a non-empty name"):
        request(checkpoint=" ").validated()


def test_vae_choice_follows_the_switch(library: ModelLibrary, tmp_path: Path) -> None:
    from tests.test_cli_library import write_vae

    vae = write_vae(tmp_path / "other.vae.safetensors", seed=5)
    engine = Engine.load(str(library.require("checkpoint", "alpha").path), device="cpu", precision="full",
                         prompt_cache=False, library=library)
    plain = engine.generate(request(), progress_bar=False).pixels
    with_vae = engine.generate(request(vae=str(vae)), progress_bar=False)
    assert engine.vae_path == vae and "VAE: other.vae.safetensors" in with_vae.infotexts[0]
    assert np.abs(with_vae.pixels - plain).max() > 1e-3
    engine.generate(request(checkpoint="beta"), progress_bar=False)
    assert engine.vae_path == vae  # the sd_vae choice stays in force on the new model
    back = engine.generate(request(checkpoint="alpha", vae="None"), progress_bar=False)
    assert engine.vae_path is None
    np.testing.assert_array_equal(back.pixels, plain)
