"""Textual-inversion embeddings (Gal et al. 2022): AUTOMATIC1111 ``.pt`` / ``.safetensors``, diffusers ``.bin``.

An embedding is ``n`` learned token vectors. Its name is the file stem (not the name stored
inside a ``.pt``); where the name appears in a prompt (as a word, or as ``embedding:NAME`` the way
ComfyUI writes it) its ``n`` vectors take the place of ``n`` tokens. Emphasis applies to them and
long-prompt chunking counts all ``n`` (an embedding that does not fit in the current 75-token
chunk starts the next one, as A1111 does).

Formats: A1111 ``.pt`` (``{"string_to_param": {"*": (n, D)}, "name": ..., ...}``), A1111
``.safetensors`` (``{"emb_params": (n, D)}``), diffusers ``learned_embeds`` (``{"<token>": (D,)}``),
and SDXL's ``{"clip_l": (n, 768), "clip_g": (n, 1280)}``. Pickle-based files go through the
weights-only loader. Vectors are kept per text encoder: ``te`` for SD 1.x/2.x, ``clip_l`` and
``clip_g`` for SDXL's two encoders.

In the text encoder the vectors enter through placeholder token ids above the vocabulary:
:func:`inject` hooks the token-embedding layer for one encode, so the tokenizer and the weights are
never changed.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

from leansd.errors import ModelLoadError

if TYPE_CHECKING:
    import torch

    from leansd.models.library import ModelLibrary

logger = logging.getLogger(__name__)

_SDXL_KEYS = ("clip_l", "clip_g")


@dataclass(frozen=True, eq=False)
class Embedding:
    """A textual-inversion embedding: ``vectors[encoder]`` is (n, D)."""

    name: str
    vectors: Mapping[str, "torch.Tensor"] = field(repr=False)
    digest: str = ""
    """sha256 of the vectors (dtype, shape and bytes): part of the prompt-cache key."""
    path: Path | None = None

    @property
    def count(self) -> int:
        """Number of vectors (token positions it takes)."""
        return int(next(iter(self.vectors.values())).shape[0])

    def for_encoder(self, encoder: str = "te") -> "torch.Tensor":
        """Vectors for one text encoder (``te``; SDXL: ``clip_l``/``clip_g``)."""
        if encoder in self.vectors:
            return self.vectors[encoder]
        if encoder == "te" and "clip_l" in self.vectors and len(self.vectors) == 1:
            return self.vectors["clip_l"]
        raise KeyError(encoder)


def _digest(vectors: Mapping[str, "torch.Tensor"]) -> str:
    import torch

    h = hashlib.sha256()
    for key in sorted(vectors):
        t = vectors[key].detach().contiguous().cpu()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def embedding_from_object(obj: object, *, name: str, where: str, path: Path | None = None) -> Embedding:
    """Build an :class:`Embedding` from a loaded file's object (see the module docstring for formats)."""
    import torch

    if not isinstance(obj, dict):
        raise ModelLoadError(f"{where}: holds a {type(obj).__name__}, not an embedding")
    vectors: dict[str, torch.Tensor] = {}
    if all(k in obj for k in _SDXL_KEYS):
        vectors = {k: obj[k] for k in _SDXL_KEYS}
    elif isinstance(obj.get("string_to_param"), dict):
        params = obj["string_to_param"]
        tensors = [v for v in params.values() if isinstance(v, torch.Tensor)]
        if len(tensors) != 1:
            raise ModelLoadError(f"{where}: string_to_param holds {len(tensors)} tensors; expected one")
        vectors = {"te": tensors[0]}
    elif isinstance(obj.get("emb_params"), torch.Tensor):
        vectors = {"te": obj["emb_params"]}
    else:
        found = [v for v in obj.values() if isinstance(v, torch.Tensor)]
        if len(found) == 1:  # diffusers learned_embeds: {"<token>": (D,) or (n, D)}
            vectors = {"te": found[0]}
    if not vectors:
        raise ModelLoadError(
            f"{where}: not a textual-inversion embedding (no string_to_param, emb_params, clip_l/clip_g "
            "or single token vector)"
        )
    checked: dict[str, torch.Tensor] = {}
    for key, value in vectors.items():
        if not isinstance(value, torch.Tensor) or value.dim() not in (1, 2) or value.numel() == 0:
            raise ModelLoadError(f"{where}: embedding vectors {key!r} are not a (n, D) tensor")
        value = value.detach().float().reshape(-1, value.shape[-1])  # (n, D); (D,) -> (1, D)
        if not torch.isfinite(value).all():
            raise ModelLoadError(f"{where}: embedding vectors {key!r} hold NaN or infinite values")
        checked[key] = value
    counts = {v.shape[0] for v in checked.values()}
    if len(counts) != 1:
        raise ModelLoadError(f"{where}: clip_l and clip_g have different numbers of vectors")
    return Embedding(name=name, vectors=checked, digest=_digest(checked), path=path)


def read_embedding(path: str | os.PathLike[str], *, name: str | None = None) -> Embedding:
    """Read an embedding file; its name is the file stem unless given. Raises ModelLoadError."""
    from leansd.models.checkpoint import load_weights_only, read_state_dict

    p = Path(path)
    if p.suffix.lower() == ".safetensors":
        obj: object = read_state_dict(p)
    else:
        obj = load_weights_only(p)
    return embedding_from_object(obj, name=name or p.stem, where=str(p), path=p)


