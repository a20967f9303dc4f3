"""`leansd serve --ray`: the /sdapi/v1 app and web UI over two CPU Ray Serve replicas (tiny model)."""

from __future__ import annotations

import base64
import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor
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


def test_requests_spread_over_two_replicas_with_the_single_process_pixels(ray_cluster) -> None:
    from leansd.engine.engine import Engine
    from leansd.frontends.a1111 import Limits, Txt2ImgRequest, txt2img_request
    from leansd.frontends.http import create_app
    from leansd.service.ray_serve import start_ray_queue

    with pytest.raises(Exception, match="--replicas 3 needs 3 GPUs"):
        start_ray_queue(None, model="tiny", replicas=3, engine_options=OPTIONS)
    queue = start_ray_queue(None, model="tiny", replicas=2, engine_options=OPTIONS)
    try:
        app = create_app(queue, max_steps=1000)  # the caller owns the queue, as `leansd serve` does
        queue.start()
        with _Server(app) as url, httpx.Client(base_url=url, timeout=120) as client:
            bodies = [{"prompt": f"a fox {i}", "seed": 10 + i, "width": 64, "height": 64, "steps": 3,
                       "sampler_name": "Euler a"} for i in range(4)]
            with ThreadPoolExecutor(4) as pool:
                answers = list(pool.map(lambda body: client.post("/sdapi/v1/txt2img", json=body), bodies))
            assert [a.status_code for a in answers] == [200] * 4, [a.text for a in answers]
            assert len(queue.engine.ran_on) == 2 and sum(queue.engine.ran_on.values()) == 4
            local = Engine.load("tiny", **OPTIONS)
            for body, answer in zip(bodies, answers, strict=True):
                request = txt2img_request(Txt2ImgRequest(**body), model_name="tiny", limits=Limits())
                expected = local.generate(request, progress_bar=False).images[0]
                assert np.array_equal(_pixels(answer.json()["images"][0]), np.asarray(expected))

            # Progress and interrupt reach the replica that runs the job.
            long = {"prompt": "slow", "seed": 1, "width": 64, "height": 64, "steps": 400, "sampler_name": "Euler"}
            with ThreadPoolExecutor(1) as pool:
                pending = pool.submit(client.post, "/sdapi/v1/txt2img", json=long)
                deadline = time.monotonic() + 60
                step = 0
                while step < 2 and time.monotonic() < deadline and not pending.done():
                    progress = client.get("/sdapi/v1/progress").json()
                    step = progress["state"]["sampling_step"]
                    time.sleep(0.05)
                assert step >= 2 and progress["state"]["sampling_steps"] == 400 and 0 < progress["progress"] < 1
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
