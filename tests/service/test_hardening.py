"""Regression tests for the hardening review (issue "Hardening"): each case reproduces a failure it found."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "leansd.frontends.cli", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


# ---- 4. --host is resolved, not matched as text ------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1.invalid", "127.evil.invalid", "localhost.invalid"])
def test_serve_host_that_only_looks_loopback_is_refused(host: str) -> None:
    out = run_cli("serve", "--model", "tiny", "--host", host)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert lines == [lines[0]] and lines[0].startswith(f"leansd: error: --host {host}: cannot resolve"), out.stderr


def test_loopback_check_resolves_addresses() -> None:
    from leansd.frontends.cli import is_loopback_host

    assert is_loopback_host("127.0.0.1") and is_loopback_host("127.3.4.5") and is_loopback_host("::1")
    assert is_loopback_host("[::1]") and is_loopback_host("localhost")
    assert not is_loopback_host("0.0.0.0") and not is_loopback_host("::") and not is_loopback_host("192.168.1.2")


# ---- 10. SIGTERM during a --from-file run leaves no hidden temp file -----------------------------


def test_sigterm_while_an_image_is_written_leaves_no_temp_file(tmp_path) -> None:
    import signal
    import time

    from PIL import Image

    prompts = tmp_path / "prompts.txt"
    # Many prompts: the run is killed at the first write seen, so a busy machine only makes the window longer.
    prompts.write_text("".join(f"prompt {k}\n" for k in range(400)))
    outdir = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "leansd.frontends.cli", "txt2img", "--model", "tiny", "--from-file", str(prompts),
         "--W", "256", "--H", "256", "--steps", "1", "--seed", "1", "--skip_grid", "--outdir", str(outdir)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        deadline = time.monotonic() + 120
        caught = False
        while time.monotonic() < deadline and proc.poll() is None:
            names = os.listdir(outdir) if outdir.is_dir() else []
            if any(name.startswith(".seed_") and name.endswith(".tmp") for name in names):
                proc.send_signal(signal.SIGTERM)  # while the image is being encoded and written
                caught = True
                break
            time.sleep(0.001)
        assert caught, "never saw an image being written"
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143
    assert stderr.strip().splitlines()[-1].startswith("leansd: terminated (SIGTERM)")
    assert "Traceback" not in stderr
    left = os.listdir(outdir)
    assert not [name for name in left if name.startswith(".")], left
    for name in left:  # whatever was published is a whole PNG
        with Image.open(outdir / name) as image:
            image.load()


# ---- 9. the CLI proves its output folder writable before the model loads -------------------------


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's read-only /proc")
def test_cli_refuses_an_unwritable_outdir_before_loading(tmp_path) -> None:
    # /proc passes os.access(W_OK) for root, yet no file can be created there.
    out = run_cli("txt2img", "--model", str(tmp_path / "missing.safetensors"), "--prompt", "x",
                  "--outdir", "/proc/leansd-hardening-out")
    assert out.returncode == 2
    assert out.stderr.strip().startswith("leansd: error: cannot create output folder /proc/leansd-hardening-out")
    assert len(out.stderr.strip().splitlines()) == 1  # the missing model was never looked at


# ---- 5. a job stops within a step; jobs too long for the device are refused up front -------------

BIG = dict(prompt="a slow fox", width=1024, height=1024, num_inference_steps=2, seed=3)
"""On the tiny model, one 1024x1024 step takes tens of seconds on a CPU (attention over 16384 tokens)."""


def _start_big_job(queue):
    import time

    from leansd.request import GenerationRequest

    job = queue.submit(GenerationRequest(**BIG).validated())
    deadline = time.monotonic() + 60
    while job.state.value != "running" and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(2.0)  # well inside the first step
    assert job.state.value == "running" and job.progress.step == 0
    return job


@pytest.mark.parametrize("action", ["cancel", "interrupt", "skip", "shutdown"])
def test_running_job_stops_within_a_step(engine, action: str) -> None:
    import time

    from leansd.service import JobCancelledError, JobQueue

    queue = JobQueue(engine).start()
    try:
        job = _start_big_job(queue)
        t0 = time.monotonic()
        if action == "cancel":
            assert queue.cancel(job.id)
        elif action == "interrupt":
            assert queue.interrupt()
        elif action == "skip":
            assert queue.skip()
        else:
            assert queue.shutdown(timeout=0.0)
        if action in ("cancel", "shutdown"):
            with pytest.raises(JobCancelledError):
                job.wait(30)
            assert job.state.value == "cancelled"
        else:  # interrupt and skip (of the only batch) end the job with no image
            result = job.wait(30)
            assert job.state.value == "done" and result.images == [] and result.info["interrupted"]
        elapsed = time.monotonic() - t0
        assert elapsed < 8, f"{action} took {elapsed:.1f} s"
        assert job.progress.step == 0  # it never finished the step it was in
    finally:
        queue.shutdown(timeout=0.0)


def test_interruptible_engine_leaves_results_unchanged(engine) -> None:
    from leansd.request import GenerationRequest

    request = GenerationRequest(prompt="a fox", width=64, height=64, num_inference_steps=3, seed=4)
    plain = engine.generate(request, progress_bar=False)
    with engine.interruptible(lambda: None):
        checked = engine.generate(request, progress_bar=False)
    assert (plain.pixels == checked.pixels).all()


def test_job_estimated_beyond_max_job_seconds_is_refused_up_front(engine) -> None:
    import time

    from leansd.request import GenerationRequest
    from leansd.service import JobQueue, JobTooLongError

    queue = JobQueue(engine, max_job_seconds=20).start()
    try:
        deadline = time.monotonic() + 60
        while engine.speed.flops_per_second is None and time.monotonic() < deadline:
            time.sleep(0.05)  # the worker measures the speed first
        huge = GenerationRequest(prompt="x", width=2048, height=2048, num_inference_steps=50, seed=1).validated()
        t0 = time.monotonic()
        with pytest.raises(JobTooLongError) as info:
            queue.submit(huge)
        assert time.monotonic() - t0 < 30
        message = str(info.value)
        assert message.startswith("this job would take about ") and "--max-job-seconds" in message
        assert "more than this server's limit of 20 s" in message
        assert queue.status()["waiting"] == [] and queue.current is None
        small = queue.submit(GenerationRequest(prompt="x", width=64, height=64, num_inference_steps=2, seed=1).validated())
        assert len(small.wait(60).images) == 1
    finally:
        queue.shutdown(timeout=0.0)


# ---- HTTP: a live server over the tiny engine -----------------------------------------------------

SMALL = {"prompt": "a fox", "steps": 2, "width": 64, "height": 64, "seed": 5}


def _b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode("ascii")


# ---- 1. DNS rebinding: a foreign Host gets 403 on every kind of route -----------------------------


def test_rebinding_host_is_refused_everywhere(server) -> None:
    import httpx

    port = server.port
    evil = {"Host": f"evil.example:{port}", "Origin": f"http://evil.example:{port}"}
    with httpx.Client(base_url=server.url, timeout=30) as http:
        calls = [
            ("POST", "/sdapi/v1/txt2img", SMALL),
            ("POST", "/sdapi/v1/interrupt", None),
            ("POST", "/sdapi/v1/options", {"samples_format": "jpg"}),
            ("GET", "/sdapi/v1/options", None),
            ("GET", "/", None),  # the web UI page
            ("GET", "/config", None),  # Gradio's config
            ("POST", "/gradio_api/queue/join", {"data": [], "fn_index": 0, "session_hash": "x"}),
        ]
        for method, path, body in calls:
            answer = http.request(method, path, json=body, headers=evil)
            assert answer.status_code == 403, (method, path, answer.status_code)
            assert answer.json() == {
                "error": "Forbidden",
                "detail": f"Host 'evil.example:{port}' is not a name this server answers to; "
                          "start it with --allowed-hosts NAME to allow it",
            }
        assert server.queue.completed == 0 and server.queue.current is None
        # The server's own names still work: IP, localhost, with their matching Origin.
        for host in (f"127.0.0.1:{port}", f"localhost:{port}"):
            answer = http.post("/sdapi/v1/options", json={"samples_format": "png"},
                               headers={"Host": host, "Origin": f"http://{host}"})
            assert answer.status_code == 200, host


def test_allowed_hosts_extend_the_names(engine, live_server) -> None:
    import httpx

    from leansd.frontends.http import create_app

    server = live_server(create_app(engine, allowed_hosts=["studio.lan", ".home.arpa"], ui=False))
    with httpx.Client(base_url=server.url, timeout=30) as http:
        for host, status in (("studio.lan", 200), ("pc.home.arpa", 200), ("home.arpa", 200), ("evil.lan", 403)):
            assert http.get("/sdapi/v1/options", headers={"Host": f"{host}:{server.port}"}).status_code == status


def _raw_status(port: int, head: bytes) -> int:
    """The status code the server answers to a hand-written request head (headers httpx would not send)."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head + b"Connection: close\r\n\r\n")
        answer = b""
        while b"\r\n" not in answer:
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
    return int(answer.split(b" ", 2)[1])


