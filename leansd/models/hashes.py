"""AUTOMATIC1111's short hashes for LoRAs, embeddings and VAEs (infotext ``Lora hashes``, ``TI hashes``...).

- LoRA (A1111 ``extensions-builtin/Lora/network.py``): the file's ``sshs_model_hash`` metadata when
  present, else for a ``.safetensors`` the "addnet" hash (kohya's: sha256 of the bytes after the
  8-byte length and the JSON header), for other files the sha256 of the whole file; the first
  12 hex digits. Metadata that is not a hex string is ignored (it would reach HTML and infotexts).
- Embeddings (``TI hashes``) and VAEs (``VAE hash``): sha256 of the whole file, 12 hex digits
  (VAE: 10, as A1111's ``sd_vae`` short hash).

Hashes are memoised per process by (path, size, mtime), so a file is read once until it changes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from pathlib import Path

_BLOCK = 1 << 20
_HEX = re.compile(r"^[0-9a-fA-F]{12,64}$")
_memo: dict[tuple[str, str, int, int], str] = {}


def _key(kind: str, path: Path) -> tuple[str, str, int, int]:
    st = path.stat()
    return (kind, str(path.resolve()), st.st_size, st.st_mtime_ns)


def _sha256(path: Path, *, offset: int = 0) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        while chunk := f.read(_BLOCK):
            h.update(chunk)
    return h.hexdigest()


def safetensors_header(path: str | os.PathLike[str]) -> tuple[int, dict]:
    """(header length, header JSON) of a ``.safetensors`` file; ValueError if it is not one."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError("too short for a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > 100 * 2**20:
            raise ValueError("safetensors header larger than 100 MiB")
        raw = f.read(n)
    if len(raw) != n:
        raise ValueError("truncated safetensors header")
    header = json.loads(raw)
    if not isinstance(header, dict):
        raise ValueError("safetensors header is not an object")
    return n, header


def addnet_hash(path: str | os.PathLike[str]) -> str:
    """kohya's "addnet" hash of a ``.safetensors`` file: sha256 of everything after the header."""
    p = Path(path)
    key = _key("addnet", p)
    if key not in _memo:
        n, _ = safetensors_header(p)
        _memo[key] = _sha256(p, offset=8 + n)
    return _memo[key]


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of the whole file (memoised)."""
    p = Path(path)
    key = _key("sha256", p)
    if key not in _memo:
        _memo[key] = _sha256(p)
    return _memo[key]


def addnet_short_hash(path: str | os.PathLike[str]) -> str:
    """A1111's LoRA short hash (12 hex digits); see the module docstring."""
    p = Path(path)
    if p.suffix.lower() == ".safetensors":
        try:
            _, header = safetensors_header(p)
        except ValueError:
            header = {}
        stored = (header.get("__metadata__") or {}).get("sshs_model_hash")
        if isinstance(stored, str) and _HEX.match(stored):
            return stored[:12].lower()
        return addnet_hash(p)[:12]
    return file_sha256(p)[:12]


def embedding_short_hash(path: str | os.PathLike[str]) -> str:
    """A1111's ``TI hashes`` value: sha256 of the embedding file, 12 hex digits."""
    return file_sha256(path)[:12]


def vae_short_hash(path: str | os.PathLike[str]) -> str:
    """A1111's ``VAE hash``: sha256 of the VAE file, 10 hex digits."""
    return file_sha256(path)[:10]
