"""The model library: checkpoints, LoRAs, VAEs and embeddings found in AUTOMATIC1111's folders.

Layout (AUTOMATIC1111's defaults under ``--data-dir``, the current folder unless given)::

    models/Stable-diffusion/   checkpoints (.safetensors, .ckpt)       --ckpt-dir
    models/Lora/               LoRA / LyCORIS (.safetensors, .pt, .ckpt) --lora-dir
    models/VAE/                VAEs (.safetensors, .pt, .ckpt)          --vae-dir
    embeddings/                textual inversion (.pt, .safetensors, .bin) --embeddings-dir

Subfolders are scanned (symlinked folders too, each real folder once); hidden files and folders
are skipped. A file's name is its stem (``models/Lora/styles/ink.safetensors`` -> ``ink``).
Two files with the same name in one kind are an error when that name is used, naming both
files. Scanning is lazy (on first use) and :meth:`ModelLibrary.refresh` rescans. Nothing here
reads a weight; hashing happens only when a caller asks for it.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from leansd.errors import InvalidRequestError

logger = logging.getLogger(__name__)

KINDS = ("checkpoint", "lora", "vae", "embedding")
SUFFIXES: dict[str, tuple[str, ...]] = {
    "checkpoint": (".safetensors", ".ckpt"),
    "lora": (".safetensors", ".pt", ".ckpt"),
    "vae": (".safetensors", ".pt", ".ckpt"),
    "embedding": (".pt", ".safetensors", ".bin"),
}
DEFAULT_SUBDIRS: dict[str, str] = {
    "checkpoint": "models/Stable-diffusion",
    "lora": "models/Lora",
    "vae": "models/VAE",
    "embedding": "embeddings",
}
FLAG_OF: dict[str, str] = {
    "checkpoint": "--ckpt-dir",
    "lora": "--lora-dir",
    "vae": "--vae-dir",
    "embedding": "--embeddings-dir",
}
_TITLE_HASH = re.compile(r"\s*\[[0-9a-fA-F]{8,64}\]\s*$")
_VAE_SUFFIXES = (".vae.safetensors", ".vae.pt", ".vae.ckpt")


@dataclass(frozen=True)
class LibraryEntry:
    """One file of the library."""

    kind: str
    name: str
    """The file stem: what prompts and options use (``<lora:NAME:1>``, the embedding token)."""
    path: Path
    relative: str
    """Path relative to its kind's folder, with ``/`` (A1111's checkpoint "filename" in titles)."""

    def title(self, short_hash: str | None) -> str:
        """AUTOMATIC1111's title: ``relative/path.safetensors [0123456789]`` (without a hash: the path)."""
        return f"{self.relative} [{short_hash}]" if short_hash else self.relative