@dataclass
class EmbeddingStore:
    """The embeddings of a library folder for one text encoder, read on first use and kept while unchanged.

    ``width`` is the text encoder's hidden size; an embedding of another width (another model
    family) is *skipped*, as A1111 reports it, and its name stays plain text.
    """

    library: "ModelLibrary"
    width: int
    encoder: str = "te"
    also: tuple[tuple[str, int], ...] = ()
    """Further (encoder, width) pairs an embedding must have (SDXL: ``("clip_g", 1280)``)."""
    _cache: dict[str, tuple[tuple[int, int], Embedding | None, str]] = field(default_factory=dict, repr=False)

    def names(self) -> list[str]:
        return self.library.names("embedding")

    def get(self, name: str) -> Embedding | None:
        """The embedding called ``name``, or None when it is missing or skipped (wrong width, unreadable)."""
        entry = self.library.get("embedding", name)
        if entry is None:
            return None
        st = entry.path.stat()
        stamp = (st.st_size, st.st_mtime_ns)
        cached = self._cache.get(entry.name)
        if cached is None or cached[0] != stamp:
            reason = ""
            try:
                read = read_embedding(entry.path, name=entry.name)
                emb: Embedding | None = read
                for encoder, width in ((self.encoder, self.width), *self.also):
                    try:
                        vectors = read.for_encoder(encoder)
                    except KeyError:
                        emb, reason = None, f"no vectors for the {encoder} text encoder"
                        break
                    if vectors.shape[-1] != width:
                        reason = f"vectors of width {vectors.shape[-1]}, this model's text encoder has {width}"
                        emb = None
                        break
            except ModelLoadError as exc:
                emb, reason = None, str(exc)
            if emb is None:
                logger.warning("embedding %s skipped: %s", entry.name, reason)
            cached = (stamp, emb, reason)
            self._cache[entry.name] = cached
        return cached[1]

    def matcher(self) -> "EmbeddingMatcher | None":
        """A matcher over every name in the folder (loading happens only for names a prompt uses)."""
        names = self.names()
        return EmbeddingMatcher(names, self) if names else None

    def status(self) -> tuple[dict[str, Embedding], dict[str, str]]:
        """(loaded, skipped) over every file: A1111's ``/embeddings`` view. Reads every file once."""
        loaded: dict[str, Embedding] = {}
        skipped: dict[str, str] = {}
        for name in self.names():
            try:
                emb = self.get(name)
            except Exception as exc:  # an ambiguous name: two files
                skipped[name] = str(exc)
                continue
            if emb is None:
                skipped[name] = self._cache.get(name, (None, None, "unreadable"))[2]
            else:
                loaded[name] = emb
        return loaded, skipped


class EmbeddingMatcher:
    """Finds embedding names in prompt text: whole words, case-insensitive, or ``embedding:NAME``."""

    def __init__(self, names: Sequence[str], store: EmbeddingStore) -> None:
        ordered = sorted(set(names), key=len, reverse=True)  # longest first: "bad-hands-5" before "bad-hands"
        alternatives = "|".join(re.escape(n) for n in ordered)
        self.pattern = re.compile(rf"(?<![0-9A-Za-z_])(?:embedding:)?({alternatives})(?![0-9A-Za-z_])", re.I)
        self.by_lower = {n.lower(): n for n in ordered}
        self.store = store

    def split(self, text: str) -> list[str | Embedding]:
        """``text`` as text pieces and the embeddings found in it (names that fail to load stay text)."""
        out: list[str | Embedding] = []
        pos = 0
        for m in self.pattern.finditer(text):
            emb = self.store.get(self.by_lower[m.group(1).lower()])
            if emb is None:
                continue
            out.append(text[pos:m.start()])
            out.append(emb)
            pos = m.end()
        out.append(text[pos:])
        return [p for p in out if not (isinstance(p, str) and p == "")]


@contextlib.contextmanager
def inject(
    text_encoder: "torch.nn.Module", table: Sequence[Embedding], *, base: int, encoder: str = "te"
) -> Iterator[None]:
    """Token ids ``base + k`` read vector ``k`` of ``table``'s vectors laid end to end, for this block.

    Hooks the text encoder's token-embedding layer (a pre-hook maps placeholder ids to 0, a
    forward hook writes the vectors into those positions); nothing stays behind.
    """
    import torch

    if not table:
        yield
        return
    layer: Any = text_encoder.get_input_embeddings()  # type: ignore[operator]
    vectors = torch.cat([e.for_encoder(encoder) for e in table])  # (total, D)
    state: dict[str, torch.Tensor] = {}

    def before(module: torch.nn.Module, args: tuple) -> tuple:
        ids = args[0]
        mask = ids >= base
        state["ids"], state["mask"] = ids, mask
        return (torch.where(mask, torch.zeros_like(ids), ids), *args[1:])

    def after(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        mask = state.pop("mask")
        ids = state.pop("ids")
        if not bool(mask.any()):
            return output
        out = output.clone()
        out[mask] = vectors.to(device=out.device, dtype=out.dtype)[ids[mask] - base]
        return out

    handles = [layer.register_forward_pre_hook(before), layer.register_forward_hook(after)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
