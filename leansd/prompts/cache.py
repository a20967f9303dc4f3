"""On-disk cache of encoded prompts, so a cached prompt never needs the text encoder.

An entry is the encoder output of one text (after chunking and emphasis), ``(1, 77 * k, D)``.
Its key (:func:`entry_key`) is the sha256 of

* the text encoder's fingerprint (:func:`text_encoder_fingerprint`: sha256 over its weights
  in a stable order, with names, dtypes and shapes; not the file name),
* the token ids and emphasis multipliers of every chunk (:class:`~leansd.prompts.encode.TokenChunks`),
* the format version and emphasis rule.

The ids and multipliers are exactly what the encoder sees, so they stand for the text, the
syntax and the chunking: ``(cat:1.2)`` under ``a1111`` and under ``plain`` give different
ids/multipliers and different keys; ``A  Cat`` and ``a cat`` clean to the same ids and share
an entry (their embeddings are identical).

Files: ``<directory>/<key>.safetensors`` (default directory ``user_cache_dir()/prompt-embeddings``,
i.e. ``$LEANSD_CACHE_DIR/prompt-embeddings`` or ``~/.cache/leansd/prompt-embeddings``), one tensor
``embedding`` plus metadata (format, key, sha256 of the tensor bytes, readable text). Writes
go to a unique temporary file in the same folder and are published with ``os.replace``, so a
reader sees a whole entry or none, and two processes writing one key both leave a valid
entry (the last rename wins). An entry that fails any check (header, key, shape, checksum)
is ignored, counted as corrupt, and rewritten by the next ``put``. A hit sets the file's
mtime (and atime) to now; after each write the least recently used entries are deleted
until the folder is within ``max_bytes`` (default 512 MiB). Cache I/O errors are logged and
never fail a generation.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import stat
import tempfile
import time
import weakref
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping

from leansd.prompts.encode import CHUNK_LENGTH

if TYPE_CHECKING:
    import torch

    from leansd.prompts.encode import TokenChunks

logger = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 512 * 1024 * 1024
CACHE_SUBDIR = "prompt-embeddings"
ENTRY_SUFFIX = ".safetensors"
FORMAT = "leansd-prompt-embedding"
FORMAT_VERSION = "1"
EMPHASIS_RULE = "a1111-original"
_STALE_TEMP_SECONDS = 3600
_RE_KEY = re.compile(r"[0-9a-f]{64}")

# Fingerprints memoised per module object; entries vanish with the module.
_FINGERPRINTS: "weakref.WeakKeyDictionary[object, str]" = weakref.WeakKeyDictionary()


@dataclass
class CacheStats:
    """Counts of cache events (per :class:`PromptCache`, or per job in a plan)."""

    hits: int = 0
    misses: int = 0
    written: int = 0
    evicted: int = 0
    corrupt: int = 0

    def __sub__(self, other: "CacheStats") -> "CacheStats":
        return CacheStats(**{f.name: getattr(self, f.name) - getattr(other, f.name) for f in fields(self)})

    def copy(self) -> "CacheStats":
        return CacheStats(**{f.name: getattr(self, f.name) for f in fields(self)})

    def __str__(self) -> str:
        text = f"{self.hits} hit(s), {self.misses} miss(es), {self.written} written, {self.evicted} evicted"
        return text + (f", {self.corrupt} corrupt ignored" if self.corrupt else "")


def fingerprint_tensors(tensors: Mapping[str, "torch.Tensor"]) -> str:
    """sha256 hex over named tensors in sorted-name order (name, dtype, shape, then the raw bytes)."""
    import torch

    digest = hashlib.sha256(b"leansd-text-encoder-fingerprint-v1\0")
    for name in sorted(tensors):
        t = tensors[name].detach()
        header = json.dumps([name, str(t.dtype), list(t.shape)]).encode()
        digest.update(len(header).to_bytes(8, "little") + header)
        data = t.to("cpu").contiguous().reshape(-1).view(torch.uint8)  # raw bytes, any dtype
        digest.update(data.numpy())  # type: ignore[arg-type]  # numpy's stubs declare __buffer__ only for Python >= 3.12
    return digest.hexdigest()


def text_encoder_fingerprint(text_encoder: "torch.nn.Module") -> str:
    """The encoder's weight fingerprint, computed once per module object (memoised weakly).

    Reads the weights (a CPU copy of each tensor) but never calls the module or moves it.
    A caller that changes the weights in place (e.g. fusing a LoRA) must use a new module
    or pass its own fingerprint to ``build_conditioning``.
    """
    cached = _FINGERPRINTS.get(text_encoder)
    if cached is None:
        cached = fingerprint_tensors(text_encoder.state_dict())
        _FINGERPRINTS[text_encoder] = cached
    return cached


def entry_key(fingerprint: str, chunks: "TokenChunks") -> str:
    """Cache key of one encoded text: sha256 hex of encoder fingerprint, ids and multipliers."""
    fields = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "emphasis": EMPHASIS_RULE,
        "encoder": fingerprint,
        "ids": chunks.ids,
        "multipliers": [[float.hex(float(m)) for m in row] for row in chunks.multipliers],
    }
    if chunks.embeddings:  # placeholder ids stand for these vectors: key them by content
        fields["embeddings"] = [e.digest for e in chunks.embeddings]
    payload = json.dumps(fields, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()


def _tensor_digest(t: "torch.Tensor") -> str:
    import torch

    return hashlib.sha256(t.contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()  # type: ignore[arg-type]  # as above


class PromptCache:
    """A folder of encoded prompts with LRU eviction to ``max_bytes``; safe across processes.

    ``directory`` defaults to ``user_cache_dir() / "prompt-embeddings"`` (resolved when the
    cache is built, so ``LEANSD_CACHE_DIR`` applies). ``max_bytes=0`` stores nothing.
    ``stats`` counts events since construction.
    """

    def __init__(self, directory: str | os.PathLike[str] | None = None, *, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.directory, self.max_bytes = cache_folder(directory, CACHE_SUBDIR, max_bytes)
        self.stats = CacheStats()

    def __repr__(self) -> str:
        return f"PromptCache({str(self.directory)!r}, max_bytes={self.max_bytes})"

    def path_for(self, key: str) -> Path:
        if not _RE_KEY.fullmatch(key):
            raise ValueError(f"not a prompt cache key: {key!r}")
        return self.directory / (key + ENTRY_SUFFIX)

    def get(self, key: str) -> "torch.Tensor | None":
        """The stored (1, 77k, D) CPU tensor, or None (missing or corrupt); a hit refreshes its LRU time."""
        path = self.path_for(key)
        try:
            data = _read_regular_file(path)
        except FileNotFoundError:
            self.stats.misses += 1
            return None
        except OSError as exc:
            logger.warning("prompt cache: cannot read %s (%s); encoding instead", path, exc)
            self.stats.misses += 1
            return None
        tensor, problem = _decode(data, key)
        if tensor is None:
            logger.warning("prompt cache: ignoring corrupt entry %s (%s); it will be rewritten", path.name, problem)
            self.stats.corrupt += 1
            self.stats.misses += 1
            return None
        try:
            os.utime(path)  # LRU: atime and mtime = now
        except OSError:
            pass
        self.stats.hits += 1
        return tensor

    def put(self, key: str, tensor: "torch.Tensor", *, text: str = "") -> bool:
        """Store ``tensor`` under ``key`` atomically, then evict to the bound; True if stored."""
        from safetensors.torch import save

        path = self.path_for(key)
        cpu = tensor.detach().to("cpu").contiguous().clone()
        metadata = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "key": key,
            "sha256": _tensor_digest(cpu),
            "text": text[:2000],
        }
        payload = save({"embedding": cpu}, metadata=metadata)
        if len(payload) > self.max_bytes:
            logger.debug(
                "prompt cache: entry of %d bytes exceeds the %d-byte bound; not stored", len(payload), self.max_bytes
            )
            return False
        tmp = None
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=f".{key[:16]}-", suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                f.write(payload)
            os.replace(tmp, path)  # atomic publish: readers see the old entry or the whole new one
            tmp = None
        except OSError as exc:
            logger.warning("prompt cache: cannot write %s (%s); continuing without caching it", path, exc)
            return False
        finally:
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
        self.stats.written += 1
        self.evict(keep=path.name)
        return True

    def entries(self) -> list[tuple[Path, int, int]]:
        """(path, size in bytes, mtime in ns) of every entry; missing folder -> []."""
        return scan_entries(self.directory, _entry_size)

    def total_bytes(self) -> int:
        """Bytes used by entries."""
        return sum(size for _, size, _ in self.entries())

    def evict(self, *, keep: str | None = None) -> int:
        """Delete least recently used entries until within ``max_bytes`` (never ``keep``); returns the count.

        Also removes temporary files older than an hour (left by a killed writer).
        """
        remove_stale_temps(self.directory)
        removed = evict_lru(self.entries(), self.max_bytes, keep=keep, what="prompt cache")
        self.stats.evicted += removed
        return removed

    def clear(self) -> None:
        """Delete every entry."""
        for path, _, _ in self.entries():
            try:
                path.unlink()
            except OSError:
                pass


def scan_entries(directory: Path, size_of: "Callable[[os.DirEntry[str]], int | None]") -> list[tuple[Path, int, int]]:
    """(path, size in bytes, mtime in ns) of every entry of a cache folder: what `size_of` sizes (None: not
    an entry of this cache). A missing folder gives []; an entry removed meanwhile by another process is
    left out."""
    try:
        listing = list(os.scandir(directory))
    except OSError:
        return []
    out = []
    for entry in listing:
        try:
            size = size_of(entry)
            if size is not None:
                out.append((Path(entry.path), size, entry.stat(follow_symlinks=False).st_mtime_ns))
        except OSError:  # removed by another process meanwhile
            continue
    return out


def _entry_size(entry: "os.DirEntry[str]") -> int | None:
    """A prompt-cache entry's size: a regular file named <key><ENTRY_SUFFIX> (links, FIFOs, sockets: never ours)."""
    name = entry.name
    if not (name.endswith(ENTRY_SUFFIX) and _RE_KEY.fullmatch(name[: -len(ENTRY_SUFFIX)])):
        return None
    return entry.stat(follow_symlinks=False).st_size if entry.is_file(follow_symlinks=False) else None


