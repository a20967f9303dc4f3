"""Textual-inversion embeddings and text-encoder LoRAs reach both of SDXL's text encoders (tiny models, CPU)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from leansd import Engine, GenerationRequest
from leansd.models.family import ModelFamily
from leansd.models.library import ModelLibrary
from leansd.models.loader import load_model
from leansd.models.lora import ActiveLora, module_index, read_lora
from leansd.models.tiny import write_tiny_single_file
from leansd.prompts.encode import chunk_tokens, encode_chunks_pooled
from leansd.prompts.parse import Fragment

SIZE = 64


@pytest.fixture(autouse=True)
def _hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LEANSD_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Engine:
    root = tmp_path_factory.mktemp("sdxl-networks")
    checkpoint = write_tiny_single_file(root / "tiny-sdxl.safetensors", family=ModelFamily.SDXL)
    eng = Engine(load_model(checkpoint), device="cpu", precision="full", prompt_cache=False)
    b = eng.bundle
    ids = b.tokenizer("cat", add_special_tokens=False).input_ids
    first = b.text_encoder.get_input_embeddings().weight.detach()[ids].clone()  # type: ignore[operator]
    second = b.text_encoder_2.get_input_embeddings().weight.detach()[ids].clone()  # type: ignore[union-attr,operator]
    folder = root / "embeddings"
    folder.mkdir()
    save_file({"clip_l": first, "clip_g": second}, str(folder / "mycat.safetensors"))
    save_file({"clip_l": first, "clip_g": torch.zeros_like(second)}, str(folder / "halfcat.safetensors"))
    save_file({"emb_params": first}, str(folder / "sd15cat.safetensors"))  # SD 1.x: no clip_g
    eng.library = ModelLibrary(data_dir=root)
    return eng


def _image(engine: Engine, prompt: str) -> np.ndarray:
    req = GenerationRequest(prompt=prompt, width=SIZE, height=SIZE, num_inference_steps=2, seed=7)
    return np.asarray(engine.generate(req, progress_bar=False).images[0])


def test_an_sdxl_embedding_feeds_both_encoders(engine: Engine):
    assert engine.embeddings.get("sd15cat") is None  # skipped on SDXL, as A1111: it has no clip_g vectors
    assert engine.embeddings.get("mycat") is not None
    reference = _image(engine, "a photo of cat")
    same = _image(engine, "a photo of mycat")
    np.testing.assert_array_equal(same, reference)  # its vectors are the token's in both encoders
    half = _image(engine, "a photo of halfcat")  # right clip_l, zero clip_g: the second encoder sees it
    assert np.abs(half.astype(int) - reference.astype(int)).max() > 0


def _lora_for(encoder: torch.nn.Module, prefix: str, path: Path) -> Path:
    g = torch.Generator().manual_seed(3)
    state = {}
    for key, module in module_index(encoder, "te").items():
        if key.endswith(("q_proj", "v_proj")):
            w = module.weight
            state[f"{prefix}{key}.lora_down.weight"] = torch.randn((2, w.shape[1]), generator=g) * 0.5
            state[f"{prefix}{key}.lora_up.weight"] = torch.randn((w.shape[0], 2), generator=g) * 0.5
            state[f"{prefix}{key}.alpha"] = torch.tensor(2.0)
    save_file(state, str(path))
    return path


def test_text_encoder_loras_reach_each_sdxl_encoder(engine: Engine, tmp_path: Path):
    b = engine.bundle
    d1 = b.text_encoder.config.hidden_size
    chunks = chunk_tokens(b.tokenizer, (Fragment("a photo of a cat", 1.0),))

    def encode() -> torch.Tensor:
        z, _ = encode_chunks_pooled(chunks, text_encoder=engine.placed_text_encoder(), device="cpu")
        return z

    plain = encode()
    fingerprint = engine.text_encoder_fingerprint()
    for target, encoder in (("te1", b.text_encoder), ("te2", b.text_encoder_2)):
        lora = read_lora(_lora_for(encoder, f"lora_{target}_", tmp_path / f"{target}.safetensors"), name=target)
        assert lora.targets == {target}
        engine.set_loras([ActiveLora(lora, te=1.0, unet=1.0)])
        try:
            z = encode()
            assert engine.text_encoder_fingerprint() != fingerprint  # the prompt cache tells them apart
        finally:
            engine.set_loras([])
        changed_first = not torch.equal(z[..., :d1], plain[..., :d1])
        changed_second = not torch.equal(z[..., d1:], plain[..., d1:])
        assert (changed_first, changed_second) == ((True, False) if target == "te1" else (False, True))
    torch.testing.assert_close(encode(), plain, rtol=0, atol=0)  # removed exactly
