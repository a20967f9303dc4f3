"""The CLIP tokenizer, bundled, so single-file checkpoints work with no network.

Stable Diffusion 1.x/2.x (and both SDXL text encoders) use OpenAI CLIP's byte-level BPE
with 49,408 entries. Its merges ship as package data (``data/bpe_simple_vocab_16e6.txt.gz``,
1.36 MB, MIT, taken unchanged from the open_clip_torch wheel; see
``data/LICENSE-open_clip-clip.txt``) and :func:`bundled_tokenizer` builds a
``CLIPTokenizerFast`` from them.

Caching choice, by measurement (2-core EPYC, transformers 5.23, tokenizers 0.23):
reading and parsing the gz file takes ~0.08-0.11 s and building the fast tokenizer from it
~0.05 s, ~0.15 s in all; loading a saved ``tokenizer.json`` (3.6 MB) instead takes
~0.26-0.32 s. Building is faster than any cache, so nothing generated is shipped or
written to a user cache directory. Only the parsed vocabulary and merges (immutable
tuples) are kept in memory after the first call; every call returns a fresh tokenizer,
which callers may mutate (e.g. add textual-inversion tokens) without affecting others.

The original CLIP tokenizer cleans text before BPE (ftfy, HTML unescape, whitespace);
Hugging Face's fast tokenizer does not, so :func:`tokenize` and :func:`count_tokens` apply
:func:`clean_text` first. Lower-casing and NFC are done by the fast tokenizer's normalizer.
"""

from __future__ import annotations

import functools
import gzip
import html
import logging
import os
import re
from importlib import resources
from typing import TYPE_CHECKING

from leansd.errors import ModelLoadError

if TYPE_CHECKING:
    import torch
    from transformers import CLIPTokenizerFast  # type: ignore[attr-defined]  # a runtime alias of CLIPTokenizer in transformers 5

logger = logging.getLogger(__name__)

CLIP_VOCAB_SIZE = 49408
MAX_LENGTH = 77
BOS_ID = 49406
EOS_ID = 49407

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"

# Merges used by CLIP: the first 49152 - 256 - 2 lines after the header line.
_NUM_MERGES = 49152 - 256 - 2
_WHITESPACE = re.compile(r"\s+")


