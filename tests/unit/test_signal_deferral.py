"""A termination signal never lands between creating an image's temp file and publishing or removing it."""

from __future__ import annotations

import os
import signal
import threading

import pytest

from leansd.outputs.writer import deferrable, signals_deferred


class Stop(BaseException):
    pass


def send_usr1() -> None:
    """SIGUSR1 to the main thread only. `os.kill` lets the kernel pick any thread of the process, and
    earlier tests leave foreign threads running in it (a Ray driver, OpenVINO's workers); a signal
    handled on one of those crashed the test process once."""
    signal.pthread_kill(threading.main_thread().ident, signal.SIGUSR1)


@pytest.fixture
def usr1_raises_stop():
    previous = signal.signal(signal.SIGUSR1, deferrable(Stop))
    try:
        yield
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_a_signal_inside_the_block_is_raised_when_the_block_ends(usr1_raises_stop) -> None:
    done = []
    with pytest.raises(Stop):
        with signals_deferred():
            send_usr1()
            with signals_deferred():  # nested: still deferred to the outermost end
                done.append("inner")
            done.append("outer")
    assert done == ["inner", "outer"]
    with signals_deferred():  # the pending signal was consumed: a later block ends normally
        done.append("later")
    assert done[-1] == "later"


def test_a_signal_outside_any_block_raises_at_once(usr1_raises_stop) -> None:
    with pytest.raises(Stop):
        send_usr1()
        for _ in range(1000):  # the handler runs between bytecodes, well before this ends
            pass
        pytest.fail("the handler did not raise")


def test_save_image_under_a_signal_publishes_the_whole_file_and_no_temp(usr1_raises_stop, tmp_path) -> None:
    from PIL import Image

    from leansd.outputs import writer

    real_encode = writer._encode

    def encode_then_signal(*args, **kwargs):  # the signal arrives mid-write
        send_usr1()
        return real_encode(*args, **kwargs)

    writer._encode = encode_then_signal
    try:
        with pytest.raises(Stop):
            writer.save_image(Image.new("RGB", (16, 16), (10, 20, 30)), tmp_path / "a.png", infotext="x")
    finally:
        writer._encode = real_encode
    assert os.listdir(tmp_path) == ["a.png"]
    with Image.open(tmp_path / "a.png") as image:
        assert image.getpixel((3, 3)) == (10, 20, 30)
