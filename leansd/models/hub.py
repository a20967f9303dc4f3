"""Hugging Face hub ids: recognise them, find a token, download what SD 1.x needs, fail fast offline.

huggingface_hub on its own retries every file with back-off for minutes when the hub is
unreachable; here `HF_HUB_OFFLINE=1` goes straight to the cache, and otherwise one short probe
of the endpoint decides between downloading and the cache, so an offline run fails in seconds
with one line.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from leansd.errors import ModelLoadError, OfflineError, one_line

logger = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "https://huggingface.co"
TOKEN_ENV_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")

# Hugging Face repo id rules (huggingface_hub.utils.validate_repo_id): word characters, '-' and
# '.', starting and ending with a word character, no '--' or '..', at most 96 characters.
_REPO_PART = r"\w(?:[\w.-]*\w)?"
_REPO_ID_RE = re.compile(rf"{_REPO_PART}/{_REPO_PART}", re.ASCII)
_REPO_ID_MAX_LEN = 96
_FILE_SUFFIXES = (
    ".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".onnx", ".gguf", ".json", ".yaml", ".yml"
)

# What an SD 1.x diffusers pipeline needs: configs, tokenizer and the three models' weights
# as safetensors. The safety checker, feature extractor, Flax/ONNX/TF weights are not fetched.
SD_ALLOW_PATTERNS = (
    "model_index.json",
    "scheduler/*.json",
    "tokenizer/*",
    "text_encoder/*.json",
    "text_encoder/*.safetensors",
    "unet/*.json",
    "unet/*.safetensors",
    "vae/*.json",
    "vae/*.safetensors",
)
# Variants (fp16, non_ema, ...) have a second dot in the file name: `model.fp16.safetensors`.
SD_IGNORE_PATTERNS = ("*/*.*.safetensors", "*/*.*.bin")
_WEIGHT_FOLDERS = ("text_encoder", "unet", "vae")
_REQUIRED_PARTS = ("model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler")

_TRUE_VALUES = {"1", "ON", "YES", "TRUE"}
_HTTP_CLIENT_MODULES = {"httpx", "httpx2", "httpcore", "httpcore2", "requests", "urllib3"}


def is_hub_id(spec: str) -> bool:
    """True for an `owner/name` Hugging Face repo id that is not an existing local path or a file name."""
    if not spec or len(spec) > _REPO_ID_MAX_LEN or "--" in spec or ".." in spec:
        return False
    if not _REPO_ID_RE.fullmatch(spec):
        return False
    if spec.lower().endswith(_FILE_SUFFIXES):
        return False
    return not os.path.exists(spec)


def hf_token(*, cwd: Path | None = None) -> str | None:
    """The hub token: $HF_TOKEN, then $HUGGING_FACE_HUB_TOKEN, then the same keys in `<cwd>/.env`.

    None means "not given here": huggingface_hub then uses its own stored login, if any.
    """
    for var in TOKEN_ENV_VARS:
        value = os.environ.get(var, "").strip()
        if value:
            return value
    env_file = (cwd if cwd is not None else Path.cwd()) / ".env"
    try:
        text = env_file.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        logger.debug("ignoring unreadable %s: %s", env_file, exc)
        return None
    values = parse_dotenv(text)
    for var in TOKEN_ENV_VARS:
        value = values.get(var, "").strip()
        if value:
            return value
    return None


def parse_dotenv(text: str) -> dict[str, str]:
    """Parse simple `.env` text: KEY=VALUE lines, `#` comments, optional `export `, quoted values."""
    values: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export ") :].lstrip()
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not key:
            continue
        value = value.strip()
        if value[:1] in ("'", '"'):
            quote = value[0]
            end = value.find(quote, 1)
            value = value[1:end] if end != -1 else value[1:]
        else:
            # An unquoted value ends at an inline comment (" #").
            value = re.split(r"\s+#", value, maxsplit=1)[0].strip()
        values[key] = value
    return values


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as set now (huggingface_hub reads it once, at import)."""
    value = os.environ.get("HF_HUB_OFFLINE")
    if value is not None:
        return value.strip().upper() in _TRUE_VALUES
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def hub_endpoint() -> str:
    """$HF_ENDPOINT as set now, else huggingface_hub's endpoint."""
    value = os.environ.get("HF_ENDPOINT", "").strip()
    if value:
        return value.rstrip("/")
    from huggingface_hub import constants

    return str(constants.ENDPOINT or DEFAULT_ENDPOINT).rstrip("/")


