"""Security: auth on every route, --listen needs --api-auth, no cross-origin POSTs, saving stays in outputs."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from leansd.frontends.http import create_app
from leansd.outputs.infotext import parse_infotext
from leansd.outputs.writer import read_infotext

SMALL = {"prompt": "a fox", "steps": 2, "width": 64, "height": 64, "seed": 5}


def test_auth_on_every_route(engine, live_server) -> None:
    server = live_server(create_app(engine, auth="alice:s3cret"))
    routes = sorted({(method, route.path) for route in server.app.routes for method in getattr(route, "methods", ())
                     if method != "HEAD"})
    assert len(routes) > 20
    import webuiapi

    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port, username="alice", password="s3cret")
    assert api.get_sd_models()[0]["model_name"] == "tiny"
    with httpx.Client(base_url=server.url, timeout=30) as http:
        assert http.get("/sdapi/v1/options", auth=("alice", "s3cret")).status_code == 200
        answer = http.post("/sdapi/v1/txt2img", json=SMALL, auth=("alice", "s3cret"))
        assert answer.status_code == 200
        for method, path in routes:
            url = path.replace("{job_id}", "abc")
            for auth in (None, ("alice", "wrong"), ("mallory", "s3cret")):
                answer = http.request(method, url, json=SMALL if method == "POST" else None, auth=auth)
                # Wrong passwords: 401, or 429 once the client must back off after repeated failures.
                assert answer.status_code in ((401,) if auth is None else (401, 429)), (method, path, auth)
                if answer.status_code == 401:
                    assert answer.headers["WWW-Authenticate"].startswith("Basic")
                else:
                    assert int(answer.headers["Retry-After"]) >= 1
        assert http.get("/sdapi/v1/options", headers={"Authorization": "Basic !!!"}).status_code in (401, 429)


def test_cross_origin_posts_are_refused(server) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as http:
        for origin in ("http://evil.example", "null", "http://127.0.0.1:1"):
            for path in ("/sdapi/v1/txt2img", "/sdapi/v1/interrupt", "/sdapi/v1/options"):
                answer = http.post(path, json=SMALL, headers={"Origin": origin})
                assert answer.status_code == 403, (origin, path)
                assert "cross-origin" in answer.json()["detail"]
        assert http.post("/sdapi/v1/txt2img", json=SMALL, headers={"Origin": server.url}).status_code == 200
        assert http.get("/sdapi/v1/options", headers={"Origin": "http://evil.example"}).status_code == 200
    assert server.queue.completed == 1  # none of the refused requests reached the queue


def test_save_images_stays_in_outputs(engine, live_server, tmp_path: Path) -> None:
    outputs = tmp_path / "outputs"
    server = live_server(create_app(engine, save_dir=outputs))
    escape = {"outpath_samples": str(tmp_path / "escaped"), "outpath_grids": "../grids",
              "save_images": True, "sd_model_checkpoint": "../../x"}
    answer = httpx.post(f"{server.url}/sdapi/v1/txt2img", json={**SMALL, **escape, "batch_size": 2}, timeout=60)
    assert answer.status_code == 200
    saved = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    assert [p.relative_to(outputs).as_posix() for p in saved] == [
        "txt2img-images/seed_5_00000.png", "txt2img-images/seed_6_00001.png"]
    assert parse_infotext(read_infotext(saved[0]))["Seed"] == "5"


def test_save_images_without_flag_is_refused(server) -> None:
    answer = httpx.post(f"{server.url}/sdapi/v1/txt2img", json={**SMALL, "save_images": True}, timeout=30)
    assert answer.status_code == 400 and "--save-images" in answer.json()["detail"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "leansd.frontends.cli", *args], capture_output=True, text=True,
                          env=env, timeout=120)


@pytest.mark.parametrize("args", [
    ["--listen"],
    ["--host", "0.0.0.0"],
    ["--listen", "--api-auth", "nopassword"],
    ["--port", "70000"],
])
def test_serve_refuses_unsafe_or_bad_flags(args) -> None:
    out = run_cli("serve", "--model", "tiny", *args)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("leansd: error:"), out.stderr
    if "--api-auth" not in args and "--port" not in args:
        assert "--api-auth" in lines[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_subprocess_smoke_and_sigterm(tmp_path: Path) -> None:
    import webuiapi

    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "leansd.frontends.cli", "serve", "--model", "tiny", "--device", "cpu",
         "--port", str(port), "--save-images", "--outdir", str(tmp_path / "out")],
        stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/sdapi/v1/options", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "server did not start"
            time.sleep(0.2)
        api = webuiapi.WebUIApi(host="127.0.0.1", port=port)
        result = api.txt2img(prompt="a fox", seed=21, steps=2, width=64, height=64)
        assert result.info["seed"] == 21
        assert (tmp_path / "out" / "txt2img-images" / "seed_21_00000.png").is_file()
        # SIGTERM with one job running and one waiting: the waiting one is answered 503 at once,
        # the running one finishes, and the process exits 0.
        from concurrent.futures import ThreadPoolExecutor

        long = {"prompt": "long", "steps": 10, "n_iter": 8, "width": 64, "height": 64, "seed": 1}
        with ThreadPoolExecutor(2) as pool:
            running = pool.submit(httpx.post, f"http://127.0.0.1:{port}/sdapi/v1/txt2img", json=long, timeout=60)
            while httpx.get(f"http://127.0.0.1:{port}/sdapi/v1/progress").json()["state"]["job_count"] < 1:
                time.sleep(0.05)
            waiting = pool.submit(httpx.post, f"http://127.0.0.1:{port}/sdapi/v1/txt2img", json=long, timeout=60)
            while httpx.get(f"http://127.0.0.1:{port}/sdapi/v1/progress").json()["state"]["job_count"] < 2:
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            assert waiting.result().status_code == 503
            assert "shutting down" in waiting.result().json()["detail"]
            assert running.result().status_code == 200
            assert len(running.result().json()["images"]) == 8
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = proc.stderr.read()
    assert "serving tiny on http://127.0.0.1" in stderr and "Traceback" not in stderr
