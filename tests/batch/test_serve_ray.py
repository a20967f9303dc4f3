"""`leansd serve --ray`: the /sdapi/v1 app and web UI over two CPU Ray Serve replicas (tiny model)."""

from __future__ import annotations

import base64
import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("ray.serve", reason="ray[serve] is not installed (pip install 'leansd[ray]')")

import httpx  # noqa: E402
from PIL import Image  # noqa: E402

OPTIONS = {"device": "cpu", "prompt_cache": False}


class _Server:
    def __init__(self, app: Any) -> None:
        import uvicorn

        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.server.servers[0].sockets[0].getsockname()[1]}"

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def _pixels(b64: str) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(b64))) as image:
        return np.asarray(image.convert("RGB"))


def _library(root: Path) -> Any:
    """A model folder with a checkpoint, a LoRA, two embeddings (one of another width) and a VAE."""
    import torch
    from safetensors.torch import save_file

    from leansd.models.library import ModelLibrary
    from leansd.models.tiny import write_tiny_single_file
    from tests.helpers import tiny_kohya_lora

    write_tiny_single_file(root / "models" / "Stable-diffusion" / "sd1" / "other.safetensors", seed=1)
    (root / "models" / "Lora").mkdir(parents=True)
    save_file(tiny_kohya_lora(seed=1), str(root / "models" / "Lora" / "ink.safetensors"))
    (root / "embeddings").mkdir()
    torch.save({"string_to_param": {"*": torch.randn(3, 32)}}, root / "embeddings" / "badhands.pt")
    save_file({"emb_params": torch.randn(2, 768)}, str(root / "embeddings" / "sd15only.safetensors"))
    (root / "models" / "VAE").mkdir(parents=True)
    (root / "models" / "VAE" / "ft-mse.vae.safetensors").write_bytes(b"listed, not read")
    return ModelLibrary(data_dir=root)


LIBRARY_ROUTES = ("sd-models", "loras", "embeddings", "sd-vae")
TOO_LONG = {"prompt": "x", "steps": 50, "width": 2048, "height": 2048}


def test_requests_spread_over_two_replicas_with_the_single_process_pixels(ray_cluster, tmp_path: Path) -> None:
    from leansd.engine.engine import Engine
    from leansd.frontends.a1111 import Limits, Txt2ImgRequest, txt2img_request
    from leansd.frontends.http import create_app
    from leansd.frontends.webui import checkpoint_choices, library_choices, vae_choices
    from leansd.service.ray_serve import start_ray_queue

    library = _library(tmp_path)
    options = {**OPTIONS, "library": library}
    with pytest.raises(Exception, match="--replicas 3 needs 3 GPUs"):
        start_ray_queue(None, model="tiny", replicas=3, engine_options=options)
    queue = start_ray_queue(None, model="tiny", replicas=2, engine_options=options, max_job_seconds=60)
    local = Engine.load("tiny", **options)
    try:
        app = create_app(queue, max_steps=1000, max_size=4096)  # the caller owns the queue, as `leansd serve` does
        queue.start()
        with _Server(app) as url, httpx.Client(base_url=url, timeout=120) as client, \
                _Server(create_app(local, max_job_seconds=60, max_size=4096, ui=False)) as single_url:
            # The library routes and the web UI's lists answer as the single-process server's.
            for route in LIBRARY_ROUTES:
                mine = client.get(f"/sdapi/v1/{route}")
                theirs = httpx.get(f"{single_url}/sdapi/v1/{route}", timeout=60)
                assert mine.status_code == theirs.status_code == 200
                assert mine.json() == theirs.json(), route
            assert [m["model_name"] for m in client.get("/sdapi/v1/sd-models").json()] == ["tiny", "sd1/other"]
            assert list(client.get("/sdapi/v1/embeddings").json()["skipped"]) == ["sd15only"]
            for lists in (library_choices, vae_choices, checkpoint_choices):
                assert lists(queue.engine) == lists(local), lists.__name__
            # A listed checkpoint cannot be switched to on replicas: refused, the options unchanged.
            before = client.get("/sdapi/v1/options").json()
            switch = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "sd1/other.safetensors"})
            assert switch.status_code == 400 and "Ray Serve replicas keep the server's checkpoint" in switch.text
            assert client.get("/sdapi/v1/options").json() == before

            # --max-job-seconds: the same refusal as the single-process server, before any replica works.
            deadline = time.monotonic() + 120
            while (queue.engine.flops_per_second is None or local.speed.flops_per_second is None) \
                    and time.monotonic() < deadline:
                time.sleep(0.05)
            done, ran = queue.status()["completed"], sum(queue.engine.ran_on.values())  # speed checks may have run
            refused = client.post("/sdapi/v1/txt2img", json=TOO_LONG)
            single = httpx.post(f"{single_url}/sdapi/v1/txt2img", json=TOO_LONG, timeout=60)
            assert refused.status_code == single.status_code == 400
            assert refused.json()["error"] == single.json()["error"] == "InvalidRequestError"
            limit = "more than this server's limit of 60 s (--max-job-seconds); ask for a smaller size"
            assert limit in refused.json()["detail"] and limit in single.json()["detail"]
            assert queue.status()["completed"] == done and sum(queue.engine.ran_on.values()) == ran

            bodies = [{"prompt": f"a fox {i}", "seed": 10 + i, "width": 64, "height": 64, "steps": 3,
                       "sampler_name": "Euler a"} for i in range(4)]
            with ThreadPoolExecutor(4) as pool:
                answers = list(pool.map(lambda body: client.post("/sdapi/v1/txt2img", json=body), bodies))
            assert [a.status_code for a in answers] == [200] * 4, [a.text for a in answers]
            assert len(queue.engine.ran_on) == 2 and sum(queue.engine.ran_on.values()) == ran + 4
            for body, answer in zip(bodies, answers, strict=True):
                request = txt2img_request(Txt2ImgRequest(**body), model_name="tiny", limits=Limits())
                expected = local.generate(request, progress_bar=False).images[0]
                assert np.array_equal(_pixels(answer.json()["images"][0]), np.asarray(expected))

            # Progress and interrupt reach the replica that runs the job.
            long = {"prompt": "slow", "seed": 1, "width": 64, "height": 64, "steps": 400, "sampler_name": "Euler"}
            with ThreadPoolExecutor(1) as pool:
                pending = pool.submit(client.post, "/sdapi/v1/txt2img", json=long)
                deadline = time.monotonic() + 180  # a busy machine can take long to reach step 2
                step = 0
                while step < 2 and time.monotonic() < deadline and not pending.done():
                    progress = client.get("/sdapi/v1/progress").json()
                    step = progress["state"]["sampling_step"]
                    time.sleep(0.05)
                assert step >= 2 and progress["state"]["sampling_steps"] == 400 and 0 < progress["progress"] < 1, (
                    pending.result().text if pending.done() else progress)
                assert client.post("/sdapi/v1/interrupt").status_code == 200
                answer = pending.result(timeout=60)
            assert answer.status_code == 200
            info = answer.json()["info"]
            assert '"interrupted": true' in info
            assert client.get("/").status_code == 200  # the web UI is there too
    finally:
        queue.shutdown(30)
    from ray import serve

    assert "leansd" not in serve.status().applications