def download_diffusers_model(
    repo_id: str,
    *,
    token: str | None = None,
    revision: str | None = None,
    cache_dir: str | None = None,
    probe_timeout: float = 3.0,
) -> Path:
    """Return a local diffusers folder for `repo_id`, downloading only what SD 1.x needs.

    The token defaults to `hf_token()`. Offline (HF_HUB_OFFLINE=1, or the endpoint does not
    answer within `probe_timeout` seconds) only the local cache is used; if the model is not
    there, `OfflineError` is raised at once. Gated, private and missing repos raise
    `ModelLoadError` saying how to get access.
    """
    if token is None:
        token = hf_token()
    common: dict[str, Any] = dict(repo_id=repo_id, revision=revision, cache_dir=cache_dir, token=token)

    if hub_offline():
        return _from_cache(
            common,
            why="HF_HUB_OFFLINE=1",
            hint="download it once online or pass a local .safetensors/.ckpt or diffusers folder",
        )
    endpoint = hub_endpoint()
    if not _probe_endpoint(endpoint, timeout=probe_timeout):
        logger.info("%s did not answer within %.1f s: using the local cache", endpoint, probe_timeout)
        return _from_cache(
            common,
            why=f"the hub ({endpoint}) cannot be reached",
            hint="check the network, or pass a local .safetensors/.ckpt or diffusers folder",
        )

    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    with _hub_errors(repo_id, revision):
        allow = _allow_patterns(repo_id, revision=revision, token=token)
        try:
            folder = snapshot_download(
                **common,
                allow_patterns=list(allow),
                ignore_patterns=list(SD_IGNORE_PATTERNS),
                endpoint=endpoint,
            )
        except LocalEntryNotFoundError as exc:
            # The connection failed after the probe and nothing usable is cached.
            raise OfflineError(
                f"{repo_id} could not be downloaded (the connection to {endpoint} failed) and is not in"
                " the local Hugging Face cache; check the network, or pass a local file or folder"
            ) from exc
    return _checked_folder(repo_id, Path(folder))