def cache_folder(directory: "str | os.PathLike[str] | None", subdir: str, max_bytes: int) -> tuple[Path, int]:
    """A cache's folder (``user_cache_dir() / subdir`` when None, resolved now so ``LEANSD_CACHE_DIR``
    applies) and its checked size bound (>= 0; 0 stores nothing)."""
    if max_bytes < 0:
        raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
    if directory is None:
        from leansd.models.checkpoint import user_cache_dir

        directory = user_cache_dir() / subdir
    return Path(directory).expanduser(), max_bytes


def evict_lru(entries: "list[tuple[Path, int, int]]", max_bytes: int, *, keep: str | None = None,
              what: str = "cache", remove: "Callable[[Path], None] | None" = None) -> int:
    """Delete the least recently used of `entries` ((path, bytes, mtime ns)) until their total is
    within `max_bytes`, never the one named `keep`; returns how many were deleted.

    `remove` deletes one entry (default: unlink a file); an entry another process removed first
    counts as gone.
    """
    total = sum(size for _, size, _ in entries)
    removed = 0
    for path, size, _ in sorted(entries, key=lambda e: (e[2], e[0].name)):
        if total <= max_bytes:
            break
        if path.name == keep:
            continue
        try:
            (remove or Path.unlink)(path)
            removed += 1
        except FileNotFoundError:  # another process evicted it first
            pass
        except OSError as exc:
            logger.warning("%s: cannot evict %s (%s)", what, path, exc)
            continue
        total -= size
    return removed


