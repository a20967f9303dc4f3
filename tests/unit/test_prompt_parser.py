"""Prompt syntax parsers: A1111 emphasis/AND/editing/alternation, weight blocks, the auto rule."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings, strategies as st

from leansd.errors import InvalidRequestError
from leansd.prompts.parse import (
    BREAK,
    PROMPT_SYNTAXES,
    BlockBlend,
    Fragment,
    WeightedText,
    normalise_weights,
    parse_attention,
    parse_prompt,
    parse_schedule,
    resolve_syntax,
    schedule_steps,
    scheduled_texts,
    split_and,
    split_weight_blocks,
    switch_step,
)

F = Fragment

# ------------------------------------------------------------------ emphasis (A1111 parse_prompt_attention)

ATTENTION_CASES = [
    # A1111's own doctests
    ("normal text", [F("normal text", 1.0)]),
    ("an (important) word", [F("an ", 1.0), F("important", 1.1), F(" word", 1.0)]),
    ("(unbalanced", [F("unbalanced", 1.1)]),
    ("\\(literal\\]", [F("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [F("unnecessaryparens", 1.1)]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [
            F("a ", 1.0),
            F("house", 1.3 * 1.1 * 1.1),
            F(" ", 1.1),
            F("on", 1.0),
            F(" a ", 1.1),
            F("hill", 0.55),
            F(", sun, ", 1.1),
            F("sky", 1.1 * 1.1 * 1.1 * 1.1),
            F(".", 1.1),
        ],
    ),
    # more
    ("((word))", [F("word", 1.1 * 1.1)]),
    ("[word]", [F("word", 1 / 1.1)]),
    ("[[word]]", [F("word", (1 / 1.1) * (1 / 1.1))]),
    ("(word:1.3)", [F("word", 1.3)]),
    ("(word: 1.3 )", [F("word", 1.3)]),
    ("(word:-1)", [F("word", -1.0)]),
    ("(word:0)", [F("word", 0.0)]),
    ("((a:1.5) b)", [F("a", 1.5 * 1.1), F(" b", 1.1)]),
    ("[(a:2)]", [F("a", 2 / 1.1)]),
    ("unbalanced)", [F("unbalanced)", 1.0)]),
    ("unbalanced]", [F("unbalanced]", 1.0)]),
    ("[unbalanced", [F("unbalanced", 1 / 1.1)]),
    ("a:1.5)", [F("a:1.5)", 1.0)]),
    ("(a:1.2.3)", [F("a:1.2.3", 1.1)]),  # not a number: text, and the bracket closes as (x)
    ("(a:.)", [F("a:.", 1.1)]),
    ("a \\: b", [F("a : b", 1.0)]),
    ("\\\\", [F("\\", 1.0)]),
    ("\\(a\\) (b)", [F("(a) ", 1.0), F("b", 1.1)]),
    ("", [F("", 1.0)]),
    ("http://x.com/(a)", [F("http://x.com/", 1.0), F("a", 1.1)]),
    ("at 12:30 (cat)", [F("at 12:30 ", 1.0), F("cat", 1.1)]),
    ("東京 (猫:1.2) café", [F("東京 ", 1.0), F("猫", 1.2), F(" café", 1.0)]),
    ("a BREAK b", [F("a", 1.0), BREAK, F("b", 1.0)]),
    ("BREAK", [F("", 1.0), BREAK, F("", 1.0)]),
    ("(a BREAK b)", [F("a", 1.1), BREAK, F("b", 1.1)]),
    ("aBREAKb a break b", [F("aBREAKb a break b", 1.0)]),
    ("a BREAK BREAK b", [F("a", 1.0), BREAK, F("", 1.0), BREAK, F("b", 1.0)]),
]


@pytest.mark.parametrize(("text", "expected"), ATTENTION_CASES)
def test_parse_attention(text, expected):
    got = parse_attention(text)
    assert [p if p is BREAK else (p.text, p.weight) for p in got] == [
        p if p is BREAK else (p.text, pytest.approx(p.weight, rel=1e-12)) for p in expected
    ]


def test_attention_overflow_is_a_clear_error():
    big = "9" * 200
    with pytest.raises(InvalidRequestError, match="weights multiply"):
        parse_attention(f"((a:{big}):{big})")


def test_attention_weight_that_is_not_finite_is_text():
    big = "9" * 400  # float() gives inf
    assert parse_attention(f"(a:{big})") == (F(f"a:{big}", 1.1),)


# ------------------------------------------------------------------ prompt editing and alternation

# Prompt -> schedule exactly as AUTOMATIC1111's prompt parser returns it for 10 steps
# (``get_learned_conditioning_prompt_schedules``, A1111 >= 1.6 scheduling, lark 1.3): a list of
# [end_at_step, text]. A1111's sampler then uses, at 0-based model call i, the first entry whose
# end_at_step >= i (``reconstruct_cond_batch``); :func:`a1111_per_call` applies that rule.
A1111_SCHEDULES = [
    ('test', [[10, 'test']]),
    ('a [b:3]', [[3, 'a '], [10, 'a b']]),
    ('a [b: 3]', [[3, 'a '], [10, 'a b']]),
    ('a [[[b]]:2]', [[2, 'a '], [10, 'a [[b]]']]),
    ('[(a:2):3]', [[3, ''], [10, '(a:2)']]),
    ('a [b : c : 1] d', [[1, 'a b  d'], [10, 'a  c  d']]),
    ('a[b:[c:d:2]:1]e', [[1, 'abe'], [2, 'ace'], [10, 'ade']]),
    ('a [unbalanced', [[10, 'a [unbalanced']]),
    ('a [b:.5] c', [[5, 'a  c'], [10, 'a b c']]),
    ('((a][:b:c [d:3]', [[3, '((a][:b:c '], [10, '((a][:b:c d']]),
    ('[a|(b:1.1)]', [[1, 'a'], [2, '(b:1.1)'], [3, 'a'], [4, '(b:1.1)'], [5, 'a'], [6, '(b:1.1)'], [7, 'a'], [8, '(b:1.1)'], [9, 'a'], [10, '(b:1.1)']]),
    ('[fe|]male', [[1, 'female'], [2, 'male'], [3, 'female'], [4, 'male'], [5, 'female'], [6, 'male'], [7, 'female'], [8, 'male'], [9, 'female'], [10, 'male']]),
    ('[fe|||]male', [[1, 'female'], [2, 'male'], [3, 'male'], [4, 'male'], [5, 'female'], [6, 'male'], [7, 'male'], [8, 'male'], [9, 'female'], [10, 'male']]),
    ('[a:b:0.5]', [[5, 'a'], [10, 'b']]),
    ('[a:b:0.25]', [[2, 'a'], [10, 'b']]),
    ('[a:b:0]', [[10, 'b']]),
    ('[a:b:-1]', [[10, 'b']]),
    ('[a:b:10]', [[10, 'a']]),
    ('[a:b:20]', [[10, 'a']]),
    ('[a:b:1e1]', [[10, 'a']]),
    ('[a:b:1]', [[1, 'a'], [10, 'b']]),
    ('[a:b:1.5]', [[10, 'a']]),
    ('[a:b:1.]', [[10, 'a']]),
    ('[a:b: 4 ]', [[4, 'a'], [10, 'b']]),
    ('[a:b:-0.5]', [[10, 'b']]),
    ('x [a::3] y', [[3, 'x a y'], [10, 'x  y']]),
    ('x [:b:3] y', [[3, 'x  y'], [10, 'x b y']]),
    ('[a (b:1.2) c:d:2]', [[2, 'a (b:1.2) c'], [10, 'd']]),
    ('(a [b:c:2])', [[2, '(a b)'], [10, '(a c)']]),
    ('[[a:b:2]]', [[2, '[a]'], [10, '[b]']]),
    ('[a:b:c:2]', [[10, '[a:b:c:2]']]),
    ('[a:b]', [[10, '[a:b]']]),
    ('[a:b:3', [[10, '[a:b:3']]),
    ('\\[a:b:3\\]', [[10, '\\[a:b:3\\]']]),
    ('[a|b|c]', [[1, 'a'], [2, 'b'], [3, 'c'], [4, 'a'], [5, 'b'], [6, 'c'], [7, 'a'], [8, 'b'], [9, 'c'], [10, 'a']]),
    ('[a|]', [[1, 'a'], [2, ''], [3, 'a'], [4, ''], [5, 'a'], [6, ''], [7, 'a'], [8, ''], [9, 'a'], [10, '']]),
    ('[a|b] [c|d|e]', [[1, 'a c'], [2, 'b d'], [3, 'a e'], [4, 'b c'], [5, 'a d'], [6, 'b e'], [7, 'a c'], [8, 'b d'], [9, 'a e'], [10, 'b c']]),
    ('[x [a|b]:y:2]', [[1, 'x a'], [2, 'x b'], [3, 'y'], [4, 'y'], [5, 'y'], [6, 'y'], [7, 'y'], [8, 'y'], [9, 'y'], [10, 'y']]),
    ('a [b:c:0.3] [d|e]', [[1, 'a b d'], [2, 'a b e'], [3, 'a b d'], [4, 'a c e'], [5, 'a c d'], [6, 'a c e'], [7, 'a c d'], [8, 'a c e'], [9, 'a c d'], [10, 'a c e']]),
    ('猫 [犬|鳥]', [[1, '猫 犬'], [2, '猫 鳥'], [3, '猫 犬'], [4, '猫 鳥'], [5, '猫 犬'], [6, '猫 鳥'], [7, '猫 犬'], [8, '猫 鳥'], [9, '猫 犬'], [10, '猫 鳥']]),
    ('a|b', [[10, 'a|b']]),
    ('[a|b:c:3]', [[10, '[a|b:c:3]']]),
    ('x [a:b:2] y|z', [[10, 'x [a:b:2] y|z']]),
    ('[(a:b:c):d:2]', [[10, '[(a:b:c):d:2]']]),
    ('[(a|b)]', [[10, '[(a|b)]']]),
    ('[a:b:2] \\', [[10, '[a:b:2] \\']]),
    ('[a:b:2] \\\\', [[2, 'a \\\\'], [10, 'b \\\\']]),
    ('[(a:2]:b:3]', [[10, '[(a:2]:b:3]']]),
    ('[[a:b]:c:2]', [[10, '[[a:b]:c:2]']]),
    ('[[x|y]:b]', [[1, '[x:b]'], [2, '[y:b]'], [3, '[x:b]'], [4, '[y:b]'], [5, '[x:b]'], [6, '[y:b]'], [7, '[x:b]'], [8, '[y:b]'], [9, '[x:b]'], [10, '[y:b]']]),
    ('([a:b:2]:c:d)', [[2, '(a:c:d)'], [10, '(b:c:d)']]),
    ('[a:b:2][c:d:5]', [[2, 'ac'], [5, 'bc'], [10, 'bd']]),
]


def a1111_per_call(schedule, calls):
    """The text A1111 conditions on at each 0-based model call (first entry with i <= end_at_step)."""
    return [next((text for end, text in schedule if i <= end), schedule[0][1]) for i in range(calls)]


@pytest.mark.parametrize(("text", "schedule"), A1111_SCHEDULES)
def test_schedules_match_a1111(text, schedule):
    assert scheduled_texts(text, 10) == a1111_per_call(schedule, 10)


def test_a1111_switch_step_and_alternation_order():
    # The three places leansd used to differ: [a:b:10] keeps `a` through step 10 (11 steps of 20),
    # alternation starts a, a, b, ... and a decimal point always means a fraction.
    assert scheduled_texts("[a:b:10]", 20) == ["a"] * 11 + ["b"] * 9
    assert scheduled_texts("[a|b]", 5) == ["a", "a", "b", "a", "b"]
    assert scheduled_texts("[a:b:0.5]", 20) == ["a"] * 11 + ["b"] * 9
    assert scheduled_texts("[a:b:1.5]", 20) == ["a"] * 20


# Second-order samplers: A1111 doubles the schedule (SamplerData.total_steps) and counts every
# model call; 10 Heun steps are 19 calls on a 20-step schedule.
HEUN_CASES = [
    ("[a:b:0.5]", ["a"] * 11 + ["b"] * 8),
    ("[a:b:5]", ["a"] * 6 + ["b"] * 13),
    ("[a|b]", ["a", "a"] + ["b", "a"] * 8 + ["b"]),
]


@pytest.mark.parametrize(("text", "expected"), HEUN_CASES)
def test_second_order_samplers_count_model_calls(text, expected):
    steps = schedule_steps(10, second_order=True)
    assert steps == 20
    assert scheduled_texts(text, steps, calls=19) == expected


# Hires-fix second pass (A1111's hires_steps scheduling): a step number counts on from the first
# pass, a fraction covers both passes. Base 20 steps, hires 10: [a:b:25] switches at hires step 5.
HIRES_CASES = [
    ("[a:b:25]", [[5, "a"], [10, "b"]]),
    ("[a:b:1.5]", [[5, "a"], [10, "b"]]),
    ("[a:b:0.5]", [[10, "b"]]),
    ("[a:b:10]", [[10, "b"]]),
    ("[a:b:40]", [[10, "a"]]),
]


@pytest.mark.parametrize(("text", "schedule"), HIRES_CASES)
def test_hires_pass_counts_on_from_the_first_pass(text, schedule):
    assert scheduled_texts(text, 10, base_steps=20) == a1111_per_call(schedule, 10)


def test_img2img_reads_the_head_of_the_full_schedule():
    # A1111 schedules over all 20 steps and its img2img run (strength 0.5) makes 10 calls from 0.
    assert scheduled_texts("[a:b:0.25]", 20, calls=10) == ["a"] * 6 + ["b"] * 4
    schedule = parse_prompt("[a:b:0.25]", syntax="a1111", steps=20, calls=10)
    assert schedule.steps == 10 and len(schedule.per_step) == 10


@pytest.mark.parametrize(
    ("when", "fraction", "steps", "expected"),
    [(0.5, True, 25, 12), (0.5, True, 20, 10), (0.99, True, 10, 9), (10, False, 25, 10), (10.7, False, 25, 10),
     (30, False, 25, 25), (0, False, 25, 0), (-3, False, 25, 0), (math.inf, False, 5, 5), (1, False, 1, 1),
     (0.5, True, 1, 0), (1.5, True, 20, 20), (1.0, True, 20, 20), (-math.inf, True, 5, 0)],
)
def test_switch_step(when, fraction, steps, expected):
    assert switch_step(when, steps, fraction=fraction) == expected


def test_switch_step_hires():
    assert switch_step(25, 10, fraction=False, base_steps=20) == 5
    assert switch_step(1.5, 10, fraction=True, base_steps=20) == 5
    assert switch_step(0.5, 10, fraction=True, base_steps=20) == 0


def test_deeply_nested_schedule_does_not_recurse():
    depth = 3000
    text = "[" * depth + "a:b:1" + "]" * depth
    tree = parse_schedule(text)
    assert tree.text_at(0, 5) == "[" * (depth - 1) + "a" + "]" * (depth - 1)
    assert tree.text_at(2, 5) == "[" * (depth - 1) + "b" + "]" * (depth - 1)
    deep = "(" * depth + "x" + ")" * depth
    assert parse_attention(deep)[0].text == "x"


# ------------------------------------------------------------------ AND (composable diffusion)

AND_CASES = [
    ("a cat AND a dog", [("a cat ", 1.0), (" a dog", 1.0)]),
    ("a cat :0.7 AND a dog: 0.3", [("a cat", 0.7), (" a dog", 0.3)]),
    ("a cat AND a dog :-1", [("a cat ", 1.0), (" a dog", -1.0)]),
    ("a cat AND a dog :+.5", [("a cat ", 1.0), (" a dog", 0.5)]),
    ("cat AND", [("cat ", 1.0), ("", 1.0)]),
    ("a cat:0.5", [("a cat", 0.5)]),  # A1111 weighs a single prompt too
    ("BRAND new", [("BRAND new", 1.0)]),
    ("a cat and a dog", [("a cat and a dog", 1.0)]),
    ("clock at 12:30 AND x", [("clock at 12:30 ", 1.0), (" x", 1.0)]),
    ("ratio 16:9", [("ratio 16:9", 1.0)]),
    ("(cat:1.2) AND dog", [("(cat:1.2) ", 1.0), (" dog", 1.0)]),
    ("[a:b:0.5]", [("[a:b:0.5]", 1.0)]),
    ("a \\:5", [("a \\:5", 1.0)]),
    ("http://x.com AND y", [("http://x.com ", 1.0), (" y", 1.0)]),
    ("x:" + "9" * 400, [("x:" + "9" * 400, 1.0)]),  # weight is not finite: text
]


@pytest.mark.parametrize(("prompt", "expected"), AND_CASES)
def test_split_and(prompt, expected):
    assert split_and(prompt) == expected


# ------------------------------------------------------------------ weight blocks (optimizedSD / lstein)

BLOCK_CASES = [
    ("tabby cat:0.25 white duck:0.75 hybrid", [("tabby cat", 0.25), ("white duck", 0.75), ("hybrid", 1.0)]),
    (
        "picture of:1 small:0.5 cat sitting on:1 big:2 dog",
        [("picture of", 1.0), ("small", 0.5), ("cat sitting on", 1.0), ("big", 2.0), ("dog", 1.0)],
    ),
    ("tabby cat :0.25 white duck", [("tabby cat", 0.25), ("white duck", 1.0)]),
    ("cat:0.5", [("cat", 0.5)]),
    ("cat:-1 dog:2", [("cat", -1.0), ("dog", 2.0)]),
    ("cat:.5 dog", [("cat", 0.5), ("dog", 1.0)]),
    (":0.5 cat", [("cat", 1.0)]),  # an empty block is dropped with its weight
    ("cat:0.5 :0.5 dog", [("cat", 0.5), ("dog", 1.0)]),
    ("", [("", 1.0)]),
    ("   ", [("", 1.0)]),
    ("http://x.com:2 cat", [("http://x.com", 2.0), ("cat", 1.0)]),
    ("http://x.com cat:2", [("http://x.com cat", 2.0)]),
    ("at 12:30 dog:2", [("at 12:30 dog", 2.0)]),
    ("16:9 landscape", [("16:9 landscape", 1.0)]),
    ("a\\:5 b:2", [("a:5 b", 2.0)]),
    ("cat:0.5,dog", [("cat:0.5,dog", 1.0)]),
    ("(cat:0.5) dog:2", [("(cat:0.5) dog", 2.0)]),  # brackets are ordinary characters
    ("cat::0.5 dog", [("cat::0.5 dog", 1.0)]),
    ("猫:0.3 犬:0.7", [("猫", 0.3), ("犬", 0.7)]),
    ("cat:1\ndog:2", [("cat", 1.0), ("dog", 2.0)]),
]


@pytest.mark.parametrize(("prompt", "expected"), BLOCK_CASES)
def test_split_weight_blocks(prompt, expected):
    assert split_weight_blocks(prompt) == expected


@pytest.mark.parametrize(
    ("weights", "expected"),
    [
        ([0.25, 0.75, 1.0], [0.125, 0.375, 0.5]),
        ([1.0, 0.5, 1.0, 2.0, 1.0], [1 / 5.5, 0.5 / 5.5, 1 / 5.5, 2 / 5.5, 1 / 5.5]),
        ([2.0], [1.0]),
        ([1.0, -0.5], [2.0, -1.0]),
        ([1.0, -1.0], [0.5, 0.5]),  # zero sum: equal weights
        ([0.0], [1.0]),
        ([1e308, 1e308], [0.5, 0.5]),  # the sum overflows
        ([], []),
    ],
)
def test_normalise_weights(weights, expected):
    assert normalise_weights(weights) == pytest.approx(expected, rel=1e-12)


# ------------------------------------------------------------------ which syntax applies

AUTO_CASES = [
    ("a red fox", "a1111"),
    ("tabby cat:0.25 white duck:0.75 hybrid", "blocks"),
    ("picture of:1 small:0.5 cat", "blocks"),
    ("a cat:1.5", "blocks"),
    ("a (cat:1.2) on a mat", "a1111"),  # weights inside brackets are emphasis
    ("a [cat:dog:0.5]", "a1111"),  # prompt editing
    ("a cat AND a dog:0.5", "a1111"),  # AND: the weight is composable
    ("a cat:0.5 AND a dog", "a1111"),
    ("clock at 12:30", "a1111"),  # colon after a digit
    ("16:9 landscape", "a1111"),
    ("http://x.com", "a1111"),  # not followed by a number
    ("masterpiece:1.2, cat", "a1111"),  # number not followed by whitespace
    ("(a cat:0.5 dog", "a1111"),  # an unclosed bracket runs to the end
    ("a cat) dog:2", "blocks"),  # a stray closer does not open anything
    ("(cat) dog:2", "blocks"),
    ("x.com:8080 cat", "blocks"),  # ambiguous: a port reads as a weight (escape it: x.com\\:8080)
    ("x.com\\:8080 cat", "a1111"),
    ("", "a1111"),
    ("猫:0.5 犬", "blocks"),
]


@pytest.mark.parametrize(("prompt", "expected"), AUTO_CASES)
def test_resolve_syntax_auto(prompt, expected):
    assert resolve_syntax(prompt, "auto") == expected


@pytest.mark.parametrize("syntax", ["a1111", "blocks", "plain"])
def test_resolve_syntax_explicit(syntax):
    assert resolve_syntax("tabby cat:0.5 (x)", syntax) == syntax


@pytest.mark.parametrize("syntax", ["", "A1111", "compel", "auto "])
def test_resolve_syntax_unknown(syntax):
    with pytest.raises(InvalidRequestError, match="auto, a1111, blocks, plain"):
        resolve_syntax("x", syntax)


# ------------------------------------------------------------------ the whole schedule


def test_plain_text_parses_to_the_same_spec_under_every_syntax():
    specs = {parse_prompt("a red fox", syntax=s, steps=3).at(0) for s in PROMPT_SYNTAXES}
    assert specs == {((WeightedText.plain("a red fox"), 1.0),)}


def test_plain_syntax_does_no_parsing():
    parts = parse_prompt("(cat:1.2) AND [a|b] BREAK x:0.5", syntax="plain", steps=2)
    assert parts.is_static and parts.at(1) == ((WeightedText.plain("(cat:1.2) AND [a|b] BREAK x:0.5"), 1.0),)


def test_blocks_schedule():
    schedule = parse_prompt("tabby cat:0.25 white duck:0.75 hybrid", syntax="auto", steps=4)
    assert schedule.syntax == "blocks" and schedule.is_static
    assert schedule.at(3) == ((BlockBlend((("tabby cat", 0.125), ("white duck", 0.375), ("hybrid", 0.5))), 1.0),)


def test_single_block_is_its_plain_text():
    assert parse_prompt("a cat:1.5", syntax="auto", steps=1).at(0) == ((WeightedText.plain("a cat"), 1.0),)


def test_blocks_with_zero_weight_are_dropped():
    assert parse_prompt("cat:0 dog:1", syntax="blocks", steps=1).at(0) == ((WeightedText.plain("dog"), 1.0),)


def test_and_with_editing_and_alternation():
    schedule = parse_prompt("a [cat|dog] AND (tree:1.3) [x:y:0.5] :0.5", syntax="auto", steps=4)
    assert schedule.syntax == "a1111"

    def tree(end):
        return WeightedText((F(" ", 1.0), F("tree", 1.3), F(end, 1.0)))

    cat, dog = WeightedText.plain("a cat "), WeightedText.plain("a dog ")
    assert [schedule.at(i) for i in range(4)] == [
        ((cat, 1.0), (tree(" x"), 0.5)),  # A1111: alternation a, a, b, a; [x:y:0.5] of 4 steps: x through step 2
        ((cat, 1.0), (tree(" x"), 0.5)),
        ((dog, 1.0), (tree(" x"), 0.5)),
        ((cat, 1.0), (tree(" y"), 0.5)),
    ]
    assert not schedule.is_static
    assert schedule.distinct_specs() == [cat, tree(" x"), dog, tree(" y")]


def test_negative_prompt_has_no_and_or_weight():
    schedule = parse_prompt("ugly AND blurry:0.5", syntax="a1111", steps=2, negative=True)
    assert schedule.at(0) == ((WeightedText((F("ugly AND blurry:0.5", 1.0),)), 1.0),)
    edited = parse_prompt("[ugly:pretty:1]", syntax="a1111", steps=3, negative=True)
    assert [edited.at(i)[0][0].pieces[0].text for i in range(3)] == ["ugly", "ugly", "pretty"]


def test_steps_must_be_positive():
    with pytest.raises(InvalidRequestError, match="steps"):
        parse_prompt("x", steps=0)
    with pytest.raises(IndexError):
        parse_prompt("x", steps=2).at(2)


def test_very_long_prompt_parses_quickly():
    text = ", ".join(f"(word{i}:1.{i % 9}) [a|b] [c:d:0.5]" for i in range(2000))
    schedule = parse_prompt(text, syntax="auto", steps=50)
    assert len(schedule.distinct_specs()) == 4  # a/b x c/d


# ------------------------------------------------------------------ properties

_ATOMS = st.sampled_from(
    ["(", ")", "[", "]", ":", "|", "\\", " ", "AND", "BREAK", "0.5", "1", "-2", ".", "e5", "cat", "12:30",
     "http://x.com", "é", "猫", "\n", ",", "9" * 40, "(x:1.5)", "[a:b:0.3]", "[a|b]", "dog:0.25 "]
)
_PROMPTS = st.one_of(st.lists(_ATOMS, max_size=40).map("".join), st.text(max_size=80))


def _weights(schedule):
    for parts in set(schedule.per_step):
        for spec, weight in parts:
            yield weight
            if isinstance(spec, BlockBlend):
                yield from (w for _, w in spec.blocks)
            else:
                yield from (p.weight for p in spec.pieces if p is not BREAK)


@settings(max_examples=300, deadline=None)
@given(prompt=_PROMPTS, syntax=st.sampled_from(PROMPT_SYNTAXES), steps=st.integers(1, 30), negative=st.booleans())
def test_parser_never_crashes_and_weights_are_finite(prompt, syntax, steps, negative):
    try:
        schedule = parse_prompt(prompt, syntax=syntax, steps=steps, negative=negative)
    except InvalidRequestError as exc:  # the one documented failure: weights that overflow
        assert "weights multiply" in str(exc)
        return
    assert len(schedule.per_step) == steps
    assert all(math.isfinite(w) for w in _weights(schedule))


@settings(max_examples=200, deadline=None)
@given(prompt=_PROMPTS)
def test_prompts_without_square_brackets_are_not_scheduled(prompt):
    texts = scheduled_texts(prompt, 3)
    if "[" not in prompt:
        assert texts == [prompt] * 3


@settings(max_examples=200, deadline=None)
@given(prompt=st.text(alphabet=st.characters(categories=["L", "N", "Zs"]), max_size=60))
def test_text_without_syntax_is_plain_under_auto(prompt):
    if "AND" in prompt or "BREAK" in prompt:
        return
    assert parse_prompt(prompt, syntax="auto", steps=1).at(0) == ((WeightedText.plain(prompt), 1.0),)
