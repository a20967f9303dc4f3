"""Text -> CLIP embeddings: 77-token chunking, A1111 emphasis, the text-encoder call.

Chunking (A1111's ``tokenize_line``): the fragments of a :class:`~leansd.prompts.parse.WeightedText`
are tokenised one by one (after :func:`~leansd.models.tokenizer.clean_text`), and their tokens
fill chunks of 75 content tokens; each chunk becomes ``BOS + 75 tokens + EOS`` (77 ids), the
unused content positions padded with the tokenizer's pad token (EOS for SD 1.x). When a chunk
is full and the next token is not a comma, and the chunk's last comma is among its last 20
tokens, the tokens after that comma move to the next chunk, so a comma-separated phrase is not
cut in two. ``BREAK`` closes the current chunk (padding it) even when it is empty. A prompt
with no tokens is one chunk of padding. Nothing is truncated: a prompt of ``k`` chunks encodes
to ``(1, 77 * k, D)``, the chunks concatenated along the sequence axis.

Emphasis (A1111's ``EmphasisOriginal``, per chunk): ``z *= multipliers`` token by token, then
``z *= original_mean / new_mean``, the means taken over the whole ``(77, D)`` chunk; computed
in float32 and cast back. BOS, EOS and padding have multiplier 1. A chunk whose multipliers
are all 1 is returned untouched, which is what A1111's formula gives (the ratio is exactly 1).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

from leansd.prompts.parse import BREAK, Fragment, Piece

if TYPE_CHECKING:
    import torch
    from transformers import CLIPTextModel, CLIPTokenizerFast  # type: ignore[attr-defined]  # a runtime alias of CLIPTokenizer in transformers 5

    from leansd.models.embeddings import Embedding, EmbeddingMatcher

logger = logging.getLogger(__name__)

MAX_CONTENT_TOKENS = 75
"""77 positions minus BOS and EOS."""
CHUNK_LENGTH = MAX_CONTENT_TOKENS + 2
COMMA_BACKTRACK = 20
"""A full chunk is cut after its last comma when that comma is among its last 20 tokens (A1111)."""


@dataclass(frozen=True)
class TokenChunks:
    """Token ids and emphasis multipliers of one text, in 77-id chunks; hashable (a cache key part)."""

    ids: tuple[tuple[int, ...], ...]
    multipliers: tuple[tuple[float, ...], ...]
    embeddings: tuple["Embedding", ...] = ()
    """Textual-inversion embeddings used, in order: ids from ``embedding_base`` on are their vectors."""
    embedding_base: int = 0

    @property
    def count(self) -> int:
        """Number of 77-token chunks."""
        return len(self.ids)

    @property
    def is_weighted(self) -> bool:
        """True if any multiplier differs from 1."""
        return any(m != 1.0 for row in self.multipliers for m in row)


def chunk_tokens(
    tokenizer: "CLIPTokenizerFast",
    pieces: Sequence[Piece],
    *,
    comma_backtrack: int = COMMA_BACKTRACK,
    embeddings: "EmbeddingMatcher | None" = None,
) -> TokenChunks:
    """Tokenise fragments into 77-id chunks with per-token multipliers (see the module docstring).

    ``embeddings``: textual-inversion names to look for; each one found takes as many positions
    as it has vectors (placeholder ids from ``len(tokenizer)`` on), carries its fragment's
    emphasis, and starts a new chunk when it does not fit in the current one (A1111).
    """
    from leansd.models.tokenizer import clean_text

    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    comma = tokenizer.convert_tokens_to_ids(",</w>")
    if comma == tokenizer.unk_token_id:
        comma = None

    base = len(tokenizer)
    table: list["Embedding"] = []
    offsets: dict[int, int] = {}  # id(embedding) -> first placeholder offset
    # Per fragment: units of ids that stay together (a token, or an embedding's placeholders).
    texts = [clean_text(p.text) for p in pieces if isinstance(p, Fragment)]
    split_texts = [embeddings.split(t) if embeddings is not None else [t] for t in texts]
    plain = [part for parts in split_texts for part in parts if isinstance(part, str)]
    encoded = iter(
        tokenizer(plain, add_special_tokens=False, truncation=False, verbose=False).input_ids if plain else []
    )
    fragment_units: list[list[list[int]]] = []
    for parts in split_texts:
        units: list[list[int]] = []
        for part in parts:
            if isinstance(part, str):
                units.extend([token] for token in next(encoded))
                continue
            if id(part) not in offsets:
                offsets[id(part)] = sum(e.count for e in table)
                table.append(part)
            start = base + offsets[id(part)]
            placeholders = list(range(start, start + part.count))
            if len(placeholders) > MAX_CONTENT_TOKENS:  # cannot stay in one chunk: flows like text
                units.extend([i] for i in placeholders)
            else:
                units.append(placeholders)
        fragment_units.append(units)
    unit_lists = iter(fragment_units)

    ids: list[tuple[int, ...]] = []
    mults: list[tuple[float, ...]] = []
    tokens: list[int] = []
    weights: list[float] = []
    last_comma = -1

    def close_chunk() -> None:
        nonlocal tokens, weights, last_comma
        fill = MAX_CONTENT_TOKENS - len(tokens)
        if fill > 0:  # EOS right after the content, then padding (A1111 / HF layout)
            chunk_ids = [bos, *tokens, eos] + [pad] * fill
        else:
            chunk_ids = [bos, *tokens, eos]
        ids.append(tuple(chunk_ids))
        mults.append(tuple([1.0, *weights, 1.0] + [1.0] * fill))
        tokens, weights, last_comma = [], [], -1

    for piece in pieces:
        if piece is BREAK:
            close_chunk()
            continue
        weight = piece.weight  # type: ignore[union-attr]
        for unit in next(unit_lists):
            if len(unit) > 1 or unit[0] >= base:  # an embedding: whole, in one chunk
                if len(tokens) + len(unit) > MAX_CONTENT_TOKENS:
                    close_chunk()
                tokens.extend(unit)
                weights.extend([weight] * len(unit))
                continue
            token = unit[0]
            if token == comma:
                last_comma = len(tokens)
            elif (
                comma_backtrack
                and len(tokens) == MAX_CONTENT_TOKENS
                and last_comma != -1
                and len(tokens) - last_comma <= comma_backtrack
            ):
                cut = last_comma + 1
                moved, moved_weights = tokens[cut:], weights[cut:]
                tokens, weights = tokens[:cut], weights[:cut]
                close_chunk()
                tokens, weights = moved, moved_weights
            if len(tokens) == MAX_CONTENT_TOKENS:
                close_chunk()
            tokens.append(token)
            weights.append(weight)
    if tokens or not ids:
        close_chunk()
    return TokenChunks(tuple(ids), tuple(mults), tuple(table), base if table else 0)


def apply_emphasis(z: "torch.Tensor", multipliers: Sequence[Sequence[float]]) -> "torch.Tensor":
    """A1111 ``EmphasisOriginal`` on ``z`` (k, 77, D): scale each token, restore each chunk's mean."""
    import torch

    if all(m == 1.0 for row in multipliers for m in row):
        return z
    zf = z.float()
    m = torch.tensor(multipliers, dtype=torch.float32, device=z.device)  # (k, 77)
    original_mean = zf.mean(dim=(1, 2), keepdim=True)  # (k, 1, 1)
    zf = zf * m.unsqueeze(-1)
    new_mean = zf.mean(dim=(1, 2), keepdim=True)
    return (zf * (original_mean / new_mean)).to(z.dtype)


