"""The model library over HTTP with the real `webuiapi` client: checkpoints, LoRAs, embeddings, VAEs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from leansd.models.library import ModelLibrary
from leansd.outputs.infotext import parse_infotext
from tests.helpers import tiny_bundle, tiny_kohya_lora

webuiapi = pytest.importorskip("webuiapi")


@pytest.fixture()
def library(tmp_path: Path) -> ModelLibrary:
    from leansd.models.tiny import write_tiny_single_file

    write_tiny_single_file(tmp_path / "models" / "Stable-diffusion" / "sd1" / "other.safetensors", seed=1)
    (tmp_path / "models" / "Lora").mkdir(parents=True)
    save_file(tiny_kohya_lora(seed=1), str(tmp_path / "models" / "Lora" / "ink.safetensors"),
              metadata={"ss_output_name": "ink-v1"})
    (tmp_path / "embeddings").mkdir()
    torch.save({"string_to_param": {"*": torch.randn(3, 32)}}, tmp_path / "embeddings" / "badhands.pt")
    save_file({"emb_params": torch.randn(2, 768)}, str(tmp_path / "embeddings" / "sd15only.safetensors"))
    (tmp_path / "models" / "VAE").mkdir(parents=True)
    (tmp_path / "models" / "VAE" / "ft-mse.vae.safetensors").write_bytes(b"listed, not read")
    return ModelLibrary(data_dir=tmp_path)


def test_library_routes_and_a_lora_prompt(library: ModelLibrary, live_server) -> None:
    from leansd.engine.engine import Engine
    from leansd.frontends.http import create_app

    engine = Engine(tiny_bundle(), device="cpu", precision="full", prompt_cache=False, library=library)
    server = live_server(create_app(engine, ui=False))
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port, sampler="DDIM", steps=2)

    models = api.get_sd_models()
    assert [m["model_name"] for m in models] == ["tiny", "sd1/other"]
    assert models[1]["title"] == "sd1/other.safetensors" and models[1]["hash"] is None
    assert api.util_get_model_names() == ["sd1/other.safetensors", "tiny"]

    [lora] = api.get_loras()
    assert lora["name"] == "ink" and lora["alias"] == "ink-v1" and lora["metadata"] == {"ss_output_name": "ink-v1"}
    assert api.get_sd_vae() == [{"model_name": "ft-mse.vae.safetensors",
                                 "filename": str(library.folder("vae") / "ft-mse.vae.safetensors")}]
    embeddings = api.get_embeddings()
    assert embeddings["loaded"] == {"badhands": {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                                                 "shape": 32, "vectors": 3}}
    assert list(embeddings["skipped"]) == ["sd15only"]

    # New files appear after a refresh, as in A1111.
    save_file(tiny_kohya_lora(seed=2), str(library.folder("lora") / "second.safetensors"))
    assert [x["name"] for x in api.get_loras()] == ["ink"]
    assert api.session.post(f"{api.baseurl}/refresh-loras").status_code == 200
    assert [x["name"] for x in api.get_loras()] == ["ink", "second"]
    api.refresh_checkpoints()

    plain = api.txt2img(prompt="a red fox", seed=3, width=64, height=64)
    tagged = api.txt2img(prompt="a red fox <lora:ink:0.8>, badhands", seed=3, width=64, height=64)
    info = parse_infotext(tagged.images[0].info["parameters"])
    assert info["Prompt"] == "a red fox <lora:ink:0.8>, badhands"
    assert info["Lora hashes"].startswith("ink: ") and info["TI hashes"].startswith("badhands: ")
    assert np.abs(np.asarray(plain.image, dtype=int) - np.asarray(tagged.image, dtype=int)).max() > 5

    missing = api.session.post(f"{api.baseurl}/txt2img", json={"prompt": "x <lora:nope:1>", "steps": 1,
                                                              "width": 64, "height": 64})
    assert missing.status_code in (400, 422) and "no lora named 'nope'" in missing.text


def test_checkpoint_switching_through_options_and_override_settings(library: ModelLibrary, live_server) -> None:
    from leansd.engine.engine import Engine
    from leansd.frontends.http import create_app

    engine = Engine(tiny_bundle(), device="cpu", precision="full", prompt_cache=False, library=library)
    server = live_server(create_app(engine, ui=False))
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port, sampler="DDIM", steps=2)
    first = api.txt2img(prompt="a red fox", seed=3, width=64, height=64)
    assert first.info["sd_model_name"] == "tiny"

    # Per request: the job loads the checkpoint, and the next plain request goes back (A1111 restores).
    other = api.txt2img(prompt="a red fox", seed=3, width=64, height=64,
                        override_settings={"sd_model_checkpoint": "sd1/other.safetensors"})
    assert parse_infotext(other.images[0].info["parameters"])["Model"] == "other"
    assert np.abs(np.asarray(other.image, dtype=int) - np.asarray(first.image, dtype=int)).max() > 5
    back = api.txt2img(prompt="a red fox", seed=3, width=64, height=64)
    np.testing.assert_array_equal(np.asarray(back.image), np.asarray(first.image))

    # Through /options (webuiapi's util_set_model): loaded before the answer, by a switch job.
    api.util_set_model("sd1/other.safetensors")
    assert api.get_options()["sd_model_checkpoint"] == "sd1/other.safetensors"
    assert engine.bundle.name == "other"
    switched = api.txt2img(prompt="a red fox", seed=3, width=64, height=64)
    np.testing.assert_array_equal(np.asarray(switched.image), np.asarray(other.image))
    assert engine.bundle.name == "other"

    bad = api.session.post(f"{api.baseurl}/options", json={"sd_model_checkpoint": "nothing-like-it"})
    assert bad.status_code in (400, 422) and "not available" in bad.text


def test_sd_vae_from_a_client_names_a_library_vae_never_a_server_path(library: ModelLibrary, live_server,
                                                                       tmp_path: Path) -> None:
    from leansd.engine.engine import Engine
    from leansd.frontends.http import create_app

    outside = tmp_path / "private" / "secret.safetensors"
    outside.parent.mkdir()
    save_file({"x": torch.zeros(1)}, str(outside))
    engine = Engine(tiny_bundle(), device="cpu", precision="full", prompt_cache=False, library=library)
    server = live_server(create_app(engine, ui=False))
    base = f"http://127.0.0.1:{server.port}/sdapi/v1"
    import requests

    bad = requests.post(f"{base}/options", json={"sd_vae": str(outside)}, timeout=30)
    assert bad.status_code == 400 and "no VAE of that name" in bad.text and "no such file" not in bad.text
    assert requests.get(f"{base}/options", timeout=30).json()["sd_vae"] == "Automatic"  # nothing stored
    job = requests.post(f"{base}/txt2img", json={"prompt": "x", "steps": 1, "width": 64, "height": 64,
                                                 "override_settings": {"sd_vae": str(outside)}}, timeout=60)
    assert job.status_code == 400 and "override_settings.sd_vae" in job.text
    for good in ("Automatic", "None", "ft-mse.vae.safetensors"):
        assert requests.post(f"{base}/options", json={"sd_vae": good}, timeout=30).status_code == 200, good


def test_a_model_switch_job_runs_no_unet_step_and_the_next_job_uses_the_new_model(library: ModelLibrary) -> None:
    from diffusers import UNet2DConditionModel

    from leansd.engine.engine import Engine
    from leansd.request import GenerationRequest
    from leansd.service import JobCancelledError, JobQueue

    engine = Engine(tiny_bundle(), device="cpu", precision="full", prompt_cache=False, library=library)
    request = GenerationRequest(prompt="a red fox", width=64, height=64, num_inference_steps=2, seed=3,
                                sampler="DDIM")
    calls = []

    def count(module: torch.nn.Module, args: tuple, output: object) -> None:
        if isinstance(module, UNet2DConditionModel):
            calls.append(module)

    hook = torch.nn.modules.module.register_module_forward_hook(count)
    queue = JobQueue(engine).start()
    try:
        job = queue.submit_switch("sd1/other.safetensors")
        assert job.snapshot()["kind"] == "switch_model"
        assert job.wait(60) is True and calls == [] and engine.bundle.name == "other"
        image = np.asarray(queue.submit(request).wait(60).images[0])
        assert len(calls) == 2 and calls[0] is engine.bundle.unet  # two steps, on the new model's UNet
        other = Engine.load(str(library.find_checkpoint("sd1/other.safetensors").path), device="cpu", precision="full",
                            prompt_cache=False)
        np.testing.assert_array_equal(image, np.asarray(other.generate(request, progress_bar=False).images[0]))
        assert queue.submit_switch("sd1/other.safetensors").wait(60) is False  # loaded already: nothing to do

        # A switch waiting behind a generation can be cancelled; it never starts.
        slow = queue.submit(GenerationRequest(prompt="x", width=64, height=64, num_inference_steps=200, seed=1))
        waiting = queue.submit_switch("tiny")
        assert queue.cancel(waiting.id)
        with pytest.raises(JobCancelledError):
            waiting.wait(60)
        queue.cancel(slow.id)
        assert engine.bundle.name == "other"
    finally:
        hook.remove()
        queue.shutdown(30)
