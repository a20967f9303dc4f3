"""SDXL and SD 2.x prompt conditioning against AUTOMATIC1111's algorithm, re-implemented here.

The reference below is written from AUTOMATIC1111's ``modules/prompt_parser.py``
(``parse_prompt_attention``) and ``modules/sd_hijack_clip.py`` (``tokenize_line``, ``process_tokens``,
``EmphasisOriginal``) and the SDXL/SD 2 embedder wrappers; it calls transformers' text encoders
directly and nothing of leansd's prompt code:
- 75-token chunks, each ``[BOS] + tokens + [EOS] * (fill + 1)``; a chunk that is full when a
  non-comma token comes is cut after its last comma if that comma is among its last 20 tokens;
  ``BREAK`` closes the chunk (padding it);
- each encoder pads after the first EOS with its own pad id (CLIP-L: EOS; OpenCLIP: 0);
- emphasis per chunk: ``z *= multipliers``, then ``z *= original_mean / new_mean``;
- SDXL: every chunk goes through BOTH encoders (CLIP-L penultimate layer, bigG penultimate layer,
  no final norm), emphasis on each encoder's output separately, the two concatenated on the
  features, the chunks on the sequence; the pooled embedding is bigG's of the FIRST chunk;
- SD 2.x (single file, the whole OpenCLIP-H): the penultimate layer with the final layer norm.
"""

from __future__ import annotations

import re

import pytest
import torch

from leansd import GenerationRequest
from leansd.engine.engine import Engine
from leansd.models.family import ModelFamily
from leansd.models.loader import load_model
from leansd.models.tiny import write_tiny_single_file

# ---- AUTOMATIC1111's algorithm ------------------------------------------------------------------

RE_ATTENTION = re.compile(r"""
\\\(|\\\)|\\\[|\\]|\\\\|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:
""", re.X)
RE_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
CHUNK, BACKTRACK = 75, 20


def parse_prompt_attention(text: str) -> list[list]:
    res: list[list] = []
    round_brackets: list[int] = []
    square_brackets: list[int] = []

    def multiply_range(start: int, multiplier: float) -> None:
        for p in range(start, len(res)):
            res[p][1] *= multiplier

    for m in RE_ATTENTION.finditer(text):
        part, weight = m.group(0), m.group(1)
        if part.startswith("\\"):
            res.append([part[1:], 1.0])
        elif part == "(":
            round_brackets.append(len(res))
        elif part == "[":
            square_brackets.append(len(res))
        elif weight is not None and round_brackets:
            multiply_range(round_brackets.pop(), float(weight))
        elif part == ")" and round_brackets:
            multiply_range(round_brackets.pop(), 1.1)
        elif part == "]" and square_brackets:
            multiply_range(square_brackets.pop(), 1 / 1.1)
        else:
            for i, piece in enumerate(re.split(RE_BREAK, part)):
                if i > 0:
                    res.append(["BREAK", -1])
                res.append([piece, 1.0])
    for pos in round_brackets:
        multiply_range(pos, 1.1)
    for pos in square_brackets:
        multiply_range(pos, 1 / 1.1)
    if not res:
        res = [["", 1.0]]
    i = 0
    while i + 1 < len(res):
        if res[i][1] == res[i + 1][1]:
            res[i][0] += res[i + 1][0]
            res.pop(i + 1)
        else:
            i += 1
    return res


def tokenize_line(tokenizer, line: str) -> tuple[list[list[int]], list[list[float]], int]:
    """Chunks (ids, multipliers) of one prompt, padded with EOS; and how many comma backtracks happened."""
    parsed = parse_prompt_attention(line)
    tokenized = tokenizer([text for text, _ in parsed], add_special_tokens=False, truncation=False).input_ids
    comma = tokenizer.get_vocab()[",</w>"]
    start, end = tokenizer.bos_token_id, tokenizer.eos_token_id
    chunks: list[tuple[list[int], list[float]]] = []
    tokens: list[int] = []
    mults: list[float] = []
    last_comma = -1
    backtracks = 0

    def next_chunk() -> None:
        nonlocal tokens, mults, last_comma
        fill = CHUNK - len(tokens)
        chunks.append(([start] + tokens + [end] * fill + [end], [1.0] + mults + [1.0] * fill + [1.0]))
        tokens, mults, last_comma = [], [], -1

    for ids, (text, weight) in zip(tokenized, parsed, strict=True):
        if text == "BREAK" and weight == -1:
            next_chunk()
            continue
        for token in ids:
            if token == comma:
                last_comma = len(tokens)
            elif len(tokens) == CHUNK and last_comma != -1 and len(tokens) - last_comma <= BACKTRACK:
                cut = last_comma + 1
                moved, moved_mults = tokens[cut:], mults[cut:]
                tokens, mults = tokens[:cut], mults[:cut]
                next_chunk()
                tokens, mults = moved, moved_mults
                backtracks += 1
            if len(tokens) == CHUNK:
                next_chunk()
            tokens.append(token)
            mults.append(weight)
    if tokens or not chunks:
        next_chunk()
    return [c[0] for c in chunks], [c[1] for c in chunks], backtracks


def with_pad(ids: list[int], *, end: int, pad: int) -> list[int]:
    """process_tokens: positions after the first EOS get the encoder's pad id."""
    first = ids.index(end)
    return ids[: first + 1] + [pad] * (len(ids) - first - 1)


def emphasis(z: torch.Tensor, multipliers: list[float]) -> torch.Tensor:
    """EmphasisOriginal.after_transformers on one chunk z (1, 77, D)."""
    original_mean = z.mean()
    z = z * torch.tensor(multipliers).reshape(1, -1, 1).expand(z.shape)
    new_mean = z.mean()
    return z * (original_mean / new_mean)


