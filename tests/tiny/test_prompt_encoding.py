"""Prompt encoding on a tiny CLIP text encoder: bit-exact plain prompts, A1111 emphasis, blocks,
chunking, schedules, AND, composable guidance, and the cache keeping the encoder untouched."""

from __future__ import annotations

import pytest
import torch

from leansd.models.tiny import TINY_TEXT_CONFIG
from leansd.models.tokenizer import bundled_tokenizer, count_tokens
from leansd.prompts import PromptCache, build_conditioning, combine_guidance, text_encoder_fingerprint
from leansd.prompts.encode import chunk_tokens, encode_prompts
from leansd.prompts.parse import BREAK, Fragment

BOS, EOS = 49406, 49407


def _text_encoder(seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPTextModel(CLIPTextConfig(**TINY_TEXT_CONFIG))
    return model.eval()


@pytest.fixture(scope="module")
def tokenizer():
    return bundled_tokenizer()


@pytest.fixture(scope="module")
def encoder():
    return _text_encoder(0)


def plain(texts, tokenizer, encoder):
    """Today's plain encoding, the reference."""
    return encode_prompts(texts, tokenizer=tokenizer, text_encoder=encoder, device="cpu")


def build(prompt, negative="", *, tokenizer, encoder, steps=1, syntax="auto", **kwargs):
    return build_conditioning(
        prompt, negative, steps=steps, syntax=syntax, tokenizer=tokenizer, text_encoder=encoder, device="cpu", **kwargs
    )


def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False).input_ids


# ------------------------------------------------------------------ plain prompts are bit-identical

PLAIN = ["a red fox in the snow", "", "A photo of an Astronaut, riding a horse!", "東京の猫 café", "  spaced  out "]


@pytest.mark.parametrize("syntax", ["auto", "a1111", "plain"])
def test_plain_prompt_is_bit_identical_to_encode_prompts(tokenizer, encoder, syntax, tmp_path):
    for text in PLAIN:
        cache = PromptCache(tmp_path)
        for _ in range(2):  # encoded, then from the cache
            plan = build(text, "blurry", tokenizer=tokenizer, encoder=encoder, syntax=syntax, cache=cache)
            step = plan.at(0)
            assert plan.chunks == 1 and step.weights == (1.0,)
            assert torch.equal(step.conds[0], plain([text], tokenizer, encoder))
            assert torch.equal(step.uncond, plain(["blurry"], tokenizer, encoder))
        assert not plan.needs_text_encoder


# ------------------------------------------------------------------ A1111 emphasis


def test_emphasis_matches_an_independent_computation(tokenizer, encoder):
    plan = build("a (red:1.5) [fox] ((jumps))", tokenizer=tokenizer, encoder=encoder)
    # The same rule written out: weights per token, scale, restore the chunk mean.
    pieces = [("a ", 1.0), ("red", 1.5), (" ", 1.0), ("fox", 1 / 1.1), (" ", 1.0), ("jumps", 1.21)]
    ids, weights = [BOS], [1.0]
    for text, w in pieces:
        for token in _ids(tokenizer, text):
            ids.append(token)
            weights.append(w)
    ids += [EOS] * (77 - len(ids))
    weights += [1.0] * (77 - len(weights))
    with torch.no_grad():
        z = encoder(torch.tensor([ids]))[0][0]  # (77, D)
    original_mean = z.mean()
    z = z * torch.tensor(weights)[:, None]
    z = z * (original_mean / z.mean())
    got = plan.at(0).conds[0][0]
    assert not torch.allclose(got, plain(["a red fox jumps"], tokenizer, encoder)[0])
    torch.testing.assert_close(got, z, rtol=1e-5, atol=1e-6)


def test_emphasis_is_per_chunk(tokenizer, encoder):
    text = " ".join(["cat"] * 80) + " (dog:1.4)"
    z = build(text, tokenizer=tokenizer, encoder=encoder).at(0).conds[0]
    assert z.shape == (1, 154, 32)
    first = plain([" ".join(["cat"] * 75)], tokenizer, encoder)
    torch.testing.assert_close(z[:, :77], first, rtol=1e-5, atol=1e-6)  # chunk 1 has no weights


# ------------------------------------------------------------------ weight blocks


