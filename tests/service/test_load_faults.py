"""Load (32 concurrent mixed requests against one server) and faults (OOM, cancel storms, disconnects)."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

from leansd.frontends.http import create_app
from leansd.request import GenerationRequest

from .conftest import OOMEngine, SlowEngine
from .test_payloads import INIT, MASK, b64


def decode(data: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))


def test_32_concurrent_mixed_requests(engine, live_server) -> None:
    server = live_server(create_app(SlowEngine(engine, delay=0.01), max_queue=6))
    base = server.url + "/sdapi/v1"
    payloads = []
    for i in range(32):
        common = {"prompt": f"load test {i}", "seed": 1000 + i, "steps": 3, "width": 64, "height": 64,
                  "sampler_name": ["Euler a", "DDIM", "DPM++ 2M Karras", "PLMS"][i % 4], "cfg_scale": 7}
        if i % 8 == 7:
            payloads.append(("txt2img", {**common, "width": 60}, False))  # invalid
        elif i % 8 == 3:
            payloads.append(("img2img", {**common, "init_images": ["garbage!"]}, False))  # invalid
        elif i % 3 == 0:
            payloads.append(("img2img", {**common, "init_images": [b64(INIT)], "denoising_strength": 0.6,
                                         **({"mask": b64(MASK)} if i % 2 else {})}, True))
        else:
            payloads.append(("txt2img", common, True))

    barrier = threading.Barrier(32)

    def send(item):
        endpoint, payload, _ = item
        with httpx.Client(timeout=120) as http:
            barrier.wait(30)
            return http.post(f"{base}/{endpoint}", json=payload)

    t0 = time.monotonic()
    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(send, payloads))
    elapsed = time.monotonic() - t0

    accepted = []
    statuses = [a.status_code for a in answers]
    for (endpoint, payload, valid), answer in zip(payloads, answers, strict=True):
        if not valid:
            assert 400 <= answer.status_code < 500, answer.text
            continue
        assert answer.status_code in (200, 503), answer.text
        if answer.status_code == 503:
            assert int(answer.headers["Retry-After"]) >= 1
            assert answer.json()["error"] == "QueueFullError"
            continue
        info = json.loads(answer.json()["info"])
        assert info["all_seeds"] == [payload["seed"]] and info["prompt"] == payload["prompt"]
        accepted.append((endpoint, payload, answer.json()["images"][0]))
    assert 503 in statuses, statuses  # the bound was reached
    assert len(accepted) >= 6, statuses
    # Every accepted job ran exactly once: the queue saw as many jobs as there were 200s.
    assert server.queue.completed == len(accepted)
    assert server.queue.status()["waiting"] == [] and server.queue.current is None

    # The right seed's image: equal to an in-process run of the same request.
    for endpoint, payload, data in accepted:
        fields = dict(prompt=payload["prompt"], seed=payload["seed"], num_inference_steps=3, width=64, height=64,
                      sampler=payload["sampler_name"], guidance_scale=7.0)
        if endpoint == "img2img":
            fields.update(init_image=INIT, strength=0.6, mask=MASK if "mask" in payload else None,
                          inpainting_fill="fill")
        expected = engine.generate(GenerationRequest(**fields), progress_bar=False).images[0]
        assert np.array_equal(decode(data), np.asarray(expected)), payload["prompt"]
    assert elapsed < 60


def test_out_of_memory_fails_that_job_only(engine, live_server) -> None:
    oom = OOMEngine(engine)
    server = live_server(create_app(oom))
    base = server.url + "/sdapi/v1"
    payload = {"steps": 2, "width": 64, "height": 64, "seed": 9}
    answer = httpx.post(f"{base}/txt2img", json={**payload, "prompt": "OOM now"}, timeout=60)
    assert answer.status_code == 500
    assert answer.json()["error"] == "OutOfMemoryError" and "out of memory" in answer.json()["detail"]
    answer = httpx.post(f"{base}/txt2img", json={**payload, "prompt": "fine"}, timeout=60)
    assert answer.status_code == 200 and json.loads(answer.json()["info"])["seed"] == 9
    assert oom.failures == 1


def test_cancel_storm_keeps_server_healthy(engine, live_server) -> None:
    server = live_server(create_app(SlowEngine(engine, delay=0.02)))
    base = server.url + "/sdapi/v1"
    results = {}

    def long_job(key: str) -> None:
        results[key] = httpx.post(f"{base}/txt2img", json={"prompt": key, "steps": 10, "n_iter": 3, "width": 64,
                                                           "height": 64, "seed": 1}, timeout=60)

    jobs = [threading.Thread(target=long_job, args=(f"job{i}",)) for i in range(3)]
    for job in jobs:
        job.start()

    def storm(_: int) -> int:
        with httpx.Client(timeout=30) as http:
            codes = []
            for _ in range(10):
                codes.append(http.post(f"{base}/interrupt").status_code)
                codes.append(http.post(f"{base}/skip").status_code)
                codes.append(http.get(f"{base}/progress").status_code)
            return max(codes)

    with ThreadPoolExecutor(6) as pool:
        assert set(pool.map(storm, range(6))) == {200}
    for job in jobs:
        job.join(60)
    assert all(r.status_code == 200 for r in results.values())
    # Interrupts hit only the job running at the time; the server still answers normally.
    answer = httpx.post(f"{base}/txt2img", json={"prompt": "after", "steps": 2, "width": 64, "height": 64,
                                                 "seed": 2}, timeout=60)
    assert answer.status_code == 200 and len(answer.json()["images"]) == 1


def test_client_disconnect_cancels_its_job(engine, live_server) -> None:
    server = live_server(create_app(SlowEngine(engine, delay=0.05)))
    base = server.url + "/sdapi/v1"
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{base}/txt2img", json={"prompt": "bye", "steps": 20, "n_iter": 10, "width": 64, "height": 64},
                   timeout=httpx.Timeout(60, read=0.5))
    deadline = time.monotonic() + 10
    while server.queue.current is not None:
        assert time.monotonic() < deadline, "the abandoned job kept running"
        time.sleep(0.05)
    (job_id,) = [j for j in server.queue._jobs]
    assert server.queue.get(job_id).state.value == "cancelled"
    answer = httpx.post(f"{base}/txt2img", json={"prompt": "next", "steps": 2, "width": 64, "height": 64},
                        timeout=60)
    assert answer.status_code == 200


def _rss_bytes() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def test_memory_stays_flat_under_repeated_load(engine, live_server) -> None:
    """After a warm-up, more rounds of concurrent requests do not grow the process (no leak per job)."""
    import gc

    server = live_server(create_app(engine, max_queue=64))
    base = server.url + "/sdapi/v1"

    def round_of(n: int) -> None:
        def send(i: int) -> int:
            payload = {"prompt": f"flat {i}", "seed": i, "steps": 2, "width": 64, "height": 64}
            if i % 2:
                payload = {**payload, "init_images": [b64(INIT)], "denoising_strength": 0.5}
            with httpx.Client(timeout=120) as http:
                return http.post(f"{base}/{'img2img' if i % 2 else 'txt2img'}", json=payload).status_code

        with ThreadPoolExecutor(8) as pool:
            assert set(pool.map(send, range(n))) == {200}

    round_of(16)  # warm-up: allocator pools, caches, lazily imported code
    gc.collect()
    before = _rss_bytes()
    for _ in range(3):
        round_of(16)
    gc.collect()
    growth = _rss_bytes() - before
    assert growth < 64 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB over 48 jobs"
    assert server.queue.status()["waiting"] == [] and server.queue.current is None
