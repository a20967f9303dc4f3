"""AUTOMATIC1111 "parameters" text (infotext), so tools that read A1111 images read ours.

Layout (the last line always holds the settings)::

    a red fox, snow
    Negative prompt: blurry
    Steps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 123, Size: 512x512, Model hash: abcdef1234, Model: v1-5

The format cannot tell a prompt line that starts with "Negative prompt:" from the real
negative-prompt line; A1111 has the same limit, and so do we.
"""

from __future__ import annotations

import json
import numbers
import re
from collections.abc import Mapping

from leansd.errors import InvalidRequestError

__all__ = ["build_infotext", "parse_infotext"]

NEGATIVE_PREFIX = "Negative prompt:"

# A settings key: a word character then words, spaces, '-' or '/' (A1111's grammar).
_KEY = r"\w[\w \-/]+"
# One "Key: value" entry of the settings line; a value is a JSON string or runs to the next comma.
_ENTRY = re.compile(
    rf"""\s*(?P<key>{_KEY}):\s*
         (?P<value>"(?:\\.|[^\\"])+"   # quoted: JSON string with escapes
                  |[^,]*)               # plain: anything up to the next comma
         (?:,|$)""",
    re.VERBOSE,
)
_KEY_ONLY = re.compile(_KEY)
# Fewer entries than this on the last line means it is still prompt text (as A1111 decides).
_MIN_SETTINGS = 3
_RESERVED_KEYS = ("Prompt", "Negative prompt")


def _format_value(value: object) -> str:
    """A1111's number style: 7 -> "7", 7.0 -> "7", 7.5 -> "7.5"; other values as str()."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        number = float(value)
        return str(int(number)) if number.is_integer() else repr(number)
    return str(value)


def _quote(text: str) -> str:
    """JSON-quote a value the plain grammar would cut short or change, as A1111 does.

    A1111 quotes on ',', ':' and newlines; we also quote '"', empty values and values with
    surrounding spaces so that every value reads back unchanged. A1111 reads all of them.
    """
    needs_quotes = (
        text == ""
        or text != text.strip()
        or any(ch in text for ch in ',:"\n\r')
    )
    return json.dumps(text, ensure_ascii=False) if needs_quotes else text


def _unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        try:
            return json.loads(text)
        except ValueError:
            return text
    return text


def _check_key(key: str, taken: set[str]) -> None:
    if not isinstance(key, str) or not _KEY_ONLY.fullmatch(key) or key != key.rstrip():
        raise InvalidRequestError(
            f"infotext key {key!r} is not valid: use letters, digits, '_', spaces, '-' or '/', "
            "starting with a letter or digit, at least 2 characters"
        )
    if key in taken or key in _RESERVED_KEYS:
        raise InvalidRequestError(f"infotext key {key!r} is given twice or is reserved")


def build_infotext(
    *,
    prompt: str,
    negative_prompt: str,
    steps: int,
    sampler: str,
    cfg_scale: float,
    seed: int,
    width: int,
    height: int,
    model_hash: str | None,
    model_name: str | None,
    extra: Mapping[str, object] | None = None,
) -> str:
    """A1111's infotext for one image; `extra` entries follow the standard ones in order.

    Entries whose value is None are left out (as A1111 does for Model hash/Model). The
    whole text is stripped of surrounding whitespace, as A1111 does.
    """
    settings: dict[str, object] = {
        "Steps": steps,
        "Sampler": sampler,
        "CFG scale": cfg_scale,
        "Seed": seed,
        "Size": f"{width}x{height}",
        "Model hash": model_hash,
        "Model": model_name,
    }
    for key, value in (extra or {}).items():
        _check_key(key, set(settings))
        settings[key] = value
    settings_line = ", ".join(
        f"{key}: {_quote(_format_value(value))}"
        for key, value in settings.items()
        if value is not None
    )
    negative_line = f"\n{NEGATIVE_PREFIX} {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative_line}\n{settings_line}".strip()


def parse_infotext(text: str) -> dict[str, str]:
    """Split an infotext into {"Prompt", "Negative prompt", "Steps", ...}; values stay strings.

    Multi-line prompts are kept line for line; quoted values are unquoted; a text without
    a negative prompt gives "Negative prompt": "". "Size" stays "WxH".
    """
    *lines, last = text.strip().split("\n")
    entries = _ENTRY.findall(last)
    if len(entries) < _MIN_SETTINGS:
        lines.append(last)
        entries = []

    prompt_lines: list[str] = []
    negative_lines: list[str] | None = None
    for line in lines:
        if negative_lines is None and line.startswith(NEGATIVE_PREFIX):
            first = line[len(NEGATIVE_PREFIX):]
            negative_lines = [first[1:] if first.startswith(" ") else first]
        elif negative_lines is not None:
            negative_lines.append(line)
        else:
            prompt_lines.append(line)

    result = {
        "Prompt": "\n".join(prompt_lines),
        "Negative prompt": "\n".join(negative_lines or []),
    }
    for key, value in entries:
        result[key] = _unquote(value)
    return result