def test_host_header_variants(server) -> None:
    """Only one well-formed Host is checked and let through: a second Host header (which another parser
    might read), junk after the name, or none at all is refused; the server's own spellings pass."""
    port = server.port
    get = b"GET /sdapi/v1/options HTTP/1.1\r\n"
    for host, status in [
        (b"localhost.", 200), (b"LOCALHOST", 200), (b"[::1]", 200), (f"[::1]:{port}".encode(), 200),
        (f"127.0.0.1:{port + 1}".encode(), 200),  # an IP address: no rebinding page can send it
        (b"evil.example", 403), (b"evil.example.", 403), (b"127.0.0.1.evil.example", 403),
        (b"localhost:80@evil.example", 403), (b"[::1]evil.example", 403), (b"localhost:http", 403),
    ]:
        assert _raw_status(port, get + b"Host: " + host + b"\r\n") == status, host
    assert _raw_status(port, get + b"Host: evil.example\r\nHost: 127.0.0.1\r\n") == 403
    assert _raw_status(port, get + b"Host: 127.0.0.1\r\nHost: evil.example\r\n") == 403
    assert _raw_status(port, b"GET /sdapi/v1/options HTTP/1.0\r\n") == 403  # no Host at all
    assert server.queue.completed == 0


# ---- 2. an EPS upload is refused (no Ghostscript), the message shows no path ------------------------


