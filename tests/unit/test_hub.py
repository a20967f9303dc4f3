"""Hub ids, tokens and fast offline behaviour. Only the hub itself is mocked; nothing uses the network."""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

import httpx2
import huggingface_hub
import pytest
from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

from leansd.errors import ModelLoadError, OfflineError
from leansd.models import hub
from leansd.models.hub import download_diffusers_model, hf_token, is_hub_id, parse_dotenv

REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)  # no stray .env from the checkout


# --- is_hub_id --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("runwayml/stable-diffusion-v1-5", True),
        ("CompVis/stable-diffusion-v1-4", True),
        ("stabilityai/sd-turbo", True),
        ("user_name/model.v2", True),
        ("a/b", True),
        ("stable-diffusion-v1-5", False),  # no owner
        ("a/b/c", False),
        ("/abs/path/model", False),
        ("./models/x", False),
        ("models/v1-5-pruned.safetensors", False),
        ("models/sd-v1-4.ckpt", False),
        ("models/model.CKPT", False),
        ("owner/model.pt", False),
        ("owner/name.bin", False),
        ("owner/-name", False),
        ("owner/name-", False),
        ("owner/na--me", False),
        ("owner/na..me", False),
        ("owner/na me", False),
        ("C:/models/x", False),
        ("https://huggingface.co/a/b", False),
        ("", False),
        ("o/" + "x" * 95, False),
    ],
)
def test_is_hub_id(spec: str, expected: bool) -> None:
    assert is_hub_id(spec) is expected


def test_existing_local_path_is_not_a_hub_id(tmp_path: Path) -> None:
    (tmp_path / "models" / "mymodel").mkdir(parents=True)
    assert is_hub_id("models/mymodel") is False
    assert is_hub_id("models/othermodel") is True


# --- tokens -----------------------------------------------------------------------------------


def test_hf_token_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("HF_TOKEN=from-dotenv\n")
    assert hf_token(cwd=tmp_path) == "from-dotenv"
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", "legacy-env")
    assert hf_token(cwd=tmp_path) == "legacy-env"
    monkeypatch.setenv("HF_TOKEN", "env")
    assert hf_token(cwd=tmp_path) == "env"
    monkeypatch.setenv("HF_TOKEN", "  ")  # blank does not count
    assert hf_token(cwd=tmp_path) == "legacy-env"


def test_hf_token_none(tmp_path: Path) -> None:
    assert hf_token(cwd=tmp_path) is None
    (tmp_path / ".env").write_text("OTHER=1\nHF_TOKEN=\n")
    assert hf_token(cwd=tmp_path) is None


