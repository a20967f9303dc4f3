"""On-disk cache of converted OpenVINO models (IR: ``model.xml`` + ``model.bin``).

One entry per (weights fingerprint, part, input shapes, precision, patch set, padding mode,
OpenVINO and diffusers versions), keyed by the sha256 of those fields: ``<directory>/<key>/``
holding ``model.xml``, ``model.bin`` and ``meta.json`` (the fields, readable). The default folder
is ``user_cache_dir()/openvino`` (``$LEANSD_CACHE_DIR/openvino`` or ``~/.cache/leansd/openvino``).

Writes go to a temporary folder beside the entries and are published with one rename, so a
reader sees a whole entry or none; when two processes convert the same part, the first rename
wins and the other's copy is deleted. A hit refreshes the entry's mtime; after each write the
least recently used entries are deleted until the folder is within ``max_bytes`` (the prompt
cache's LRU rule, `leansd.prompts.cache.evict_lru`). Cache I/O errors are logged; a failed
write leaves the converted model in use for this process only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

logger = logging.getLogger(__name__)

CACHE_SUBDIR = "openvino"
DEFAULT_MAX_BYTES = 24 * 2**30
"""Room for the fp32 IR of an SD 1.5 model at a few sizes (its UNet alone is 3.4 GB per shape)."""
FORMAT = "leansd-openvino-ir"
FORMAT_VERSION = "1"
_RE_KEY = re.compile(r"[0-9a-f]{64}")


def entry_key(fields: dict[str, Any]) -> str:
    """sha256 hex of the entry's identifying fields (format and version included)."""
    payload = json.dumps({"format": FORMAT, "version": FORMAT_VERSION, **fields}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()


def _entry_size(entry: "os.DirEntry[str]") -> int | None:
    """An entry's size: a real folder named by a key, its files' bytes."""
    if not _RE_KEY.fullmatch(entry.name) or not entry.is_dir(follow_symlinks=False):
        return None
    return sum(f.stat(follow_symlinks=False).st_size for f in os.scandir(entry.path) if f.is_file(follow_symlinks=False))


class IRCache:
    """A folder of converted models with LRU eviction to ``max_bytes``; safe across processes."""

    def __init__(self, directory: str | os.PathLike[str] | None = None, *, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        from leansd.prompts.cache import cache_folder

        self.directory, self.max_bytes = cache_folder(directory, CACHE_SUBDIR, max_bytes)

    def __repr__(self) -> str:
        return f"IRCache({str(self.directory)!r}, max_bytes={self.max_bytes})"

    def path_for(self, key: str) -> Path:
        if not _RE_KEY.fullmatch(key):
            raise ValueError(f"not an OpenVINO cache key: {key!r}")
        return self.directory / key

    def get(self, key: str) -> Path | None:
        """The entry's ``model.xml`` if the whole entry is there (refreshing its LRU time), else None."""
        folder = self.path_for(key)
        xml, weights = folder / "model.xml", folder / "model.bin"
        if folder.is_symlink() or not (xml.is_file() and weights.is_file()):
            return None
        try:
            os.utime(folder)
        except OSError:
            pass
        return xml

    def put(self, key: str, save: Callable[[Path], None], *, fields: dict[str, Any]) -> Path | None:
        """Publish an entry: `save(xml_path)` writes the model into a temporary folder, which is then
        renamed to the entry. Returns the entry's ``model.xml`` (None if it could not be written)."""
        final = self.path_for(key)
        tmp: Path | None = None
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=self.directory, prefix=f".{key[:16]}-", suffix=".tmp"))
            save(tmp / "model.xml")
            (tmp / "meta.json").write_text(json.dumps({"key": key, **fields}, sort_keys=True))
            try:
                os.rename(tmp, final)  # atomic publish of the whole folder
                tmp = None
            except OSError:
                if self.get(key) is None:  # not another process's complete entry: a real failure
                    raise
                logger.debug("openvino cache: %s was written by another process meanwhile", key[:16])
        except OSError as exc:
            logger.warning("openvino cache: cannot write %s (%s); the converted model is not kept", final, exc)
            return None
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
        self.evict(keep=key)
        return self.get(key)

    def entries(self) -> list[tuple[Path, int, int]]:
        """(folder, bytes, mtime ns) of every entry; a missing folder gives []."""
        from leansd.prompts.cache import scan_entries

        return scan_entries(self.directory, _entry_size)

    def total_bytes(self) -> int:
        return sum(size for _, size, _ in self.entries())

    def evict(self, *, keep: str | None = None) -> int:
        """Delete least recently used entries until within ``max_bytes`` (never ``keep``); returns the count."""
        from leansd.prompts.cache import evict_lru, remove_stale_temps

        remove_stale_temps(self.directory, remove=_remove_tree)
        return evict_lru(self.entries(), self.max_bytes, keep=keep, what="openvino cache", remove=_remove_tree)

    def has_weights(self, fingerprint: str, part: str) -> bool:
        """Whether any entry converts `part` of the weights `fingerprint` (any shape): a model converted before."""
        for folder, _, _ in self.entries():
            try:
                meta = json.loads((folder / "meta.json").read_text())
            except (OSError, ValueError):
                continue
            if meta.get("weights") == fingerprint and meta.get("part") == part and (folder / "model.bin").is_file():
                return True
        return False

    def clear(self) -> None:
        for folder, _, _ in self.entries():
            shutil.rmtree(folder, ignore_errors=True)


def _remove_tree(path: "Path | str") -> None:
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()