def test_eps_upload_is_refused(server) -> None:
    import io

    import httpx
    from PIL import Image

    eps = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 10, 10)).save(eps, format="EPS")
    body = {**SMALL, "init_images": [_b64(eps.getvalue())]}
    answer = httpx.post(f"{server.url}/sdapi/v1/img2img", json=body, timeout=30)
    assert answer.status_code == 400
    assert answer.json()["detail"] == (
        "init_images[0]: is not an image in an accepted format (PNG, JPEG, WebP, BMP, TIFF, GIF (first frame))")
    info = httpx.post(f"{server.url}/sdapi/v1/png-info", json={"image": _b64(eps.getvalue())}, timeout=30)
    assert info.status_code == 400 and "accepted format" in info.json()["detail"]


# ---- 3. unbounded requests -------------------------------------------------------------------------


def test_huge_body_gets_413_before_it_is_read(server) -> None:
    import socket
    import time

    size = 250 * 2**20
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall((f"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
                      f"Content-Type: application/json\r\nContent-Length: {size}\r\n\r\n").encode())
        sock.sendall(b"{" + b" " * 65536)  # a start, far from the announced 250 MB
        t0 = time.monotonic()
        reply = sock.recv(65536).decode("latin-1")
        assert time.monotonic() - t0 < 10
    assert reply.startswith("HTTP/1.1 413")
    assert '"error":"PayloadTooLarge"' in reply and "limit of 100 MiB (--max-body)" in reply