@pytest.mark.parametrize(
    ("prompt", "blocks"),
    [
        ("tabby cat:0.25 white duck:0.75 hybrid", [("tabby cat", 0.125), ("white duck", 0.375), ("hybrid", 0.5)]),
        ("picture of:1 small:0.5 cat:2", [("picture of", 1 / 3.5), ("small", 0.5 / 3.5), ("cat", 2 / 3.5)]),
        ("cat:1 dog:-0.5", [("cat", 2.0), ("dog", -1.0)]),
    ],
)
def test_blocks_are_the_weighted_average(tokenizer, encoder, prompt, blocks):
    plan = build(prompt, prompt, tokenizer=tokenizer, encoder=encoder)
    assert plan.syntax == plan.negative_syntax == "blocks"
    encoded = plain([t for t, _ in blocks], tokenizer, encoder)
    expected = sum(w * encoded[i : i + 1] for i, (_, w) in enumerate(blocks))
    torch.testing.assert_close(plan.at(0).conds[0], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(plan.at(0).uncond, expected, rtol=1e-5, atol=1e-6)  # negative too


def test_single_block_equals_its_text(tokenizer, encoder):
    plan = build("a cat:1.5", tokenizer=tokenizer, encoder=encoder)
    assert torch.equal(plan.at(0).conds[0], plain(["a cat"], tokenizer, encoder))


# ------------------------------------------------------------------ chunking


def test_100_token_prompt_gives_two_chunks_and_a_padded_negative(tokenizer, encoder):
    text = " ".join(["cat"] * 100)
    assert count_tokens(tokenizer, text) == 100
    plan = build(text, "blurry", tokenizer=tokenizer, encoder=encoder)
    step = plan.at(0)
    assert plan.chunks == 2
    assert step.conds[0].shape == step.uncond.shape == (1, 154, 32)
    torch.testing.assert_close(step.conds[0][:, :77], plain([" ".join(["cat"] * 75)], tokenizer, encoder))
    torch.testing.assert_close(step.conds[0][:, 77:], plain([" ".join(["cat"] * 25)], tokenizer, encoder))
    assert torch.equal(step.uncond[:, :77], plain(["blurry"], tokenizer, encoder))
    assert torch.equal(step.uncond[:, 77:], plain([""], tokenizer, encoder))  # padding = the empty prompt
    assert step.context(2).shape == (4, 154, 32)


def test_long_negative_pads_the_prompt(tokenizer, encoder):
    plan = build("a cat", ", ".join(["ugly"] * 60), tokenizer=tokenizer, encoder=encoder)
    assert plan.chunks == 2
    cond = plan.at(0).conds[0]
    assert torch.equal(cond[:, :77], plain(["a cat"], tokenizer, encoder))
    assert torch.equal(cond[:, 77:], plain([""], tokenizer, encoder))


def test_chunks_break_after_a_nearby_comma(tokenizer):
    cat, dog, comma = _ids(tokenizer, "cat")[0], _ids(tokenizer, "dog")[0], _ids(tokenizer, ",")[0]
    chunks = chunk_tokens(tokenizer, [Fragment(" ".join(["cat"] * 60) + ", " + " ".join(["dog"] * 30), 1.0)])
    assert chunks.count == 2
    assert chunks.ids[0] == (BOS, *[cat] * 60, comma, EOS) + (EOS,) * 14  # cut after the comma
    assert chunks.ids[1] == (BOS, *[dog] * 30, EOS) + (EOS,) * 45
    far = chunk_tokens(tokenizer, [Fragment(" ".join(["cat"] * 50) + ", " + " ".join(["dog"] * 40), 1.0)])
    assert far.ids[0] == (BOS, *[cat] * 50, comma, *[dog] * 24, EOS)  # comma 25 tokens back: plain cut
    assert far.ids[1] == (BOS, *[dog] * 16, EOS) + (EOS,) * 59
    assert len(chunk_tokens(tokenizer, [Fragment(" ".join(["cat"] * 75), 1.0)]).ids) == 1


def test_break_starts_a_new_chunk(tokenizer, encoder):
    chunks = chunk_tokens(tokenizer, [Fragment("a cat", 1.0), BREAK, Fragment("a dog", 1.2)])
    assert chunks.count == 2
    assert chunks.ids[0] == (BOS, *_ids(tokenizer, "a cat"), EOS) + (EOS,) * 73
    assert chunks.multipliers[1][:4] == (1.0, 1.2, 1.2, 1.0)
    plan = build("a cat BREAK a dog", tokenizer=tokenizer, encoder=encoder)
    cond = plan.at(0).conds[0]
    assert plan.chunks == 2
    torch.testing.assert_close(cond[:, :77], plain(["a cat"], tokenizer, encoder), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cond[:, 77:], plain(["a dog"], tokenizer, encoder), rtol=1e-5, atol=1e-6)
    assert chunk_tokens(tokenizer, [BREAK]).count == 1  # BREAK closes even an empty chunk


# ------------------------------------------------------------------ schedules and AND


def test_prompt_editing_switches_the_conditioning(tokenizer, encoder):
    # A1111's switch points: 0.25 of 4 steps -> 1 (cat for steps 0-1), 2 -> ugly for steps 0-2.
    plan = build("[a cat:a dog:0.25]", "[ugly:pretty:2]", tokenizer=tokenizer, encoder=encoder, steps=4)
    cat, dog, ugly, pretty = plain(["a cat", "a dog", "ugly", "pretty"], tokenizer, encoder).split(1)
    assert [torch.equal(plan.at(i).conds[0], cat) for i in range(4)] == [True, True, False, False]
    assert [torch.equal(plan.at(i).conds[0], dog) for i in range(4)] == [False, False, True, True]
    assert [torch.equal(plan.at(i).uncond, ugly) for i in range(4)] == [True, True, True, False]
    assert torch.equal(plan.at(3).uncond, pretty)
    assert plan.at(0) is plan.at(1) and not plan.is_static
    with pytest.raises(IndexError):
        plan.at(4)


def test_alternation_and_and_weights(tokenizer, encoder):
    plan = build("a [cat|dog] AND a tree :0.5", tokenizer=tokenizer, encoder=encoder, steps=3)
    cat, dog, tree, empty = plain(["a cat ", "a dog ", " a tree", ""], tokenizer, encoder).split(1)
    for i, first in enumerate([cat, cat, dog]):  # A1111's order: a, a, b, a, ...
        step = plan.at(i)
        assert step.weights == (1.0, 0.5)
        assert torch.equal(step.conds[0], first) and torch.equal(step.conds[1], tree)
        # Encoded alone vs in a batch of four: equal up to the batch's summation order.
        torch.testing.assert_close(step.uncond, empty, rtol=1e-5, atol=1e-6)
    assert plan.is_composable
    context = plan.at(2).context(2)  # [uncond x2; cond_1 x2; cond_2 x2]
    assert context.shape == (6, 77, 32)
    for row, expected in enumerate([plan.at(2).uncond, plan.at(2).uncond, dog, dog, tree, tree]):
        assert torch.equal(context[row : row + 1], expected)
    assert plan.at(1).context(1, include_uncond=False).shape == (2, 77, 32)


def test_each_distinct_text_is_encoded_once(tokenizer):
    encoder = _text_encoder(0)
    calls = []
    encoder.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    plan = build("[cat|dog] AND [dog|cat] AND cat", "cat", tokenizer=tokenizer, encoder=encoder, steps=10)
    assert len(calls) == 2  # "cat" and "dog", nothing else (no padding needed)
    assert plan.needs_text_encoder and plan.cache_stats.hits == 0


def test_plan_to_casts_once_and_keeps_sharing(tokenizer, encoder):
    plan = build("[a|b]", tokenizer=tokenizer, encoder=encoder, steps=4).to(dtype=torch.float16)
    assert plan.at(0).conds[0].dtype == torch.float16
    assert plan.at(0) is plan.at(1) is plan.at(3) and plan.at(0).uncond is plan.at(2).uncond  # a, a, b, a


# ------------------------------------------------------------------ composable guidance


def test_combine_guidance_with_one_part_is_classic_cfg_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    u, c = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    assert torch.equal(combine_guidance(u, [c], [1.0], 7.5), u + 7.5 * (c - u))
    uh, ch = u.half(), c.half()
    assert torch.equal(combine_guidance(uh, [ch], [1.0], 7.5), uh + 7.5 * (ch - uh))


def test_combine_guidance_sums_weighted_parts():
    g = torch.Generator().manual_seed(1)
    u, c1, c2 = (torch.randn(1, 4, 8, 8, generator=g) for _ in range(3))
    expected = u + 5.0 * (1.0 * (c1 - u) + 0.5 * (c2 - u))
    torch.testing.assert_close(combine_guidance(u, [c1, c2], [1.0, 0.5], 5.0), expected)
    torch.testing.assert_close(combine_guidance(u, [c1, c2], [0.0, -1.0], 2.0), u - 2.0 * (c2 - u))
    with pytest.raises(ValueError, match="one weight per"):
        combine_guidance(u, [c1, c2], [1.0], 5.0)
    with pytest.raises(ValueError):
        combine_guidance(u, [], [], 5.0)


# ------------------------------------------------------------------ the cache keeps the encoder untouched


class _Untouchable(Exception):
    pass


def _forbid(*args, **kwargs):
    raise _Untouchable("the text encoder was used")


PROMPT, NEGATIVE = "a [cat|dog] AND (tree:1.2) :0.5, " + ", ".join(["leaf"] * 40), "tabby:0.3 blurry:0.7"


def test_full_cache_hit_never_touches_the_encoder(tokenizer, tmp_path):
    encoder = _text_encoder(0)
    cache = PromptCache(tmp_path)
    first = build(PROMPT, NEGATIVE, tokenizer=tokenizer, encoder=encoder, steps=3, cache=cache)
    assert first.needs_text_encoder and first.cache_stats.written == first.cache_stats.misses > 0
    assert first.chunks == 2

    encoder.forward = _forbid  # instance attributes: any call or move now raises
    encoder.to = _forbid
    encoder.cuda = _forbid
    with pytest.raises(_Untouchable):  # the trap works: a miss reaches the encoder
        build(PROMPT, NEGATIVE, tokenizer=tokenizer, encoder=encoder, steps=3, cache=PromptCache(tmp_path / "other"))
    second = build(PROMPT, NEGATIVE, tokenizer=tokenizer, encoder=encoder, steps=3, cache=PromptCache(tmp_path))
    assert not second.needs_text_encoder
    assert second.cache_stats.misses == 0 and second.cache_stats.hits == first.cache_stats.misses
    for i in range(3):
        a, b = first.at(i), second.at(i)
        assert torch.equal(a.uncond, b.uncond) and a.weights == b.weights
        assert all(torch.equal(x, y) for x, y in zip(a.conds, b.conds, strict=True))


def test_lazy_encoder_is_loaded_only_on_a_miss(tokenizer, tmp_path):
    encoder = _text_encoder(0)
    fingerprint = text_encoder_fingerprint(encoder)
    loads = []

    def load():
        loads.append(1)
        return encoder

    cache = PromptCache(tmp_path)
    kwargs = dict(tokenizer=tokenizer, encoder=load, steps=2, cache=cache, encoder_fingerprint=fingerprint)
    first = build("[a|b] c", "d", **kwargs)
    assert loads == [1] and first.needs_text_encoder  # several misses, one load
    second = build("[a|b] c", "d", **kwargs)
    assert loads == [1] and not second.needs_text_encoder
    build("[a|b] c", "e", **kwargs)
    assert loads == [1, 1]


def test_different_weights_miss(tokenizer, tmp_path):
    cache = PromptCache(tmp_path)
    a = build("a red fox", tokenizer=tokenizer, encoder=_text_encoder(0), cache=cache)
    b = build("a red fox", tokenizer=tokenizer, encoder=_text_encoder(1), cache=cache)
    assert b.needs_text_encoder and b.cache_stats.hits == 0 and b.cache_stats.misses == 2
    assert not torch.allclose(a.at(0).conds[0], b.at(0).conds[0])


def test_corrupt_entry_is_re_encoded_and_rewritten(tokenizer, encoder, tmp_path):
    cache = PromptCache(tmp_path)
    build("a red fox", tokenizer=tokenizer, encoder=encoder, cache=cache)
    for path, _, _ in cache.entries():
        path.write_bytes(path.read_bytes()[:100])
    again = build("a red fox", tokenizer=tokenizer, encoder=encoder, cache=cache)
    assert again.needs_text_encoder and again.cache_stats.corrupt == 2 and again.cache_stats.written == 2
    assert torch.equal(again.at(0).conds[0], plain(["a red fox"], tokenizer, encoder))
    third = build("a red fox", tokenizer=tokenizer, encoder=encoder, cache=cache)
    assert not third.needs_text_encoder and third.cache_stats.hits == 2


def test_no_cache_still_encodes_once(tokenizer, encoder):
    plan = build("a cat", "a cat", tokenizer=tokenizer, encoder=encoder)
    assert plan.at(0).uncond is plan.at(0).conds[0]
    assert plan.needs_text_encoder and plan.cache_stats.hits == plan.cache_stats.written == 0
