"""Ray Serve replicas keep the server's checkpoint and VAE: a per-request switch is a clear error."""

from __future__ import annotations

import pytest

from leansd.errors import InvalidRequestError
from leansd.request import GenerationRequest
from leansd.service.ray_serve import RemoteEngine

INFO = {"name": "tiny", "default_size": 64, "vae_scale_factor": 8, "embeddings": {"width": 32, "encoder": "te", "also": ()}}


@pytest.mark.parametrize("change", [{"checkpoint": "other"}, {"vae": "None"}, {"prediction_type": "v_prediction"}])
def test_a_per_request_checkpoint_or_vae_is_refused(change: dict) -> None:
    engine = RemoteEngine(handle=None, board=None, info=INFO, replicas=2)
    with pytest.raises(InvalidRequestError, match="restart with --model/--vae/--prediction-type"):
        engine.generate(GenerationRequest(prompt="x", **change))
    assert not engine.ran_on  # nothing reached a replica