def test_chunked_body_over_the_limit_gets_413(engine, live_server) -> None:
    import httpx

    from leansd.frontends.http import create_app

    server = live_server(create_app(engine, max_body=2**20, ui=False))

    def chunks():
        for _ in range(40):
            yield b" " * 65536

    answer = httpx.post(f"{server.url}/sdapi/v1/txt2img", content=chunks(), timeout=30,
                        headers={"Content-Type": "application/json"})
    assert answer.status_code == 413 and answer.json()["error"] == "PayloadTooLarge"
    # Under the limit, chunked bodies still work.
    import json

    answer = httpx.post(f"{server.url}/sdapi/v1/txt2img", content=iter([json.dumps(SMALL).encode()]), timeout=60,
                        headers={"Content-Type": "application/json"})
    assert answer.status_code == 200 and len(answer.json()["images"]) == 1


def test_options_keep_only_known_keys(server) -> None:
    import httpx

    with httpx.Client(base_url=server.url, timeout=30) as http:
        before = http.get("/sdapi/v1/options").json()
        junk = {f"junk_{k}": "x" * 5 * 2**20 for k in range(3)}
        answer = http.post("/sdapi/v1/options", json={**junk, "samples_format": "jpg"})
        assert answer.status_code == 200
        after = http.get("/sdapi/v1/options")
        assert len(after.content) < 10_000
        assert after.json() == {**before, "samples_format": "jpg"}
        too_long = http.post("/sdapi/v1/options", json={"sd_vae": "v" * 100_000})
        assert too_long.status_code == 400 and len(too_long.text) < 1500
        assert "(100002 characters)" in too_long.json()["detail"]


def test_options_refuse_deep_nesting_and_non_finite_numbers(server) -> None:
    """A body nested 100,000 deep was a 500 (RecursionError in the JSON parser); NaN/Infinity (which
    Python's JSON accepts) were stored and came back as null."""
    import httpx

    with httpx.Client(base_url=server.url, timeout=30) as http:
        before = http.get("/sdapi/v1/options").json()
        nested = http.post("/sdapi/v1/options", content=b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
                           headers={"Content-Type": "application/json"})
        assert nested.status_code == 400
        assert nested.json() == {"error": "InvalidRequestError", "detail": "the options body must be a JSON object"}
        for text in ("NaN", "Infinity", "-Infinity", "1e999"):
            answer = http.post("/sdapi/v1/options", content=f'{{"eta_ddim": {text}}}'.encode(),
                               headers={"Content-Type": "application/json"})
            assert answer.status_code == 400, text
            assert answer.json()["detail"].startswith("option eta_ddim must be a finite number"), answer.text
        assert http.get("/sdapi/v1/options").json() == before


def test_error_messages_do_not_echo_huge_values(server) -> None:
    import httpx

    answer = httpx.post(f"{server.url}/sdapi/v1/txt2img", json={**SMALL, "sampler_name": "s" * 100_000}, timeout=30)
    assert answer.status_code == 400
    assert len(answer.text) < 1500 and "(100002 characters)" in answer.json()["detail"]


# ---- 6. absurd CFG / eta are refused; NaN is an error, never a black 200 -------------------------


@pytest.mark.parametrize("field, value, words", [
    ("cfg_scale", 1e38, "scale (CFG) must be between 0 and 30"),
    ("cfg_scale", 1e308, "scale (CFG) must be between 0 and 30"),
    ("eta", 1e300, "ddim_eta must be between 0 and 1"),
])
def test_absurd_guidance_values_are_4xx(server, field: str, value: float, words: str) -> None:
    import httpx

    body = {**SMALL, field: value, "sampler_name": "DDIM"}
    answer = httpx.post(f"{server.url}/sdapi/v1/txt2img", json=body, timeout=30)
    assert answer.status_code == 400 and words in answer.json()["detail"]