def clean_text(text: str) -> str:
    """Clean a prompt exactly as OpenAI CLIP's tokenizer does before BPE (minus lower-casing).

    ``ftfy.fix_text`` (mojibake, ligatures, full-width characters, curly quotes), then
    ``html.unescape`` twice, strip, and collapse whitespace runs to one space.
    """
    import ftfy

    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return _WHITESPACE.sub(" ", text).strip()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode character table (256 entries, in CLIP's order)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\xa1"), ord("\xac") + 1))
        + list(range(ord("\xae"), ord("\xff") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


@functools.lru_cache(maxsize=1)
def _bpe_data() -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """Vocabulary (in id order) and merges parsed from the bundled gz file; immutable."""
    source = resources.files("leansd.models").joinpath("data").joinpath(BPE_FILE)
    try:
        with source.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
    except (OSError, EOFError) as e:
        raise ModelLoadError(f"bundled CLIP vocabulary {BPE_FILE} cannot be read ({e}); reinstall leansd") from e
    merges = tuple(tuple(line.split()) for line in lines[1 : _NUM_MERGES + 1])
    byte_chars = list(_bytes_to_unicode().values())
    vocab = (
        byte_chars
        + [c + "</w>" for c in byte_chars]
        + ["".join(m) for m in merges]
        + [BOS_TOKEN, EOS_TOKEN]
    )
    if len(vocab) != CLIP_VOCAB_SIZE or any(len(m) != 2 for m in merges):
        raise ModelLoadError(
            f"bundled CLIP vocabulary {BPE_FILE} is damaged ({len(vocab)} entries, expected "
            f"{CLIP_VOCAB_SIZE}); reinstall leansd"
        )
    return tuple(vocab), merges  # type: ignore[return-value]


def bundled_tokenizer(*, pad_token: str = EOS_TOKEN) -> "CLIPTokenizerFast":
    """A fresh CLIP tokenizer built from the bundled BPE file; never touches the network.

    ``pad_token`` is ``<|endoftext|>`` for SD 1.x/2.x and SDXL's first encoder; SDXL's
    second tokenizer pads with ``"!"`` (id 0). Each call returns a new object.
    """
    from transformers import CLIPTokenizerFast  # type: ignore[attr-defined]  # a runtime alias of CLIPTokenizer in transformers 5

    vocab, merges = _bpe_data()
    if pad_token not in (EOS_TOKEN, BOS_TOKEN) and pad_token not in vocab:
        raise ValueError(f"pad_token {pad_token!r} is not in the CLIP vocabulary; use {EOS_TOKEN!r} or '!'")
    tokenizer = CLIPTokenizerFast(
        vocab={token: i for i, token in enumerate(vocab)},
        merges=list(merges),
        model_max_length=MAX_LENGTH,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=pad_token,
    )
    _check(tokenizer, "bundled CLIP tokenizer")
    return tokenizer


def _check(tokenizer: "CLIPTokenizerFast", what: str) -> None:
    """Raise ModelLoadError unless ``tokenizer`` is CLIP's 49,408-entry BPE with CLIP's bos/eos.

    Added tokens on top of the BPE vocabulary (a folder saved after loading textual-inversion
    embeddings) are accepted: the base vocabulary must still be CLIP's 49,408 entries.
    """
    size = len(tokenizer)
    base = getattr(tokenizer, "vocab_size", size)
    if base != CLIP_VOCAB_SIZE or size < CLIP_VOCAB_SIZE:
        raise ModelLoadError(
            f"{what} has {size} entries, expected {CLIP_VOCAB_SIZE} (CLIP BPE); "
            "the folder is incomplete or not a CLIP tokenizer"
        )
    if tokenizer.bos_token_id != BOS_ID or tokenizer.eos_token_id != EOS_ID:
        raise ModelLoadError(
            f"{what} has bos/eos ids {tokenizer.bos_token_id}/{tokenizer.eos_token_id}, "
            f"expected {BOS_ID}/{EOS_ID} (CLIP BPE)"
        )


def load_tokenizer(folder: str | os.PathLike[str] | None = None) -> "CLIPTokenizerFast":
    """Load a CLIP tokenizer: the bundled one (``folder=None``) or a diffusers ``tokenizer/`` folder.

    A folder is read with ``local_files_only=True`` (no network). Raises ``ModelLoadError``
    if it cannot be read or is not CLIP's 49,408-entry BPE (offline, transformers may
    silently return a 2-entry placeholder instead of failing).
    """
    if folder is None:
        return bundled_tokenizer()
    path = os.fspath(folder)
    if not os.path.isdir(path):
        raise ModelLoadError(f"tokenizer folder {path!r} does not exist or is not a directory")
    names = set(os.listdir(path))
    if "tokenizer.json" not in names and not {"vocab.json", "merges.txt"} <= names:
        raise ModelLoadError(
            f"{path!r} has no tokenizer files (tokenizer.json, or vocab.json and merges.txt); "
            "pass a diffusers model's tokenizer/ subfolder"
        )

    from transformers import CLIPTokenizerFast  # type: ignore[attr-defined]  # a runtime alias of CLIPTokenizer in transformers 5

    try:
        tokenizer = CLIPTokenizerFast.from_pretrained(path, local_files_only=True)
    except Exception as e:  # transformers raises many types (OSError, ValueError, JSON errors)
        reason = " ".join(str(e).split())[:300]
        raise ModelLoadError(
            f"cannot load a CLIP tokenizer from {path!r} "
            f"(pass a diffusers model's tokenizer/ subfolder): {type(e).__name__}: {reason}"
        ) from e
    _check(tokenizer, f"tokenizer in {path!r}")
    logger.debug("loaded CLIP tokenizer from %s", path)
    return tokenizer


def save_tokenizer(tokenizer: "CLIPTokenizerFast", folder: str | os.PathLike[str]) -> None:
    """Write ``tokenizer`` as a diffusers-style ``tokenizer/`` folder (reloads with :func:`load_tokenizer`)."""
    tokenizer.save_pretrained(os.fspath(folder))


def tokenize(tokenizer: "CLIPTokenizerFast", texts: list[str]) -> "torch.Tensor":
    """Token ids, shape (B, 77), int64: BOS, up to 75 content tokens, EOS, then padding.

    Each text is cleaned with :func:`clean_text`; longer texts are truncated (use
    :func:`count_tokens` to warn). Padding uses the tokenizer's pad token: EOS for the
    bundled tokenizer and SD 1.x/2.x, ``"!"`` for SDXL's second tokenizer.
    """
    if isinstance(texts, str):
        raise TypeError("tokenize() takes a list of strings, not a single string")
    import torch

    if not texts:
        return torch.empty((0, MAX_LENGTH), dtype=torch.long)
    encoded = tokenizer(
        [clean_text(t) for t in texts],
        padding="max_length",
        max_length=MAX_LENGTH,
        truncation=True,
        return_tensors="pt",
    )
    return encoded.input_ids  # (B, 77)


def count_tokens(tokenizer: "CLIPTokenizerFast", text: str) -> int:
    """Number of content tokens in ``text`` after cleaning, without BOS/EOS (75 fit in one window)."""
    ids = tokenizer(clean_text(text), add_special_tokens=False, truncation=False, verbose=False).input_ids
    return len(ids)
