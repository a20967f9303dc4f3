"""The web UI's refiner dropdown and switch-at slider, driven with gradio_client over a live server."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from leansd import Engine, GenerationRequest
from leansd.models.family import ModelFamily
from leansd.models.library import ModelLibrary
from leansd.outputs.infotext import parse_infotext

PROMPT, SEED, STEPS = "a red fox", 11, 4


@pytest.fixture(scope="module")
def library(tmp_path_factory) -> ModelLibrary:
    from leansd.models.tiny import write_tiny_single_file

    root = tmp_path_factory.mktemp("data")
    folder = root / "models" / "Stable-diffusion"
    write_tiny_single_file(folder / "xl-base.safetensors", family=ModelFamily.SDXL)
    write_tiny_single_file(folder / "xl-refiner.safetensors", family=ModelFamily.SDXL_REFINER)
    return ModelLibrary(data_dir=root)


def test_refiner_dropdown_and_switch_slider(library: ModelLibrary, monkeypatch, tmp_path) -> None:
    from gradio_client import Client

    from leansd.frontends.http import create_app
    from leansd.frontends.webui import refiner_choices
    from tests.service.conftest import LiveServer

    monkeypatch.setenv("LEANSD_CACHE_DIR", str(tmp_path / "cache"))
    base = str(library.require("checkpoint", "xl-base").path)
    engine = Engine.load(base, device="cpu", precision="full", prompt_cache=False, library=library)
    assert refiner_choices(engine) == ["None", "xl-base", "xl-refiner"]
    with LiveServer(create_app(engine, max_queue=8, max_size=512)) as server:
        client = Client(server.url + "/", verbose=False, download_files=True, httpx_kwargs={"timeout": 300})
        common = (PROMPT, "", "Euler", STEPS, 7.0, 64, 64, 1, 1, SEED, 0.0)  # last: CFG rescale
        gallery, info, _files, _progress = client.predict(*common, "xl-refiner", 0.5, api_name="/txt2img")
        plain, plain_info, _files, _progress = client.predict(*common, "None", 0.5, api_name="/txt2img")
        with pytest.raises(Exception, match="nothing is not in the list of choices"):
            client.predict(*common, "nothing", 0.5, api_name="/txt2img")
    parsed = parse_infotext(info.split("\n\n")[0])
    assert parsed["Refiner"].startswith("xl-refiner [") and parsed["Refiner switch at"] == "0.5"
    assert "Refiner" not in plain_info
    expected = Engine.load(base, device="cpu", precision="full", prompt_cache=False).generate(GenerationRequest(
        prompt=PROMPT, sampler="Euler", num_inference_steps=STEPS, guidance_scale=7.0, width=64, height=64, seed=SEED,
        refiner_checkpoint=str(library.require("checkpoint", "xl-refiner").path), refiner_switch_at=0.5),
        progress_bar=False)
    ours = np.asarray(Image.open(gallery[0]["image"]).convert("RGB"))
    np.testing.assert_array_equal(ours, np.asarray(expected.images[0]))
    assert np.abs(ours.astype(int) - np.asarray(Image.open(plain[0]["image"]).convert("RGB"), dtype=int)).max() > 0