def test_nan_weights_fail_the_job_with_json(live_server) -> None:
    import httpx
    import torch

    from leansd.engine.engine import Engine
    from leansd.frontends.http import create_app
    from tests.helpers import tiny_bundle

    bundle = tiny_bundle()
    with torch.no_grad():
        bundle.vae.decoder.conv_out.bias[0] = float("nan")  # a damaged checkpoint
    server = live_server(create_app(Engine(bundle, device="cpu", precision="full", prompt_cache=False), ui=False))
    answer = httpx.post(f"{server.url}/sdapi/v1/txt2img", json=SMALL, timeout=60)
    assert answer.status_code == 500
    assert answer.json() == {
        "error": "NonFiniteError",
        "detail": "the model produced NaN or infinite values in the decoded pixels (fp32); no image was made. "
                  "The weights may be damaged, or the settings too extreme for this model",
    }


# ---- 5. over HTTP: /interrupt and job DELETE stop a long step; too-long jobs are refused -----------


@pytest.mark.parametrize("how", ["interrupt", "delete"])
def test_http_stop_takes_effect_within_a_step(server, how: str) -> None:
    import time
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    body = {"prompt": "slow", "steps": 2, "width": 1024, "height": 1024, "seed": 1}
    with ThreadPoolExecutor(1) as pool, httpx.Client(base_url=server.url, timeout=120) as http:
        pending = pool.submit(http.post, "/sdapi/v1/txt2img", json=body)
        deadline = time.monotonic() + 60
        while server.queue.current is None and time.monotonic() < deadline:
            time.sleep(0.05)
        job = server.queue.current
        time.sleep(2.0)
        assert job.progress.step == 0
        t0 = time.monotonic()
        if how == "interrupt":
            assert http.post("/sdapi/v1/interrupt").status_code == 200
            answer = pending.result()
            assert answer.status_code == 200 and answer.json()["images"] == []
        else:
            assert http.delete(f"/leansd/v1/jobs/{job.id}").json() == {"cancelled": job.id}
            answer = pending.result()
            assert answer.status_code == 503 and answer.json()["error"] == "JobCancelledError"
        assert time.monotonic() - t0 < 8


def test_http_refuses_a_job_too_long_for_the_device(engine, live_server) -> None:
    import time

    import httpx

    from leansd.frontends.http import create_app

    server = live_server(create_app(engine, max_job_seconds=20, max_size=4096, ui=False))
    deadline = time.monotonic() + 60
    while engine.speed.flops_per_second is None and time.monotonic() < deadline:
        time.sleep(0.05)
    body = {"prompt": "x", "steps": 50, "width": 2048, "height": 2048}
    answer = httpx.post(f"{server.url}/sdapi/v1/txt2img", json=body, timeout=60)
    assert answer.status_code == 400 and answer.json()["error"] == "InvalidRequestError"
    assert "more than this server's limit of 20 s (--max-job-seconds)" in answer.json()["detail"]
    assert server.queue.status()["completed"] == 0


# ---- 9. saving fails: the images come back with a warning ------------------------------------------


def test_unwritable_outputs_return_the_images_with_a_warning(engine, live_server, tmp_path) -> None:
    import base64
    import io
    import shutil

    import httpx
    from PIL import Image

    from leansd.frontends.http import create_app

    outputs = tmp_path / "outputs"
    server = live_server(create_app(engine, save_dir=outputs, ui=False))
    first = httpx.post(f"{server.url}/sdapi/v1/txt2img", json=SMALL, timeout=60)
    assert first.status_code == 200 and "warning" not in first.json()
    folder = outputs / "txt2img-images"
    shutil.rmtree(folder)
    folder.write_text("not a folder any more")  # the output folder replaced by a file
    for send_images in (True, False):
        answer = httpx.post(f"{server.url}/sdapi/v1/txt2img", json={**SMALL, "send_images": send_images}, timeout=60)
        assert answer.status_code == 200
        data = answer.json()
        assert data["warning"].startswith("saving the images failed: ")
        assert "is not a folder" in data["warning"]
        assert str(tmp_path) not in data["warning"] and "<outputs>" in data["warning"]  # no server path shown
        image = Image.open(io.BytesIO(base64.b64decode(data["images"][0])))
        first_image = Image.open(io.BytesIO(base64.b64decode(first.json()["images"][0])))
        assert image.tobytes() == first_image.tobytes()  # the same seed: the computed image, not lost


