"""The web UI sits behind the API's guard: Basic auth on / and on Gradio's own routes."""

from __future__ import annotations

import httpx

from leansd.frontends.http import create_app


def test_ui_needs_credentials_when_auth_is_set(engine, live_server) -> None:
    server = live_server(create_app(engine, auth="alice:s3cret"))
    with httpx.Client(base_url=server.url, timeout=30) as http:
        for path in ("/", "/config", "/gradio_api/info", "/theme.css"):
            for auth in (None, ("alice", "wrong")):
                answer = http.get(path, auth=auth)
                assert answer.status_code == 401, (path, auth)
        answer = http.post("/gradio_api/call/txt2img", json={"data": ["x"]})
        assert answer.status_code == 401
        page = http.get("/", auth=("alice", "s3cret"))
        assert page.status_code == 200 and "<html" in page.text.lower()


def test_ui_is_served_at_root_and_api_keeps_its_routes(engine, live_server) -> None:
    server = live_server(create_app(engine))
    with httpx.Client(base_url=server.url, timeout=30) as http:
        page = http.get("/")
        assert page.status_code == 200
        assert "fonts.googleapis" not in page.text
        assert http.get("/sdapi/v1/samplers").status_code == 200
        answer = http.post("/gradio_api/call/txt2img", json={"data": []}, headers={"Origin": "http://evil.example"})
        assert answer.status_code == 403


def test_ui_can_be_left_out(engine, live_server) -> None:
    server = live_server(create_app(engine, ui=False))
    with httpx.Client(base_url=server.url, timeout=30) as http:
        assert http.get("/").status_code == 404
        assert http.get("/sdapi/v1/samplers").status_code == 200