def hidden_states(
    text_encoder: "CLIPTextModel", ids: "torch.Tensor", *, layer: int = -1, final_norm: bool = True
) -> "torch.Tensor":
    """The text encoder's hidden states at ``layer`` (-1 last, -2 penultimate, ...): (B, 77, D).

    ``final_norm`` applies the encoder's final layer norm to that layer's output (the last hidden
    state of transformers has it; SD 2.x applies it to the penultimate layer too, SDXL does not).
    """
    if layer == -1 and final_norm:
        if type(text_encoder).__name__ == "CLIPTextModel":
            return text_encoder(ids, return_dict=False)[0]  # last_hidden_state, (B, 77, D)
        return text_encoder(ids, return_dict=True).last_hidden_state
    states = text_encoder(ids, output_hidden_states=True, return_dict=True).hidden_states  # embeddings + layers
    if not -len(states) < layer < 0:
        raise ValueError(f"text encoder has {len(states) - 1} layers; cannot take hidden layer {layer}")
    return _final_norm(text_encoder, states[layer]) if final_norm else states[layer]


def _final_norm(text_encoder: Any, h: "torch.Tensor") -> "torch.Tensor":
    """The encoder's final layer norm (transformers 5's CLIPTextModel holds it directly, the
    WithProjection variant under ``text_model``)."""
    return getattr(text_encoder, "text_model", text_encoder).final_layer_norm(h)