# ---- 13. login back-off ----------------------------------------------------------------------------


def test_failed_logins_back_off(engine, live_server) -> None:
    import time

    import httpx

    from leansd.frontends.guard import FREE_LOGIN_FAILURES
    from leansd.frontends.http import create_app

    server = live_server(create_app(engine, auth="alice:s3cret", ui=False))
    with httpx.Client(base_url=server.url, timeout=30) as http:
        codes = [http.get("/sdapi/v1/options", auth=("alice", f"guess{k}")).status_code for k in range(20)]
        assert codes[:FREE_LOGIN_FAILURES] == [401] * FREE_LOGIN_FAILURES
        assert codes[FREE_LOGIN_FAILURES] == 401 and set(codes[FREE_LOGIN_FAILURES + 1:]) == {429}
        locked = http.get("/sdapi/v1/options", auth=("alice", "s3cret"))  # even the right one waits
        assert locked.status_code == 429 and locked.headers["Retry-After"] == "1"
        assert "too many failed logins" in locked.json()["detail"]
        time.sleep(1.1)
        assert http.get("/sdapi/v1/options", auth=("alice", "s3cret")).status_code == 200
        assert http.get("/sdapi/v1/options", auth=("alice", "again")).status_code == 401  # counter reset


# ---- 8. SIGTERM during a long step: waiting 503, running cancelled with JSON, exit 0 ----------------


