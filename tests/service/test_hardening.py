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
    prompts.write_text("".join(f"prompt {k}\n" for k in range(40)))
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
