"""Reading a text file the user named (a prompt file, a job file): one line for every way it can fail."""

from __future__ import annotations

from pathlib import Path

from leansd.errors import InvalidRequestError, one_line


def read_text_file(path: Path, *, label: str) -> str:
    """The UTF-8 text of `path`; a missing file, a folder or an unreadable file is an InvalidRequestError
    whose one-line message starts with `label` and the path. A Windows byte-order mark is not data."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise InvalidRequestError(f"{label} {path}: no such file") from None
    except IsADirectoryError:
        raise InvalidRequestError(f"{label} {path}: is a folder, expected a text file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidRequestError(f"{label} {path}: cannot read it ({one_line(exc, limit=160)})") from None