def test_sigterm_during_a_long_step_exits_cleanly(tmp_path) -> None:
    import signal
    import socket
    import time
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "leansd.frontends.cli", "serve", "--model", "tiny", "--device", "cpu",
         "--port", str(port), "--shutdown-timeout", "1"],
        stderr=subprocess.PIPE, text=True, env=env,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(f"{url}/sdapi/v1/options", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "server did not start"
            time.sleep(0.2)
        long = {"prompt": "long", "steps": 2, "width": 1024, "height": 1024, "seed": 1}
        with ThreadPoolExecutor(2) as pool:
            running = pool.submit(httpx.post, f"{url}/sdapi/v1/txt2img", json=long, timeout=120)
            while httpx.get(f"{url}/sdapi/v1/progress").json()["state"]["job_count"] < 1:
                time.sleep(0.05)
            waiting = pool.submit(httpx.post, f"{url}/sdapi/v1/txt2img", json=long, timeout=120)
            while httpx.get(f"{url}/sdapi/v1/progress").json()["state"]["job_count"] < 2:
                time.sleep(0.05)
            time.sleep(1.0)  # inside the first long step
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            assert waiting.result().status_code == 503
            assert "shutting down" in waiting.result().json()["detail"]
            answer = running.result()
            assert answer.status_code == 503 and answer.json()["error"] == "JobCancelledError"
            assert "cancelled while running" in answer.json()["detail"]
        assert proc.wait(60) == 0
        assert time.monotonic() - t0 < 20
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = proc.stderr.read()
    assert "Traceback" not in stderr and "terminate called" not in stderr


def test_login_back_off_does_not_lock_out_the_owner(engine, live_server) -> None:
    """A guesser sharing the owner's address (loopback, a proxy) is held back; the owner's client that
    already logged in is not, and a client at another address is never affected."""
    import httpx

    from leansd.frontends.http import create_app

    server = live_server(create_app(engine, auth="alice:s3cret", ui=False))
    with httpx.Client(base_url=server.url, timeout=30) as owner, httpx.Client(base_url=server.url, timeout=30) as guesser:
        assert owner.get("/sdapi/v1/options", auth=("alice", "s3cret")).status_code == 200
        codes = [guesser.get("/sdapi/v1/options", auth=("alice", f"guess{k}")).status_code for k in range(12)]
        assert codes[-1] == 429
        # The owner's logged-in client keeps working, and its requests do not reset the guesser's count.
        for _ in range(3):
            assert owner.get("/sdapi/v1/options", auth=("alice", "s3cret")).status_code == 200
        assert guesser.get("/sdapi/v1/options", auth=("alice", "guess-more")).status_code == 429
        # A new login from the locked address waits like any other attempt (it could be a guess) ...
        assert guesser.get("/sdapi/v1/options", auth=("bob", "s3cret")).status_code == 429
    # ... but another client address is not held back by this one's failures.
    other = httpx.HTTPTransport(local_address="127.0.0.2")
    with httpx.Client(base_url=server.url, timeout=30, transport=other) as elsewhere:
        assert elsewhere.get("/sdapi/v1/options", auth=("alice", "wrong")).status_code == 401
        assert elsewhere.get("/sdapi/v1/options", auth=("alice", "s3cret")).status_code == 200


def test_a_finished_jobs_stop_check_never_reaches_a_later_job() -> None:
    """When the memory plan switches attention chunking between jobs (here 256 px chunked, 64 px not),
    the engine restored the attention processors it had saved while the first job's in-step check
    wrapped them: the second job ran the first job's check, and a cancelled first job stopped it."""
    from leansd.engine.attention import InterruptibleAttnProcessor
    from leansd.engine.engine import Engine
    from leansd.request import GenerationRequest, StopGeneration
    from tests.helpers import tiny_bundle

    engine = Engine(tiny_bundle(), device="cpu", precision="full", prompt_cache=False, vram="24M",
                    virtual_device=True, efficient_attention=False)
    assert engine.plan_for(width=256, height=256, batch=1, passes=2).attention_chunk is not None
    assert engine.plan_for(width=64, height=64, batch=1, passes=2).attention_chunk is None
    small = GenerationRequest(prompt="a red cube", width=64, height=64, num_inference_steps=2, seed=5)
    reference = engine.generate(small, progress_bar=False).images[0].tobytes()

    first_cancelled = False

    def first_check() -> None:
        if first_cancelled:
            raise StopGeneration()

    calls = 0

    def second_check() -> None:
        nonlocal calls
        calls += 1

    with engine.interruptible(first_check):
        engine.generate(GenerationRequest(prompt="a red cube", width=256, height=256, num_inference_steps=1, seed=5),
                        progress_bar=False)
    first_cancelled = True  # the first job is over (as if cancelled): its check now raises
    with engine.interruptible(second_check):
        result = engine.generate(small, progress_bar=False)
    assert calls > 0
    assert not getattr(result, "interrupted", False)
    assert result.images[0].tobytes() == reference
    leftovers = [p for p in engine.bundle.unet.attn_processors.values() if isinstance(p, InterruptibleAttnProcessor)]
    assert leftovers == []  # no wrapper (and no job's check) outlives its job


@pytest.mark.parametrize(("kind", "where"), [("txt2img", "decoder"), ("img2img", "decoder"), ("inpaint", "decoder"),
                                            ("hires", "decoder"), ("img2img", "encoder"), ("inpaint", "encoder"),
                                            ("hires", "encoder")])
def test_a_stop_inside_the_vae_ends_every_kind_of_job(engine, kind: str, where: str) -> None:
    """The in-step check also runs inside the VAE: a stop raised while an image is encoded (img2img,
    inpainting, the hires pass) or decoded ends the job interrupted with no image, never half-decoded."""
    from PIL import Image

    from leansd.request import GenerationRequest, StopGeneration

    init = Image.new("RGB", (64, 64), (120, 30, 200))
    extra = {"txt2img": {}, "img2img": {"init_image": init},
             "inpaint": {"init_image": init, "mask": Image.new("L", (64, 64), 255)}, "hires": {"hires_scale": 2.0}}[kind]
    stop = {"now": False}

    def check() -> None:
        if stop["now"]:
            raise StopGeneration()

    vae = engine.bundle.vae
    handle = getattr(vae, where).conv_in.register_forward_pre_hook(lambda module, args: stop.update(now=True))
    try:
        with engine.interruptible(check):
            result = engine.generate(GenerationRequest(prompt="x", width=64, height=64, num_inference_steps=2,
                                                       seed=1, **extra), progress_bar=False)
    finally:
        handle.remove()
    assert stop["now"] and result.images == [] and result.info["interrupted"] is True