def test_hf_token_default_cwd(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("export HUGGING_FACE_HUB_TOKEN='hf_cwd'\n")
    assert hf_token() == "hf_cwd"


def test_dotenv_parsing(tmp_path: Path) -> None:
    text = "\n".join(
        [
            "# a comment",
            "",
            "PLAIN=value",
            'DOUBLE="quoted value # not a comment"',
            "SINGLE='single'",
            "export EXPORTED=yes",
            "INLINE=abc # trailing comment",
            "HASH_IN_VALUE=abc#def",
            "  SPACED  =  spaced  ",
            "EMPTY=",
            "NO_EQUALS_LINE",
            "URL=https://example.com/?a=b",
        ]
    )
    assert parse_dotenv(text) == {
        "PLAIN": "value",
        "DOUBLE": "quoted value # not a comment",
        "SINGLE": "single",
        "EXPORTED": "yes",
        "INLINE": "abc",
        "HASH_IN_VALUE": "abc#def",
        "SPACED": "spaced",
        "EMPTY": "",
        "URL": "https://example.com/?a=b",
    }
    (tmp_path / ".env").write_text('# token\nexport HF_TOKEN="hf_abc" # mine\n')
    assert hf_token(cwd=tmp_path) == "hf_abc"


# --- download: offline paths ------------------------------------------------------------------


def _fail(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("must not be called")


def test_offline_env_with_empty_cache_fails_fast(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "_probe_endpoint", _fail)
    start = time.monotonic()
    with pytest.raises(OfflineError) as exc_info:
        download_diffusers_model(REPO, cache_dir=str(tmp_path / "hf-cache"))
    assert time.monotonic() - start < 5
    message = str(exc_info.value)
    assert "\n" not in message
    assert message.startswith(f"{REPO} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1")
    assert "local .safetensors/.ckpt or diffusers folder" in message


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_endpoint_with_empty_cache_fails_fast(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # A real probe against a closed local port: connection refused, no network involved.
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", _fail)
    start = time.monotonic()
    with pytest.raises(OfflineError) as exc_info:
        download_diffusers_model(REPO, cache_dir=str(tmp_path / "hf-cache"), probe_timeout=3.0)
    assert time.monotonic() - start < 5
    message = str(exc_info.value)
    assert "\n" not in message
    assert REPO in message and "cannot be reached" in message and endpoint in message


def test_probe_failure_uses_the_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(hub, "_probe_endpoint", lambda endpoint, *, timeout: False)
    cached = _diffusers_folder(tmp_path / "cached")
    calls: list[dict[str, Any]] = []

    def fake_snapshot_download(**kwargs: Any) -> str:
        calls.append(kwargs)
        return str(cached)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert download_diffusers_model(REPO) == cached
    assert calls[0]["local_files_only"] is True


def test_probe_is_bounded_by_its_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    class SlowSession:
        def head(self, *args: Any, **kwargs: Any) -> None:
            time.sleep(10)

    monkeypatch.setattr(huggingface_hub.utils, "get_session", lambda: SlowSession())
    start = time.monotonic()
    assert hub._probe_endpoint("https://hub.invalid", timeout=0.2) is False
    assert time.monotonic() - start < 2


# --- download: online paths (hub mocked) ------------------------------------------------------


def _diffusers_folder(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "model_index.json").write_text("{}")
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        (root / part).mkdir()
    return root


REPO_FILES = [
    "model_index.json",
    "scheduler/scheduler_config.json",
    "tokenizer/vocab.json",
    "tokenizer/merges.txt",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "text_encoder/model.fp16.safetensors",
    "text_encoder/pytorch_model.bin",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "unet/diffusion_pytorch_model.non_ema.safetensors",
    "unet/diffusion_pytorch_model.bin",
    "vae/config.json",
    "vae/diffusion_pytorch_model.bin",  # an older repo: this part has no safetensors
    "vae/diffusion_pytorch_model.fp16.bin",
    "safety_checker/model.safetensors",
    "v1-5-pruned.ckpt",
]


@pytest.fixture
def online(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, Any]:
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(hub, "_probe_endpoint", lambda endpoint, *, timeout: True)
    state: dict[str, Any] = {"folder": _diffusers_folder(tmp_path / "snapshot"), "calls": [], "error": None}

    def fake_list(self: Any, repo_id: str, **kwargs: Any) -> list[str]:
        state["list_token"] = kwargs.get("token")
        return list(REPO_FILES)

    def fake_snapshot_download(**kwargs: Any) -> str:
        state["calls"].append(kwargs)
        if state["error"] is not None:
            raise state["error"]
        return str(state["folder"])

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", fake_list)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    return state


def _selected(call: dict[str, Any]) -> set[str]:
    from huggingface_hub.utils import filter_repo_objects

    return set(
        filter_repo_objects(REPO_FILES, allow_patterns=call["allow_patterns"], ignore_patterns=call["ignore_patterns"])
    )


def test_download_passes_token_from_dotenv_and_patterns(online: dict[str, Any], tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("HF_TOKEN=hf_from_dotenv\n")
    folder = download_diffusers_model(REPO, revision="main", cache_dir=str(tmp_path / "c"))
    assert folder == online["folder"]
    (call,) = online["calls"]
    assert call["repo_id"] == REPO
    assert call["token"] == "hf_from_dotenv"
    assert online["list_token"] == "hf_from_dotenv"
    assert call["revision"] == "main" and call["cache_dir"] == str(tmp_path / "c")
    assert call.get("local_files_only", False) is False
    assert _selected(call) == {
        "model_index.json",
        "scheduler/scheduler_config.json",
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.bin",
    }


def test_explicit_token_wins(online: dict[str, Any], tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("HF_TOKEN=hf_from_dotenv\n")
    download_diffusers_model(REPO, token="hf_explicit")
    assert online["calls"][0]["token"] == "hf_explicit"


def test_repo_without_model_index(online: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", lambda self, repo_id, **kw: ["model.safetensors"])
    with pytest.raises(ModelLoadError, match="no model_index.json"):
        download_diffusers_model("someone/single-file-model")
    assert online["calls"] == []


def test_incomplete_download_is_reported(online: dict[str, Any], tmp_path: Path) -> None:
    online["folder"] = tmp_path / "partial"
    online["folder"].mkdir()
    (online["folder"] / "model_index.json").write_text("{}")
    with pytest.raises(ModelLoadError) as exc_info:
        download_diffusers_model(REPO)
    assert "lacks unet, vae, text_encoder, tokenizer, scheduler" in str(exc_info.value)


def _http_error(status: int, cls: type[HfHubHTTPError] = HfHubHTTPError) -> HfHubHTTPError:
    request = httpx2.Request("GET", f"https://huggingface.co/api/models/{REPO}")
    response = httpx2.Response(status, request=request)
    return cls(f"{status} Client Error\nmore details on a second line", response=response)


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (_http_error(401), "HTTP 401"),
        (_http_error(403), "HTTP 403"),
        (_http_error(401, GatedRepoError), "is gated"),
        (_http_error(404, RepositoryNotFoundError), "not found on the hub"),
    ],
)
def test_access_errors_mention_token_and_licence(online: dict[str, Any], error: Exception, expected: str) -> None:
    online["error"] = error
    with pytest.raises(ModelLoadError) as exc_info:
        download_diffusers_model(REPO)
    message = str(exc_info.value)
    assert "\n" not in message
    assert expected in message
    assert "HF_TOKEN" in message and ".env" in message and "licence" in message
    assert f"huggingface.co/{REPO}" in message


def test_listing_access_error_is_mapped(online: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    def denied(self: Any, repo_id: str, **kwargs: Any) -> list[str]:
        raise _http_error(401)

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", denied)
    with pytest.raises(ModelLoadError, match="HF_TOKEN"):
        download_diffusers_model(REPO)


def test_server_error_is_one_line(online: dict[str, Any]) -> None:
    online["error"] = _http_error(500)
    with pytest.raises(ModelLoadError) as exc_info:
        download_diffusers_model(REPO)
    assert "\n" not in str(exc_info.value) and "download failed" in str(exc_info.value)


def test_connection_lost_after_probe(online: dict[str, Any]) -> None:
    from huggingface_hub.errors import LocalEntryNotFoundError

    online["error"] = LocalEntryNotFoundError("Cannot find ...\nsecond line")
    with pytest.raises(OfflineError) as exc_info:
        download_diffusers_model(REPO)
    assert "\n" not in str(exc_info.value)


def test_transport_error_is_one_line(online: dict[str, Any]) -> None:
    online["error"] = httpx2.ConnectError("connection reset\nby peer")
    with pytest.raises(ModelLoadError) as exc_info:
        download_diffusers_model(REPO)
    assert str(exc_info.value) == f"{REPO}: download failed (connection reset)"
