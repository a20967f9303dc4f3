"""The web UI's checkpoint and VAE dropdowns, driven with gradio_client over a live server.

Two tiny checkpoints (and a broken one) are written into a library folder; switching through the
dropdown must give exactly the pixels of an engine loaded from the other checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from leansd import Engine
from leansd.models.library import ModelLibrary

PROMPT, SEED, STEPS = "a red fox", 11, 2


@pytest.fixture(scope="module")
def library(tmp_path_factory) -> ModelLibrary:
    from leansd.models.tiny import write_tiny_single_file
    from tests.test_cli_library import write_vae

    root = tmp_path_factory.mktemp("data")
    folder = root / "models" / "Stable-diffusion"
    write_tiny_single_file(folder / "alpha.safetensors", seed=0)
    write_tiny_single_file(folder / "sub" / "beta.safetensors", seed=1)
    (folder / "broken.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    write_vae(root / "models" / "VAE" / "other.vae.safetensors", seed=5)
    return ModelLibrary(data_dir=root)


@pytest.fixture(scope="module")
def served(library: ModelLibrary):
    from gradio_client import Client

    from leansd.frontends.http import create_app
    from tests.service.conftest import LiveServer

    engine = Engine.load(str(library.require("checkpoint", "alpha").path), device="cpu", precision="full",
                         prompt_cache=False, library=library)
    server = LiveServer(create_app(engine, max_queue=8, max_size=512)).__enter__()
    yield engine, server, Client(server.url + "/", verbose=False, download_files=True)
    server.__exit__()


def ui_pixels(client) -> np.ndarray:
    gallery, _info, _files, _progress = client.predict(PROMPT, "", "Euler a", STEPS, 7.0, 64, 64, 1, 1, SEED,
                                                       api_name="/txt2img")
    return np.asarray(Image.open(gallery[0]["image"]).convert("RGB"))


def expected_pixels(library: ModelLibrary, name: str, *, vae: str | None = None) -> np.ndarray:
    """The same txt2img (built by the same A1111 builder as the UI) on a fresh in-process engine."""
    from leansd.frontends.a1111 import Limits, Txt2ImgRequest, txt2img_request

    engine = Engine.load(str(library.require("checkpoint", name).path), device="cpu", precision="full",
                         prompt_cache=False, library=library)
    body = Txt2ImgRequest(prompt=PROMPT, negative_prompt="", sampler_name="Euler a", steps=STEPS, cfg_scale=7.0,
                          width=64, height=64, n_iter=1, batch_size=1, seed=SEED)
    request = txt2img_request(body, model_name=name, limits=Limits())
    if vae is not None:
        from dataclasses import replace

        request = replace(request, vae=vae)
    return np.asarray(engine.generate(request, progress_bar=False).images[0].convert("RGB"))


def test_the_dropdowns_list_the_library(served) -> None:
    engine, server, client = served
    from leansd.frontends.webui import checkpoint_choices, vae_choices

    titles, loaded = checkpoint_choices(engine)
    assert loaded == titles[0] and loaded.startswith("alpha [")  # the loaded model first, by its A1111 title
    assert titles[1:] == ["sub/beta.safetensors", "broken.safetensors"]  # by name, as /sd-models
    assert vae_choices(engine) == ["Automatic", "None", "other.vae.safetensors"]
    models, vaes = client.predict(api_name="/refresh_checkpoints")
    assert [c[0] for c in models["choices"]] == titles and models["value"] == loaded
    assert [c[0] for c in vaes["choices"]] == ["Automatic", "None", "other.vae.safetensors"]
    assert vaes["value"] == "Automatic"


def test_switching_changes_the_pixels_and_a_broken_choice_keeps_the_old_model(served, library) -> None:
    from gradio_client.exceptions import AppError

    engine, server, client = served
    alpha, beta = expected_pixels(library, "alpha"), expected_pixels(library, "beta")
    assert np.abs(alpha.astype(int) - beta.astype(int)).max() > 2
    np.testing.assert_array_equal(ui_pixels(client), alpha)

    status, value = client.predict("sub/beta.safetensors", api_name="/set_checkpoint")
    assert status.startswith("Loaded: beta") and value["value"].startswith("beta [")  # selected by its title
    assert engine.bundle.name == "beta"
    np.testing.assert_array_equal(ui_pixels(client), beta)

    with pytest.raises(AppError) as failed:
        client.predict("broken.safetensors", api_name="/set_checkpoint")
    message = str(failed.value)
    assert "loading broken.safetensors failed" in message and "broken.safetensors" in message
    assert "\n" not in message.strip() and "Traceback" not in message
    assert engine.bundle.name == "beta"  # the old model was loaded again and stays in use
    np.testing.assert_array_equal(ui_pixels(client), beta)
    assert client.predict(api_name="/refresh_checkpoints")[0]["value"].startswith("beta [")

    status, _value = client.predict("alpha.safetensors", api_name="/set_checkpoint")
    assert status.startswith("Loaded: alpha")
    np.testing.assert_array_equal(ui_pixels(client), alpha)


def test_the_vae_dropdown_changes_the_decode(served, library) -> None:
    engine, server, client = served
    if engine.bundle.name != "alpha":
        client.predict("alpha.safetensors", api_name="/set_checkpoint")
    plain = expected_pixels(library, "alpha")
    with_vae = expected_pixels(library, "alpha", vae="other.vae.safetensors")
    assert np.abs(plain.astype(int) - with_vae.astype(int)).max() > 2

    assert client.predict("other.vae.safetensors", api_name="/set_vae") == "VAE: other.vae.safetensors (from the next job)"
    np.testing.assert_array_equal(ui_pixels(client), with_vae)
    assert engine.vae_path is not None and engine.vae_path.name == "other.vae.safetensors"
    assert client.predict(api_name="/refresh_checkpoints")[1]["value"] == "other.vae.safetensors"

    client.predict("None", api_name="/set_vae")
    np.testing.assert_array_equal(ui_pixels(client), plain)
    assert engine.vae_path is None


def test_a_refreshed_list_offers_a_new_file_and_an_unlisted_name_is_refused(served, library) -> None:
    from gradio_client.exceptions import AppError

    from leansd.models.tiny import write_tiny_single_file

    engine, server, client = served
    with pytest.raises(AppError) as refused:
        client.predict("gamma.safetensors", api_name="/set_checkpoint")
    assert "gamma.safetensors" in str(refused.value) and "\n" not in str(refused.value).strip()
    before = engine.bundle.name
    write_tiny_single_file(library.folder("checkpoint") / "gamma.safetensors", seed=2)
    models, _vaes = client.predict(api_name="/refresh_checkpoints")
    assert "gamma.safetensors" in [c[0] for c in models["choices"]]
    job = client.submit("gamma.safetensors", api_name="/set_checkpoint")
    status, _value = job.result()
    assert status.startswith("Loaded: gamma") and engine.bundle.name == "gamma" != before
    lines = [out[0] for out in job.outputs()]
    assert lines[0].startswith("Loading gamma.safetensors")  # the status line while it loads