@torch.no_grad()
def a1111_sdxl(bundle, prompt: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    tok = bundle.tokenizer
    chunk_ids, chunk_mults, backtracks = tokenize_line(tok, prompt)
    end = tok.eos_token_id
    zs, pooled = [], None
    for ids, mults in zip(chunk_ids, chunk_mults, strict=True):
        ids_l = torch.tensor([with_pad(ids, end=end, pad=end)])  # CLIP-L: id_pad = id_end
        ids_g = torch.tensor([with_pad(ids, end=end, pad=0)])  # OpenCLIP-bigG: id_pad = 0
        z_l = bundle.text_encoder(ids_l, output_hidden_states=True).hidden_states[-2]
        out_g = bundle.text_encoder_2(ids_g, output_hidden_states=True)
        z_g = out_g.hidden_states[-2]
        zs.append(torch.cat([emphasis(z_l, mults), emphasis(z_g, mults)], dim=-1))
        if pooled is None:
            pooled = out_g.text_embeds  # the first chunk's
    return torch.hstack(zs), pooled, backtracks


@torch.no_grad()
def a1111_sd2(bundle, prompt: str) -> tuple[torch.Tensor, int]:
    tok = bundle.tokenizer
    chunk_ids, chunk_mults, backtracks = tokenize_line(tok, prompt)
    zs = []
    encoder = bundle.text_encoder
    for ids, mults in zip(chunk_ids, chunk_mults, strict=True):
        hidden = encoder(torch.tensor([with_pad(ids, end=tok.eos_token_id, pad=0)]),
                         output_hidden_states=True).hidden_states[-2]
        zs.append(emphasis(encoder.text_model.final_layer_norm(hidden), mults))
    return torch.hstack(zs), backtracks


# ---- leansd -------------------------------------------------------------------------------------

COMMAS = ", ".join(f"a red fox number {i} in deep snow" for i in range(14))  # ~130 tokens, commas everywhere
PROMPTS = {
    "long, comma backtracks": COMMAS,
    "emphasis": "a (red fox:1.3) in the [snow], ((forest)), (small:0.6) house, [[blurry]]",
    "long with emphasis": f"({COMMAS}:1.2), (a sharp photograph:0.8)",
    "BREAK": "a red fox BREAK (snowy forest:1.4) BREAK",
    "BREAK first": "BREAK a red fox",
    "one run of 90 tokens": " ".join(["fox"] * 90),
    "empty": "",
}


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory) -> Engine:
    path = write_tiny_single_file(tmp_path_factory.mktemp("xl") / "xl.safetensors", family=ModelFamily.SDXL)
    return Engine(load_model(path), device="cpu", precision="full", prompt_cache=False)


@pytest.fixture(scope="module")
def sd2(tmp_path_factory) -> Engine:
    path = write_tiny_single_file(tmp_path_factory.mktemp("sd2") / "sd2.safetensors", family=ModelFamily.SD2)
    return Engine(load_model(path, prediction_type="epsilon"), device="cpu", precision="full", prompt_cache=False)


def ours(engine: Engine, prompt: str):
    from leansd.pipelines.steps import PromptConditioning

    request = GenerationRequest(prompt=prompt, negative_prompt="blurry", width=64, height=64,
                                prompt_syntax="a1111").validated()
    return PromptConditioning(engine, request).plan(1).at(0)


def test_the_reference_exercises_the_rules(sdxl):
    tok = sdxl.bundle.tokenizer
    ids, _mults, backtracks = tokenize_line(tok, COMMAS)
    assert len(ids) == 2 and backtracks == 1 and all(len(c) == 77 for c in ids)
    assert ids[0][ids[0].index(tok.eos_token_id) - 1] == tok.get_vocab()[",</w>"]  # cut after a comma
    ids, _mults, _ = tokenize_line(tok, PROMPTS["BREAK first"])
    assert len(ids) == 2 and ids[0] == [tok.bos_token_id] + [tok.eos_token_id] * 76
    assert parse_prompt_attention("a (b:1.3) [c] ((d))") == [["a ", 1.0], ["b", 1.3], [" ", 1.0],
                                                             ["c", 1 / 1.1], [" ", 1.0], ["d", 1.1 * 1.1]]


@pytest.mark.parametrize("name", list(PROMPTS))
def test_sdxl_conditioning_equals_a1111(sdxl, name):
    prompt = PROMPTS[name]
    expected, expected_pooled, _ = a1111_sdxl(sdxl.bundle, prompt)
    step = ours(sdxl, prompt)
    (cond,), (pooled,) = step.conds, step.pooled_conds
    assert cond.shape == expected.shape and cond.shape[-1] == 64  # 32 (CLIP-L) + 32 (bigG), tiny widths
    torch.testing.assert_close(cond, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pooled, expected_pooled, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(PROMPTS))
def test_sd2_conditioning_equals_a1111(sd2, name):
    prompt = PROMPTS[name]
    expected, _ = a1111_sd2(sd2.bundle, prompt)
    (cond,) = ours(sd2, prompt).conds
    assert cond.shape == expected.shape
    torch.testing.assert_close(cond, expected, rtol=1e-5, atol=1e-5)


def test_emphasis_is_not_inert_on_either_sdxl_encoder(sdxl):
    """(fox:1.5) changes both halves of the features (each encoder is weighted), never the pooled one."""
    plain, weighted = ours(sdxl, "a red fox in the snow"), ours(sdxl, "a red (fox:1.5) in the snow")
    diff = (plain.conds[0] - weighted.conds[0]).abs()
    assert diff[..., :32].max() > 1e-3 and diff[..., 32:].max() > 1e-3
    torch.testing.assert_close(plain.pooled_conds[0], weighted.pooled_conds[0], rtol=0, atol=0)
