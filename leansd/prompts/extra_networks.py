"""AUTOMATIC1111's extra-network tags in prompts: ``<lora:NAME:MULT>``, ``<lyco:...>``, ``<lora:NAME:TE:UNET>``.

As A1111 (``modules/extra_networks.py``): every ``<word:args>`` tag is taken out of the positive
prompt before it is parsed and encoded (replaced by nothing, so surrounding spaces stay); the
negative prompt is not searched, so tags there stay text. ``args`` are split on ``:``;
``name=value`` arguments are named. For a LoRA the positional arguments are the name, the
text-encoder multiplier (default 1) and the UNet multiplier (default: the text-encoder one);
``te=``, ``unet=`` name them, ``dyn=`` (dynamic rank) is accepted and ignored.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass

from leansd.errors import InvalidRequestError

logger = logging.getLogger(__name__)

EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")
LORA_TYPES = ("lora", "lyco")


@dataclass(frozen=True)
class NetworkTag:
    """One ``<kind:args>`` tag of a prompt."""

    kind: str
    args: tuple[str, ...]


@dataclass(frozen=True)
class LoraTag:
    """A LoRA asked for by a prompt: its name and multipliers."""

    name: str
    te: float
    unet: float


def extract_networks(prompt: str) -> tuple[str, list[NetworkTag]]:
    """(prompt without its tags, the tags in order)."""
    tags: list[NetworkTag] = []

    def found(match: "re.Match[str]") -> str:
        tags.append(NetworkTag(match.group(1), tuple(match.group(2).split(":"))))
        return ""

    return EXTRA_NETWORK.sub(found, prompt), tags


def strip_networks(prompt: str) -> str:
    """The prompt as it is encoded: every extra-network tag removed."""
    return EXTRA_NETWORK.sub("", prompt)


def _multiplier(text: str, tag: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise InvalidRequestError(f"{tag}: {text!r} is not a multiplier (a number such as 0.8)")
    return value


def lora_tags(prompt: str) -> list[LoraTag]:
    """The LoRAs of a positive prompt (``<lora:...>`` and ``<lyco:...>``); other kinds are logged and skipped.

    Raises InvalidRequestError for a tag without a name or with a multiplier that is not a number.
    """
    _, tags = extract_networks(prompt)
    out: list[LoraTag] = []
    for tag in tags:
        text = f"<{tag.kind}:{':'.join(tag.args)}>"
        if tag.kind not in LORA_TYPES:
            logger.warning("extra network %s is not supported; the tag is removed from the prompt", text)
            continue
        positional = [a for a in tag.args if "=" not in a]
        named = dict(a.split("=", 1) for a in tag.args if "=" in a)
        unknown = sorted(set(named) - {"te", "unet", "dyn"})
        if unknown:
            raise InvalidRequestError(f"{text}: unknown argument {unknown[0]!r}; valid: te=, unet=, dyn=")
        if not positional or not positional[0].strip():
            raise InvalidRequestError(f"{text}: the LoRA has no name; write <lora:NAME:MULTIPLIER>")
        name = positional[0].strip()
        te = _multiplier(named.get("te", positional[1] if len(positional) > 1 else "1"), text)
        unet = _multiplier(named.get("unet", positional[2] if len(positional) > 2 else str(te)), text)
        out.append(LoraTag(name, te, unet))
    return out