class TextEncoderPair:
    """SDXL's two text encoders read as one: penultimate hidden states of both, concatenated along the
    features (CLIP-L 768 + OpenCLIP-bigG 1280 = 2048), and bigG's projected pooled output.

    Both use the same BPE ids; only the padding after the end token differs (the second pads with
    ``pad_id_2``, ``!`` = 0), so one chunking serves both. Emphasis is applied to each encoder's
    hidden states separately (AUTOMATIC1111 weights each embedder on its own).
    """

    def __init__(
        self, first: "CLIPTextModel", second: "CLIPTextModel", *, layers: tuple[int, int] = (-2, -2),
        final_norms: tuple[bool, bool] = (False, False), pad_id_2: int = 0, eos_id: int = 49407,
    ) -> None:
        self.first, self.second = first, second
        self.layers, self.final_norms = layers, final_norms
        self.pad_id_2, self.eos_id = pad_id_2, eos_id

    def second_ids(self, ids: "torch.Tensor") -> "torch.Tensor":
        """(k, 77) ids of the first tokenizer -> the second's: positions after the first end token padded."""
        import torch

        positions = torch.arange(ids.shape[1], device=ids.device)[None]  # (1, 77)
        first_eos = (ids == self.eos_id).int().argmax(dim=1, keepdim=True)  # (k, 1)
        return torch.where(positions > first_eos, torch.full_like(ids, self.pad_id_2), ids)

    def encode(self, ids: "torch.Tensor", multipliers: Sequence[Sequence[float]]) -> tuple["torch.Tensor", "torch.Tensor"]:
        """(k, 77) ids -> hidden states (k, 77, D1 + D2) with emphasis, pooled (k, P) (no emphasis)."""
        import torch

        h1 = hidden_states(self.first, ids, layer=self.layers[0], final_norm=self.final_norms[0])
        out = self.second(self.second_ids(ids), output_hidden_states=True, return_dict=True)
        h2 = out.hidden_states[self.layers[1]]
        if self.final_norms[1]:
            h2 = _final_norm(self.second, h2)
        z = torch.cat([apply_emphasis(h1, multipliers), apply_emphasis(h2, multipliers)], dim=-1)  # (k, 77, D1+D2)
        return z, out.text_embeds  # text_embeds: (k, P), bigG's projection of the end token


class PooledTextEncoder:
    """The SDXL refiner's one text encoder (OpenCLIP-bigG): a hidden layer's states (penultimate, no
    final norm) with emphasis, and its projected pooled output, as :class:`TextEncoderPair` reads its
    second encoder. The ids come from a tokenizer that already pads with ``!``."""

    def __init__(self, encoder: "CLIPTextModel", *, layer: int = -2, final_norm: bool = False) -> None:
        self.encoder, self.layer, self.final_norm = encoder, layer, final_norm

    def encode(self, ids: "torch.Tensor", multipliers: Sequence[Sequence[float]]) -> tuple["torch.Tensor", "torch.Tensor"]:
        """(k, 77) ids -> hidden states (k, 77, D) with emphasis, pooled (k, P) (no emphasis)."""
        out = self.encoder(ids, output_hidden_states=True, return_dict=True)
        h = out.hidden_states[self.layer]
        if self.final_norm:
            h = _final_norm(self.encoder, h)
        return apply_emphasis(h, multipliers), out.text_embeds  # text_embeds: (k, P)


