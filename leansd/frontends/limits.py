"""A server's defaults: where it listens and what a request may ask for.

Standard library only, so `leansd --help` shows them without importing the server; the HTTP API,
the web UI and the CLI's `serve` flags all read them from here.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
DEFAULT_MAX_SIZE = 2048
DEFAULT_MAX_STEPS = 150
DEFAULT_MAX_IMAGES = 16
DEFAULT_SHUTDOWN_SECONDS = 30.0
"""How long a running job may finish once the server is asked to stop."""
DEFAULT_MAX_BODY = 100 * 2**20
"""Request bodies above this get 413 before they are read: room for a few 4K PNGs in base64."""
DEFAULT_MAX_JOB_SECONDS = 3600.0
"""Jobs estimated to run longer on the server's device are refused up front."""


@dataclass(frozen=True, kw_only=True)
class Limits:
    """What one server allows a request to ask for (on top of the library's own ranges)."""

    max_size: int = DEFAULT_MAX_SIZE
    max_steps: int = DEFAULT_MAX_STEPS
    max_images: int = DEFAULT_MAX_IMAGES