@dataclass
class ModelLibrary:
    """The four folders and what they hold; see the module docstring."""

    data_dir: Path = field(default_factory=Path.cwd)
    ckpt_dir: Path | None = None
    lora_dir: Path | None = None
    vae_dir: Path | None = None
    embeddings_dir: Path | None = None
    _scans: dict[str, dict[str, list[LibraryEntry]]] = field(default_factory=dict, repr=False)

    @classmethod
    def from_options(
        cls,
        *,
        data_dir: str | os.PathLike[str] | None = None,
        ckpt_dir: str | os.PathLike[str] | None = None,
        lora_dir: str | os.PathLike[str] | None = None,
        vae_dir: str | os.PathLike[str] | None = None,
        embeddings_dir: str | os.PathLike[str] | None = None,
    ) -> "ModelLibrary":
        """A library from the front ends' options; an explicitly given folder must exist."""
        given = {"checkpoint": ckpt_dir, "lora": lora_dir, "vae": vae_dir, "embedding": embeddings_dir}
        for kind, folder in given.items():
            if folder is not None and not Path(folder).expanduser().is_dir():
                raise InvalidRequestError(f"{FLAG_OF[kind]} {os.fspath(folder)}: no such folder")
        if data_dir is not None and not Path(data_dir).expanduser().is_dir():
            raise InvalidRequestError(f"--data-dir {os.fspath(data_dir)}: no such folder")

        def path(value: str | os.PathLike[str] | None) -> Path | None:
            return None if value is None else Path(value).expanduser()

        return cls(
            data_dir=path(data_dir) or Path.cwd(),
            ckpt_dir=path(ckpt_dir),
            lora_dir=path(lora_dir),
            vae_dir=path(vae_dir),
            embeddings_dir=path(embeddings_dir),
        )

    def folder(self, kind: str) -> Path:
        """The folder scanned for ``kind`` (its flag's value, else the A1111 default under data_dir)."""
        explicit = {
            "checkpoint": self.ckpt_dir,
            "lora": self.lora_dir,
            "vae": self.vae_dir,
            "embedding": self.embeddings_dir,
        }[kind]
        return explicit if explicit is not None else self.data_dir / DEFAULT_SUBDIRS[kind]

    def refresh(self, kind: str | None = None) -> None:
        """Forget the scan of ``kind`` (all kinds if None); the next use rescans."""
        for k in KINDS if kind is None else (kind,):
            self._scans.pop(k, None)

    def _scan(self, kind: str) -> dict[str, list[LibraryEntry]]:
        if kind not in self._scans:
            self._scans[kind] = scan_folder(self.folder(kind), kind)
        return self._scans[kind]

    def entries(self, kind: str) -> list[LibraryEntry]:
        """Every file of ``kind``, sorted by name (duplicates included)."""
        return [e for name in sorted(self._scan(kind), key=str.lower) for e in self._scan(kind)[name]]

    def names(self, kind: str) -> list[str]:
        """The distinct names of ``kind``, sorted."""
        return sorted(self._scan(kind), key=str.lower)

    def get(self, kind: str, name: str) -> LibraryEntry | None:
        """The entry called ``name`` (its stem, or its relative path), or None.

        Raises InvalidRequestError if two files share the name, naming both.
        """
        scan = self._scan(kind)
        found = scan.get(name)
        if found is None:
            found = [e for entries in scan.values() for e in entries if e.relative == name.replace("\\", "/")]
        if not found:
            return None
        if len(found) > 1:
            files = " and ".join(str(e.path) for e in found[:2])
            raise InvalidRequestError(
                f"{kind} name {name!r} is ambiguous: {files} share it; rename one of them"
            )
        return found[0]

    def require(self, kind: str, name: str) -> LibraryEntry:
        """Like :meth:`get`, but a missing name is an InvalidRequestError listing a few valid names."""
        entry = self.get(kind, name)
        if entry is None:
            names = self.names(kind)
            shown = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
            where = self.folder(kind)
            raise InvalidRequestError(
                f"no {kind} named {name!r} in {where} ({FLAG_OF[kind]})"
                + (f"; available: {shown}" if names else "; the folder has none")
            )
        return entry

    def find_checkpoint(self, spec: str) -> LibraryEntry | None:
        """A checkpoint by stem, relative path or AUTOMATIC1111 title (``name.safetensors [hash]``)."""
        name = _TITLE_HASH.sub("", spec).strip()
        if not name:
            return None
        entry = self.get("checkpoint", name)
        if entry is None and "." in Path(name).name:  # "model.safetensors" without its subfolder
            entry = self.get("checkpoint", Path(name).stem) if Path(name).suffix in SUFFIXES["checkpoint"] else None
        return entry


def scan_folder(folder: Path, kind: str) -> dict[str, list[LibraryEntry]]:
    """Name -> entries of ``kind`` under ``folder`` (recursive; missing folder -> empty)."""
    found: dict[str, list[LibraryEntry]] = {}
    if not folder.is_dir():
        return found
    suffixes = SUFFIXES[kind]
    seen: set[str] = set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:  # a symlink loop or a folder linked twice
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for file in sorted(files):
            if file.startswith(".") or not file.lower().endswith(suffixes):
                continue
            path = Path(root) / file
            if not path.is_file():
                continue
            entry = LibraryEntry(kind, Path(file).stem, path, path.relative_to(folder).as_posix())
            found.setdefault(entry.name, []).append(entry)
    for name, entries in found.items():
        if len(entries) > 1:
            logger.warning("%s name %r is shared by %s; using it is an error until one is renamed",
                           kind, name, " and ".join(str(e.path) for e in entries))
    return found


def automatic_vae(checkpoint: str | os.PathLike[str]) -> Path | None:
    """AUTOMATIC1111's "Automatic" VAE: ``<checkpoint stem>.vae.safetensors`` (or .vae.pt/.vae.ckpt) beside it."""
    ckpt = Path(checkpoint)
    if not ckpt.is_file():
        return None
    for suffix in _VAE_SUFFIXES:
        candidate = ckpt.with_name(ckpt.stem + suffix)
        if candidate.is_file():
            return candidate
    return None
