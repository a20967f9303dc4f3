"""`POST /sdapi/v1/options {"leansd_backend": ...}`: the compute backend over HTTP, 400 where it cannot run."""

from __future__ import annotations

import sys

import httpx

from tests.helpers import tiny_bundle


def test_backend_option_switches_and_refuses_with_400(live_server, monkeypatch) -> None:
    from leansd.engine.engine import Engine
    from leansd.frontends.http import create_app

    engine = Engine(tiny_bundle(), device="cpu", precision="full", prompt_cache=False, backend="torch")
    server = live_server(create_app(engine, ui=False))
    url = f"{server.url}/sdapi/v1/options"
    assert httpx.get(url).json()["leansd_backend"] == "torch"

    bad = httpx.post(url, json={"leansd_backend": "onnx", "sd_vae": "None"})
    assert bad.status_code == 400 and "unknown backend 'onnx'; valid: auto, torch, openvino" in bad.text
    assert httpx.get(url).json()["sd_vae"] == "Automatic"  # nothing of the refused body was applied

    monkeypatch.setitem(sys.modules, "openvino", None)  # as if the package were not installed
    missing = httpx.post(url, json={"leansd_backend": "openvino"})
    assert missing.status_code == 400 and "pip install leansd[openvino]" in missing.text
    assert engine.backend.name == "torch"

    monkeypatch.delitem(sys.modules, "openvino")
    assert httpx.post(url, json={"leansd_backend": "openvino"}).status_code == 200
    assert engine.backend.name == "openvino" and httpx.get(url).json()["leansd_backend"] == "openvino"