def remove_stale_temps(directory: Path, *, remove: "Callable[[str], None] | None" = None) -> None:
    """Remove temporaries (``.*.tmp``) older than an hour from `directory`: left by a killed writer.

    `remove` deletes one (default: unlink a file)."""
    now = time.time()
    try:
        listing = list(os.scandir(directory))
    except OSError:
        return
    for entry in listing:
        if entry.name.startswith(".") and entry.name.endswith(".tmp"):
            try:
                if now - entry.stat(follow_symlinks=False).st_mtime > _STALE_TEMP_SECONDS:
                    (remove or os.unlink)(entry.path)
            except OSError:
                pass


def _read_regular_file(path: Path) -> bytes:
    """The bytes of `path` if it is a regular file; OSError for anything else.

    Opened without following a link and without blocking, so a FIFO (which would block a plain
    open until a writer appears), a device or a link planted in the folder is refused, not read.
    """
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    fd = os.open(path, flags)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _decode(data: bytes, key: str) -> "tuple[torch.Tensor | None, str]":
    """Parse and verify one entry's bytes: (tensor, "") or (None, why)."""
    if len(data) < 8:
        return None, "truncated"
    n = int.from_bytes(data[:8], "little")
    if n <= 0 or 8 + n > len(data):
        return None, "bad header length"
    try:
        header = json.loads(data[8 : 8 + n])
    except (ValueError, UnicodeDecodeError):
        return None, "unreadable header"
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
        return None, "not a leansd prompt entry of this version"
    if meta.get("key") != key:
        return None, "key mismatch"
    from safetensors.torch import load

    try:
        tensor = load(data).get("embedding")
    except Exception as exc:  # safetensors raises its own error types for damaged data
        return None, f"unreadable tensor data ({type(exc).__name__})"
    if tensor is None or tensor.ndim != 3 or tensor.shape[0] != 1 or tensor.shape[1] % CHUNK_LENGTH:
        return None, "unexpected tensor shape"
    if _tensor_digest(tensor) != meta.get("sha256"):
        return None, "checksum mismatch"
    return tensor, ""
