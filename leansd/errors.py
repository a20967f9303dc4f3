"""User-facing errors. Each carries a one-line message a front end can show as is."""

from __future__ import annotations


class LeansdError(Exception):
    """Base class: a problem the user can fix; the message is one clear line."""


class InvalidRequestError(LeansdError, ValueError):
    """A request value is out of range or unknown; the message names the valid options."""


class ModelLoadError(LeansdError):
    """A checkpoint, folder or hub id could not be read as a Stable Diffusion model."""


class UnsafeCheckpointError(ModelLoadError):
    """A .ckpt would need a full (code-executing) unpickle; refused."""


class UnsupportedModelError(ModelLoadError):
    """The model was recognised but its family is not supported (yet)."""


class OfflineError(ModelLoadError):
    """A hub id was given but the model hub cannot be reached and nothing is cached."""


class NonFiniteError(LeansdError):
    """The models produced NaN or infinite values: the job fails rather than return a black image."""


class OutputError(LeansdError):
    """Images could not be written (unwritable folder, disk full, ...)."""


def is_out_of_memory(exc: BaseException) -> bool:
    """True for a device out-of-memory error (torch's `OutOfMemoryError`, without importing torch)."""
    return type(exc).__name__ == "OutOfMemoryError"


def one_line(message: object, *, limit: int | None = None) -> str:
    """Collapse any message (or exception) to one line, optionally shortened to `limit` characters."""
    text = " ".join(str(message).split())
    if isinstance(message, BaseException) and not text:
        text = type(message).__name__
    if limit is not None and len(text) > limit:
        text = text[: limit - 3] + "..."
    return text


MAX_ECHO = 80
"""Characters of a user's value that an error message repeats (a 100 KB value is not sent back whole)."""


def brief(value: object, *, limit: int = MAX_ECHO) -> str:
    """`repr(value)` shortened to `limit` characters, for echoing a bad value in an error message."""
    text = repr(value)
    if len(text) > limit:
        text = f"{text[: limit - 3]}... ({len(text)} characters)"
    return text
