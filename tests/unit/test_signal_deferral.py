"""A termination signal never lands between creating an image's temp file and publishing or removing it.

Each scenario runs in a fresh Python process (`python -m tests.unit.test_signal_deferral NAME`): a
signal is process-wide state, and in the full suite's process delivering SIGUSR1 killed the test
process with SIGSEGV, which a fresh process of this file alone never did. There, by this point, the
main thread's alternate signal stack (which Python's handlers run on) was still registered but no
longer mapped, after what earlier tests had loaded (Ray's driver, OpenVINO, servers). The scenario
prints what it saw; the test asserts on it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


class Stop(BaseException):
    pass


def send_usr1() -> None:
    signal.pthread_kill(threading.main_thread().ident, signal.SIGUSR1)


def inside_block() -> dict:
    from leansd.outputs.writer import signals_deferred

    done, raised = [], False
    try:
        with signals_deferred():
            send_usr1()
            for _ in range(1000):  # the handler has run (and recorded the signal) by now
                pass
            with signals_deferred():  # nested: still deferred to the outermost end
                done.append("inner")
            done.append("outer")
    except Stop:
        raised = True
    with signals_deferred():  # the pending signal was consumed: a later block ends normally
        done.append("later")
    return {"done": done, "raised": raised}


def outside_block() -> dict:
    try:
        send_usr1()
        for _ in range(1000):  # the handler runs between bytecodes, well before this ends
            pass
    except Stop:
        return {"raised": True}
    return {"raised": False}


def save_image(folder: str) -> dict:
    from PIL import Image

    from leansd.outputs import writer

    real_encode = writer._encode

    def encode_then_signal(*args, **kwargs):  # the signal arrives mid-write
        send_usr1()
        return real_encode(*args, **kwargs)

    writer._encode = encode_then_signal
    raised = False
    try:
        writer.save_image(Image.new("RGB", (16, 16), (10, 20, 30)), Path(folder) / "a.png", infotext="x")
    except Stop:
        raised = True
    finally:
        writer._encode = real_encode
    with Image.open(Path(folder) / "a.png") as image:
        pixel = list(image.getpixel((3, 3)))
    return {"raised": raised, "files": sorted(os.listdir(folder)), "pixel": pixel}


SCENARIOS = {"inside_block": inside_block, "outside_block": outside_block, "save_image": save_image}


def run(name: str, *args: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "tests.unit.test_signal_deferral", name, *args], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_signal_inside_the_block_is_raised_when_the_block_ends() -> None:
    assert run("inside_block") == {"done": ["inner", "outer", "later"], "raised": True}


def test_a_signal_outside_any_block_raises_at_once() -> None:
    assert run("outside_block") == {"raised": True}


def test_save_image_under_a_signal_publishes_the_whole_file_and_no_temp(tmp_path) -> None:
    assert run("save_image", str(tmp_path)) == {"raised": True, "files": ["a.png"], "pixel": [10, 20, 30]}


if __name__ == "__main__":
    from leansd.outputs.writer import deferrable

    signal.signal(signal.SIGUSR1, deferrable(Stop))
    print(json.dumps(SCENARIOS[sys.argv[1]](*sys.argv[2:])))