def _probe_endpoint(endpoint: str, *, timeout: float) -> bool:
    """True if the endpoint answers an HTTP HEAD within `timeout` seconds (any status below 500).

    It runs in a daemon thread so that a slow DNS lookup (not covered by socket timeouts)
    cannot hold the caller past `timeout`.
    """
    result: list[bool] = []

    def probe() -> None:
        try:
            from huggingface_hub.utils import get_session

            response = get_session().head(endpoint, timeout=timeout, follow_redirects=False)
            result.append(response.status_code < 500)
        except Exception as exc:  # any failure to get an answer means "unreachable"
            logger.debug("probe of %s failed: %s", endpoint, exc)
            result.append(False)

    thread = threading.Thread(target=probe, name="leansd-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(result and result[0])


def _from_cache(common: dict[str, Any], *, why: str, hint: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import IncompleteSnapshotError, LocalEntryNotFoundError

    repo_id = common["repo_id"]
    try:
        folder = snapshot_download(
            **common,
            allow_patterns=list(SD_ALLOW_PATTERNS),
            ignore_patterns=list(SD_IGNORE_PATTERNS),
            local_files_only=True,
        )
    except IncompleteSnapshotError as exc:
        raise OfflineError(f"{repo_id}: the cached copy is incomplete and {why}; {hint}") from exc
    except LocalEntryNotFoundError as exc:
        raise OfflineError(f"{repo_id} is not in the local Hugging Face cache and {why}; {hint}") from exc
    logger.info("%s: using the cached copy at %s (%s)", repo_id, folder, why)
    return _checked_folder(repo_id, Path(folder))


def _allow_patterns(repo_id: str, *, revision: str | None, token: str | None) -> tuple[str, ...]:
    """SD_ALLOW_PATTERNS, plus `*.bin` weights for a model part that has no safetensors in the repo."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    try:
        files = HfApi(endpoint=hub_endpoint()).list_repo_files(repo_id, revision=revision, token=token)
    except (HfHubHTTPError, ValueError):
        raise  # access and id errors: _hub_errors explains them
    except Exception as exc:  # listing is an optimisation: download with the fixed patterns
        logger.debug("could not list %s (%s): using the default patterns", repo_id, exc)
        return SD_ALLOW_PATTERNS
    if "model_index.json" not in files:
        raise ModelLoadError(
            f"{repo_id} is not a diffusers model (it has no model_index.json);"
            " pass a diffusers repo, or download its .safetensors/.ckpt file and pass that"
        )
    extra: list[str] = []
    for part in _WEIGHT_FOLDERS:
        names = [f.split("/", 1)[1] for f in files if f.startswith(part + "/") and f.count("/") == 1]
        plain = [n for n in names if n.count(".") == 1]  # no variant infix
        if not any(n.endswith(".safetensors") for n in plain) and any(n.endswith(".bin") for n in plain):
            logger.info("%s: %s has no safetensors weights; fetching its .bin", repo_id, part)
            extra.append(f"{part}/*.bin")
    return SD_ALLOW_PATTERNS + tuple(extra)


def _checked_folder(repo_id: str, folder: Path) -> Path:
    missing = [name for name in _REQUIRED_PARTS if not (folder / name).exists()]
    if missing:
        raise ModelLoadError(
            f"{repo_id}: the downloaded folder {folder} lacks {', '.join(missing)};"
            " it is not a complete Stable Diffusion diffusers model"
        )
    return folder


@contextmanager
def _hub_errors(repo_id: str, revision: str | None) -> Iterator[None]:
    """Turn huggingface_hub's access and transfer errors into one-line ModelLoadErrors that say what to do."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    access = (
        "set HF_TOKEN (in the environment or a .env file) to a token of an account that has"
        f" accepted the licence on the model page {hub_endpoint()}/{repo_id}"
    )
    try:
        yield
    except GatedRepoError as exc:
        raise ModelLoadError(f"{repo_id} is gated: {access}") from exc
    except RepositoryNotFoundError as exc:
        raise ModelLoadError(
            f"{repo_id} was not found on the hub, or it is private or gated: check the id; for a"
            f" private or gated model {access}"
        ) from exc
    except RevisionNotFoundError as exc:
        raise ModelLoadError(f"{repo_id} has no revision {revision!r}") from exc
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status in (401, 403):
            raise ModelLoadError(f"{repo_id}: access denied (HTTP {status}); {access}") from exc
        raise ModelLoadError(f"{repo_id}: download failed ({_first_line(exc)})") from exc
    except HFValidationError as exc:
        raise ModelLoadError(f"{repo_id}: not a valid hub id or revision ({_first_line(exc)})") from exc
    except ModelLoadError:
        raise
    except OSError as exc:
        raise ModelLoadError(f"{repo_id}: download failed ({_first_line(exc)})") from exc
    except Exception as exc:
        # The HTTP client's own transport errors (httpx, requests) are not OSErrors.
        if type(exc).__module__.split(".")[0] not in _HTTP_CLIENT_MODULES:
            raise
        raise ModelLoadError(f"{repo_id}: download failed ({_first_line(exc)})") from exc


def _first_line(exc: BaseException) -> str:
    return one_line((str(exc).strip() or type(exc).__name__).splitlines()[0], limit=160)
