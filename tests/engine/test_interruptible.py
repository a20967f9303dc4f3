"""In-step checks: the chunked attention that lets a job stop inside one attention call gives the same output."""

from __future__ import annotations

import torch

from leansd.engine.attention import InterruptibleAttnProcessor
from leansd.engine.estimate import unet_inputs
from tests.helpers import tiny_bundle


def test_chunked_interruptible_attention_matches_the_plain_one() -> None:
    unet = tiny_bundle().unet.eval()
    inputs = unet_inputs(unet.config, 2, 8, 8, device="cpu")
    torch.manual_seed(0)
    inputs["sample"] = torch.randn_like(inputs["sample"])
    inputs["encoder_hidden_states"] = torch.randn_like(inputs["encoder_hidden_states"])
    with torch.inference_mode():
        plain = unet(**inputs)[0]
    calls = []
    originals = {}
    for name, module in unet.named_modules():
        if hasattr(module, "set_processor") and getattr(module, "processor", None) is not None:
            originals[name] = module.processor
            # max_scores=4: every attention here (64 queries) runs in query chunks of 1..4 rows
            module.processor = InterruptibleAttnProcessor(module.processor, lambda: calls.append(1), max_scores=4)
    with torch.inference_mode():
        chunked = unet(**inputs)[0]
    assert len(calls) > 4 * len(originals)  # checks ran between chunks, not only once per call
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-6)


def test_a_raising_check_stops_inside_the_attention() -> None:
    unet = tiny_bundle().unet.eval()
    inputs = unet_inputs(unet.config, 1, 8, 8, device="cpu")
    seen = []

    class Stop(Exception):
        pass

    def check() -> None:
        seen.append(1)
        if len(seen) == 3:
            raise Stop()

    for module in unet.modules():
        if hasattr(module, "set_processor") and getattr(module, "processor", None) is not None:
            module.processor = InterruptibleAttnProcessor(module.processor, check, max_scores=4)
    try:
        with torch.inference_mode():
            unet(**inputs)
    except Stop:
        pass
    else:
        raise AssertionError("the check's exception did not stop the forward")
    assert len(seen) == 3
