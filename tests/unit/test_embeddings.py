"""Textual-inversion embeddings: formats, names in prompts, emphasis, chunking, cache key, bad files."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from leansd import Engine, GenerationRequest
from leansd.errors import ModelLoadError
from leansd.models.embeddings import EmbeddingStore, read_embedding
from leansd.models.library import ModelLibrary
from leansd.models.tokenizer import bundled_tokenizer
from leansd.prompts.encode import MAX_CONTENT_TOKENS, chunk_tokens
from leansd.prompts.parse import Fragment
from tests.helpers import tiny_bundle

WIDTH = 32  # the tiny text encoder's hidden size


def _vectors(n: int, seed: int, width: int = WIDTH) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


@pytest.fixture()
def library(tmp_path: Path) -> ModelLibrary:
    folder = tmp_path / "embeddings"
    (folder / "neg").mkdir(parents=True)
    torch.save({"string_to_param": {"*": _vectors(3, 1)}, "name": "stored-name", "step": 500,
                "string_to_token": {"*": 265}, "sd_checkpoint_name": "x"}, folder / "badhands.pt")
    save_file({"emb_params": _vectors(2, 2)}, str(folder / "style-x.safetensors"))
    save_file({"emb_params": _vectors(1, 3)}, str(folder / "neg" / "blurfix.safetensors"))
    save_file({"emb_params": _vectors(2, 4, width=768)}, str(folder / "sd15only.safetensors"))
    save_file({"clip_l": _vectors(2, 5, 768), "clip_g": _vectors(2, 6, 1280)}, str(folder / "xl.safetensors"))
    return ModelLibrary(data_dir=tmp_path)


def test_formats(tmp_path: Path):
    pt = tmp_path / "a.pt"
    torch.save({"string_to_param": {"*": _vectors(3, 1)}, "name": "other"}, pt)
    emb = read_embedding(pt)
    assert emb.name == "a" and emb.count == 3  # the stem, not the stored name
    assert torch.equal(emb.for_encoder("te"), _vectors(3, 1))
    bin_ = tmp_path / "learned_embeds.bin"
    torch.save({"<cat-toy>": _vectors(1, 2)[0]}, bin_)  # diffusers: one (D,) vector
    assert read_embedding(bin_).count == 1
    xl = tmp_path / "xl.safetensors"
    save_file({"clip_l": _vectors(2, 5, 768), "clip_g": _vectors(2, 6, 1280)}, str(xl))
    both = read_embedding(xl)
    assert both.count == 2 and both.for_encoder("clip_g").shape == (2, 1280)


def test_bad_files(tmp_path: Path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as f:
        pickle.dump({"string_to_param": {"*": Evil()}}, f)
    with pytest.raises(ModelLoadError, match="evil.pt"):
        read_embedding(evil)
    truncated = tmp_path / "cut.safetensors"
    save_file({"emb_params": _vectors(2, 1)}, str(truncated))
    truncated.write_bytes(truncated.read_bytes()[:-20])
    with pytest.raises(ModelLoadError, match="cut.safetensors"):
        read_embedding(truncated)
    nan = tmp_path / "nan.safetensors"
    save_file({"emb_params": torch.full((1, 4), float("nan"))}, str(nan))
    with pytest.raises(ModelLoadError, match="NaN"):
        read_embedding(nan)
    other = tmp_path / "model.safetensors"
    save_file({"a": torch.zeros(2), "b": torch.zeros(2)}, str(other))
    with pytest.raises(ModelLoadError, match="not a textual-inversion embedding"):
        read_embedding(other)


def test_store_skips_other_families(library: ModelLibrary):
    store = EmbeddingStore(library, width=WIDTH)
    loaded, skipped = store.status()
    assert sorted(loaded) == ["badhands", "blurfix", "style-x"]
    assert sorted(skipped) == ["sd15only", "xl"]
    assert "width 768" in skipped["sd15only"]


def test_chunking_counts_the_vectors_and_keeps_an_embedding_whole(library: ModelLibrary):
    tokenizer = bundled_tokenizer()
    matcher = EmbeddingStore(library, width=WIDTH).matcher()
    base = len(tokenizer)
    chunks = chunk_tokens(tokenizer, [Fragment("a cat, badhands", 1.0), Fragment("embedding:style-x", 1.2)],
                          embeddings=matcher)
    content = chunks.ids[0][1:]
    cat = tokenizer("a cat,", add_special_tokens=False).input_ids
    assert list(content[: len(cat) + 5]) == cat + [base, base + 1, base + 2, base + 3, base + 4]
    assert chunks.multipliers[0][1 + len(cat) + 3: 1 + len(cat) + 5] == (1.2, 1.2)
    assert [e.name for e in chunks.embeddings] == ["badhands", "style-x"] and chunks.embedding_base == base
    # 74 tokens then a 3-vector embedding: it does not fit, so it opens the second chunk.
    words = " ".join(["cat"] * 74)
    long = chunk_tokens(tokenizer, [Fragment(words + " BadHands", 1.0)], embeddings=matcher)  # case-insensitive
    assert long.count == 2 and long.ids[0][75] == tokenizer.eos_token_id and long.ids[1][1:4] == (base, base + 1, base + 2)
    assert MAX_CONTENT_TOKENS == 75
    # Inside another word it is not the embedding.
    assert chunk_tokens(tokenizer, [Fragment("xbadhands", 1.0)], embeddings=matcher).embeddings == ()


def _request(prompt: str, negative: str = "", **kw) -> GenerationRequest:
    base = dict(prompt=prompt, negative_prompt=negative, width=64, height=64, num_inference_steps=3, sampler="DDIM",
                seed=4)
    base.update(kw)
    return GenerationRequest(**base)


def test_embeddings_in_prompts_negative_prompts_and_infotext(library: ModelLibrary, tmp_path: Path):
    from leansd.outputs.infotext import parse_infotext
    from leansd.prompts.cache import PromptCache

    engine = Engine(tiny_bundle(), device="cpu", precision="full", prompt_cache=False, library=library)
    plain = engine.generate(_request("a red fox", "ugly"), progress_bar=False)
    positive = engine.generate(_request("a red fox, badhands", "ugly"), progress_bar=False)
    negative = engine.generate(_request("a red fox", "ugly, blurfix"), progress_bar=False)
    weighted = engine.generate(_request("a red fox, (badhands:1.4)", "ugly"), progress_bar=False)
    comfy = engine.generate(_request("a red fox, embedding:badhands", "ugly"), progress_bar=False)
    for other in (positive, negative, weighted):
        assert np.abs(other.pixels - plain.pixels).max() > 1e-3
    assert np.abs(weighted.pixels - positive.pixels).max() > 1e-4  # emphasis applies to the vectors
    np.testing.assert_array_equal(comfy.pixels, positive.pixels)  # both spellings are the same embedding
    info = parse_infotext(negative.infotexts[0])
    digest = hashlib.sha256((library.folder("embedding") / "neg" / "blurfix.safetensors").read_bytes()).hexdigest()
    assert info["TI hashes"] == f"blurfix: {digest[:12]}"
    # Blocks syntax reads embeddings too.
    blocks = engine.generate(_request("a red fox:1 badhands:1", "ugly"), progress_bar=False)
    assert blocks.info["prompt_syntax"] == "blocks" and np.abs(blocks.pixels - plain.pixels).max() > 1e-3

    # The prompt cache keys embeddings by their vectors: a changed file cannot give a stale hit.
    cache = PromptCache(tmp_path / "cache")
    cached = Engine(tiny_bundle(), device="cpu", precision="full", prompt_cache=cache, library=library)
    first = cached.generate(_request("a red fox, style-x"), progress_bar=False)
    save_file({"emb_params": _vectors(2, 99)}, str(library.folder("embedding") / "style-x.safetensors"))
    second = cached.generate(_request("a red fox, style-x"), progress_bar=False)
    fresh = Engine(tiny_bundle(), device="cpu", precision="full", prompt_cache=False, library=library)
    np.testing.assert_array_equal(second.pixels, fresh.generate(_request("a red fox, style-x"),
                                                                progress_bar=False).pixels)
    assert np.abs(first.pixels - second.pixels).max() > 1e-3
