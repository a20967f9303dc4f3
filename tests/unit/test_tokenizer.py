"""The bundled CLIP tokenizer: real CLIP ids, text cleaning, save/reload, broken folders."""

from __future__ import annotations

import json

import pytest
import torch

from leansd.errors import ModelLoadError
from leansd.models import tokenizer as tk

ASTRONAUT = "a photograph of an astronaut riding a horse"
ASTRONAUT_IDS = [49406, 320, 8853, 539, 550, 18376, 6765, 320, 4558, 49407]


@pytest.fixture(scope="module")
def tok():
    return tk.load_tokenizer()


def ids_of(tokenizer, text: str) -> list[int]:
    return tk.tokenize(tokenizer, [text])[0].tolist()


def test_constants_and_special_ids(tok):
    assert len(tok) == tk.CLIP_VOCAB_SIZE == 49408
    assert tok.bos_token_id == tk.BOS_ID == 49406
    assert tok.eos_token_id == tk.EOS_ID == 49407
    assert tok.pad_token_id == 49407
    assert tk.MAX_LENGTH == 77
    assert tok.model_max_length == 77


def test_known_prompt_ids_and_padding(tok):
    ids = tk.tokenize(tok, [ASTRONAUT])
    assert ids.shape == (1, 77)
    assert ids.dtype == torch.long
    assert ids[0].tolist() == ASTRONAUT_IDS + [49407] * (77 - len(ASTRONAUT_IDS))
    assert tk.count_tokens(tok, ASTRONAUT) == len(ASTRONAUT_IDS) - 2


def test_batch_and_empty(tok):
    ids = tk.tokenize(tok, [ASTRONAUT, ""])
    assert ids.shape == (2, 77)
    assert ids[1].tolist() == [49406] + [49407] * 76
    assert tk.tokenize(tok, []).shape == (0, 77)
    with pytest.raises(TypeError):
        tk.tokenize(tok, ASTRONAUT)  # type: ignore[arg-type]


def test_truncation_keeps_bos_75_eos(tok):
    long_prompt = " ".join(["horse"] * 200)
    assert tk.count_tokens(tok, long_prompt) == 200
    ids = tk.tokenize(tok, [long_prompt])[0].tolist()
    assert len(ids) == 77
    assert ids[0] == 49406 and ids[-1] == 49407
    assert ids[1:76] == [4558] * 75


@pytest.mark.parametrize(
    ("odd", "plain"),
    [
        ("A PHOTOGRAPH OF AN ASTRONAUT", "a photograph of an astronaut"),
        ("ａｓｔｒｏｎａｕｔ", "astronaut"),  # full-width
        ("ﬁne ﬂowers", "fine flowers"),  # ligatures
        ("salt &amp; pepper", "salt & pepper"),  # HTML entity
        ("salt &amp;amp; pepper", "salt & pepper"),  # double-escaped entity
        ("cafÃ© au lait", "café au lait"),  # UTF-8 read as Latin-1 (mojibake)
        ("â€œquotedâ€\x9d text", '"quoted" text'),  # mojibake of curly quotes
        ("  a \t horse\n\n riding  ", "a horse riding"),  # whitespace runs
    ],
)
def test_unusual_text_matches_plain_form(tok, odd, plain):
    assert ids_of(tok, odd) == ids_of(tok, plain)


def test_clean_text():
    assert tk.clean_text("  ﬁne&amp;amp;ｄａｎｄｙ \n\t cafÃ©  ") == "fine&dandy café"
    assert tk.clean_text("Keep Case") == "Keep Case"


def test_bundled_returns_fresh_objects():
    a, b = tk.bundled_tokenizer(), tk.bundled_tokenizer()
    assert a is not b
    a.add_tokens(["<my-embedding>"])
    assert len(a) == 49409 and len(b) == 49408


def test_sdxl_second_tokenizer_pads_with_bang():
    tok2 = tk.bundled_tokenizer(pad_token="!")
    assert tok2.pad_token_id == 0
    ids = ids_of(tok2, ASTRONAUT)
    assert ids == ASTRONAUT_IDS + [0] * (77 - len(ASTRONAUT_IDS))


def test_save_and_reload_offline(tok, tmp_path):
    folder = tmp_path / "tokenizer"
    tk.save_tokenizer(tok, folder)
    again = tk.load_tokenizer(folder)
    assert len(again) == 49408
    texts = [ASTRONAUT, "ﬁne ＨＯＲＳＥ &amp; cafÃ©", " ".join(["astronaut"] * 100)]
    assert torch.equal(tk.tokenize(again, texts), tk.tokenize(tok, texts))


def test_folder_with_added_tokens_loads(tmp_path):
    tok = tk.bundled_tokenizer()
    tok.add_tokens(["<my-embedding>", "<my-embedding>_1"])  # what a textual-inversion save leaves
    tk.save_tokenizer(tok, tmp_path / "tokenizer")
    again = tk.load_tokenizer(tmp_path / "tokenizer")
    assert len(again) == 49410 and again.vocab_size == 49408
    assert ids_of(again, ASTRONAUT) == ids_of(tk.bundled_tokenizer(), ASTRONAUT)


def test_old_style_vocab_and_merges_folder(tok, tmp_path):
    vocab, merges = tk._bpe_data()
    (tmp_path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
    lines = ["#version: 0.2"] + [" ".join(m) for m in merges]
    (tmp_path / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    loaded = tk.load_tokenizer(tmp_path)
    assert ids_of(loaded, ASTRONAUT) == ids_of(tok, ASTRONAUT)


def test_two_entry_tokenizer_folder_is_refused(tmp_path):
    from transformers import CLIPTokenizerFast

    broken = CLIPTokenizerFast()  # what the offline trap hands back: 2 entries
    assert len(broken) == 2
    broken.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="49408") as info:
        tk.load_tokenizer(tmp_path)
    assert "\n" not in str(info.value)


def test_unreadable_folders_are_refused(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        tk.load_tokenizer(tmp_path / "missing")
    with pytest.raises(ModelLoadError, match="no tokenizer files"):
        tk.load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ModelLoadError, match="cannot load") as info:
        tk.load_tokenizer(tmp_path)
    assert "\n" not in str(info.value)
