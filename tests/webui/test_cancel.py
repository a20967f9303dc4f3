"""Cancel in the page stops that session's job (and only that one); progress text has step and ETA."""

from __future__ import annotations

import pytest

from leansd.request import GenerationRequest
from leansd.service.queue import JobQueue
from tests.service.conftest import SlowEngine


def test_cancel_stops_the_sessions_job(engine) -> None:
    import gradio as gr

    from leansd.frontends.http import DEFAULT_MAX_IMAGES, Limits
    from leansd.frontends.webui import _Runner

    limits = Limits(max_size=512, max_steps=150, max_images=DEFAULT_MAX_IMAGES)
    request = GenerationRequest("a fox", width=64, height=64, num_inference_steps=40, seed=1).validated()
    with JobQueue(SlowEngine(engine, delay=0.05)) as queue:
        runner = _Runner(queue, model_name="tiny", limits=limits, save_dir=None)
        updates = runner.run(request, task="txt2img", session="alice")
        texts = []
        while not texts or not texts[-1].startswith("Step "):
            texts.append(next(updates)[-1])
        assert "ETA" in texts[-1]
        assert runner.cancel("bob") == "nothing to cancel"
        assert runner.cancel("alice") == "cancelling..."
        with pytest.raises(gr.Error, match="cancelled"):
            for _ in updates:
                pass
        assert runner.cancel("alice") == "nothing to cancel"
