"""GenerationRequest.prediction_type: validated names, and the engine reloading its checkpoint with it."""

from __future__ import annotations

import numpy as np
import pytest

from leansd import Engine, GenerationRequest
from leansd.errors import InvalidRequestError


@pytest.mark.parametrize(("given", "kept"), [(None, None), ("v", "v_prediction"), ("V-Prediction", "v_prediction"),
                                             ("eps", "epsilon"), ("Automatic", "auto"), ("auto", "auto")])
def test_names(given, kept):
    assert GenerationRequest("x", prediction_type=given).validated().prediction_type == kept


@pytest.mark.parametrize("bad", ["sample", "", 1])
def test_bad_values_are_one_line(bad):
    with pytest.raises(InvalidRequestError) as info:
        GenerationRequest("x", prediction_type=bad).validated()
    assert "prediction_type" in str(info.value) and "auto, epsilon, v_prediction" in str(info.value)


def test_the_engine_reloads_with_the_choice(tmp_path):
    from leansd.models.tiny import write_tiny_single_file

    path = write_tiny_single_file(tmp_path / "m.safetensors")
    engine = Engine.load(str(path), device="cpu", precision="full", prompt_cache=False)
    assert engine.prediction_choice == "auto" and engine.bundle.prediction_type == "epsilon"
    base = dict(num_inference_steps=2, sampler="Euler", seed=3, width=64, height=64)
    forced = engine.generate(GenerationRequest("a fox", prediction_type="v", **base), progress_bar=False)
    assert engine.prediction_choice == "v_prediction" and engine.bundle.prediction_type == "v_prediction"
    assert "Prediction type: v_prediction" in forced.infotexts[0]
    reference = Engine.load(str(path), device="cpu", precision="full", prompt_cache=False,
                            prediction_type="v_prediction")
    assert reference.prediction_choice == "v_prediction"
    np.testing.assert_array_equal(forced.pixels, reference.generate(GenerationRequest("a fox", **base),
                                                                    progress_bar=False).pixels)
    kept = engine.generate(GenerationRequest("a fox", **base), progress_bar=False)  # None: stays as it is
    np.testing.assert_array_equal(kept.pixels, forced.pixels)
    assert engine.switch_model(None, prediction_type="v_prediction") is False  # nothing to do
    auto = engine.generate(GenerationRequest("a fox", prediction_type="auto", **base), progress_bar=False)
    assert engine.bundle.prediction_type == "epsilon" and "Prediction type" not in auto.infotexts[0]
    assert np.abs(auto.pixels - forced.pixels).max() > 1e-3