def encode_chunks_pooled(
    chunks: TokenChunks, *, text_encoder: "CLIPTextModel | TextEncoderPair | PooledTextEncoder",
    device: "torch.device | str", layer: int = -1, final_norm: bool = True,
) -> tuple["torch.Tensor", "torch.Tensor | None"]:
    """:func:`encode_chunks`, plus the pooled embedding of the first chunk (1, P) for a TextEncoderPair
    or PooledTextEncoder (AUTOMATIC1111 pools the first 77-token chunk), else None."""
    import torch

    from leansd.models.embeddings import inject

    ids = torch.tensor(chunks.ids, dtype=torch.long, device=device)  # (k, 77)
    table, base = chunks.embeddings, chunks.embedding_base
    if isinstance(text_encoder, PooledTextEncoder):
        with torch.inference_mode(), inject(text_encoder.encoder, table, base=base, encoder="clip_g"):
            z, pooled = text_encoder.encode(ids, chunks.multipliers)
        return z.reshape(1, -1, z.shape[-1]), pooled[:1]  # (1, 77k, D), (1, P)
    if not isinstance(text_encoder, TextEncoderPair):
        return encode_chunks(chunks, text_encoder=text_encoder, device=device, layer=layer, final_norm=final_norm), None
    with (
        torch.inference_mode(),
        inject(text_encoder.first, table, base=base, encoder="clip_l"),
        inject(text_encoder.second, table, base=base, encoder="clip_g"),
    ):
        z, pooled = text_encoder.encode(ids, chunks.multipliers)
    return z.reshape(1, -1, z.shape[-1]), pooled[:1]  # (1, 77k, D), (1, P)


def encode_chunks(
    chunks: TokenChunks,
    *,
    text_encoder: "CLIPTextModel",
    device: "torch.device | str",
    layer: int = -1,
    final_norm: bool = True,
) -> "torch.Tensor":
    """Run the text encoder on every chunk and apply emphasis: (1, 77 * k, D) on ``device``.

    ``layer`` / ``final_norm``: which hidden states condition the UNet (see :func:`hidden_states`).
    """
    import torch

    from leansd.models.embeddings import inject

    ids = torch.tensor(chunks.ids, dtype=torch.long, device=device)  # (k, 77)
    with torch.inference_mode(), inject(text_encoder, chunks.embeddings, base=chunks.embedding_base):
        z = hidden_states(text_encoder, ids, layer=layer, final_norm=final_norm)  # (k, 77, D)
        z = apply_emphasis(z, chunks.multipliers)
    return z.reshape(1, -1, z.shape[-1])  # (1, 77k, D)


def pad_chunks(z: "torch.Tensor", chunks: int, empty: "torch.Tensor") -> "torch.Tensor":
    """Append copies of ``empty`` (1, 77, D), the encoded empty prompt, until ``z`` has ``chunks`` chunks."""
    import torch

    have = z.shape[1] // CHUNK_LENGTH
    if have > chunks:
        raise ValueError(f"cannot pad {have} chunks down to {chunks}")
    if have == chunks:
        return z
    filler = empty.to(device=z.device, dtype=z.dtype).repeat(1, chunks - have, 1)  # (1, 77 * missing, D)
    return torch.cat([z, filler], dim=1)


def encode_prompts(
    texts: list[str],
    *,
    tokenizer: "CLIPTokenizerFast",
    text_encoder: "CLIPTextModel",
    device: "torch.device | str",
    layer: int = -1,
    final_norm: bool = True,
) -> "torch.Tensor":
    """Encode each text to its hidden state at ``layer`` (default the last), (len(texts), 77, D), on `device`.

    Plain text, one 77-token window (longer texts are truncated with a warning). Prompt
    syntax, chunking and the cache are :func:`leansd.prompts.conditioning.build_conditioning`,
    which gives bit-identical tensors for plain texts of up to 75 tokens.
    """
    import torch

    from leansd.models.tokenizer import count_tokens, tokenize

    for text in dict.fromkeys(texts):
        n = count_tokens(tokenizer, text)
        if n > MAX_CONTENT_TOKENS:
            logger.warning(
                "prompt has %d tokens; only the first %d are used: %.60s...", n, MAX_CONTENT_TOKENS, text
            )
    unique = list(dict.fromkeys(texts))  # encode each distinct text once
    ids = tokenize(tokenizer, unique).to(device)  # (U, 77)
    with torch.inference_mode():
        hidden = hidden_states(text_encoder, ids, layer=layer, final_norm=final_norm)  # (U, 77, D)
    index = torch.tensor([unique.index(t) for t in texts], device=hidden.device)
    return hidden.index_select(0, index)
