"""Prompt syntax parsers: text in, structure out. Pure string code (no torch, no files).

Four syntaxes (``--prompt-syntax``), chosen per prompt by :func:`resolve_syntax`:

``plain``
    No parsing at all: the whole text is encoded as is (long texts are still chunked).
``a1111``
    AUTOMATIC1111's prompt language, in A1111's order: the prompt is split on ``AND``
    (composable diffusion, each sub-prompt with an optional trailing ``:weight``,
    :func:`split_and`); each sub-prompt is expanded per sampling step by prompt editing
    ``[from:to:when]`` and alternation ``[a|b]`` (:func:`parse_schedule`); each resulting
    text is split into emphasis fragments ``(word)``, ``[word]``, ``(word:1.3)`` and
    ``BREAK`` (:func:`parse_attention`).
``blocks``
    optimizedSD / lstein weight blocks ``tabby cat:0.25 white duck:0.75 hybrid``
    (:func:`split_weight_blocks`): each block is encoded on its own and the conditionings
    are averaged with the normalised weights (:func:`normalise_weights`).
``auto``
    ``blocks`` if the prompt has a weight block outside brackets and no ``AND``, else
    ``a1111`` (:func:`resolve_syntax`; the rule and its examples are in docs/PROMPTS.md).

Parsing is lenient, as in A1111: unbalanced brackets and stray ``:`` or ``|`` are text,
never errors. The only error is a weight product that overflows a float
(:class:`~leansd.errors.InvalidRequestError`); every weight returned is finite.

:func:`parse_prompt` runs the whole chain and returns a :class:`PromptSchedule`: for each
sampling step, the (conditioning spec, weight) parts to encode. Specs are frozen, hashable
values, so equal texts/weightings are encoded once.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from typing import Sequence, Union

from leansd.errors import InvalidRequestError, brief

logger = logging.getLogger(__name__)

PROMPT_SYNTAXES = ("auto", "a1111", "blocks", "plain")
"""Valid values of ``--prompt-syntax``."""

ROUND_MULTIPLIER = 1.1
"""``(word)`` multiplies the attention weight by 1.1 (A1111)."""
SQUARE_MULTIPLIER = 1 / 1.1
"""``[word]`` divides it by 1.1 (A1111)."""


# --------------------------------------------------------------------------- values


@dataclass(frozen=True)
class Fragment:
    """A run of text with one emphasis weight (1.0 = unweighted)."""

    text: str
    weight: float


@dataclass(frozen=True)
class Break:
    """A1111's ``BREAK``: the text after it starts a new 75-token chunk."""

    def __repr__(self) -> str:
        return "BREAK"


BREAK = Break()
Piece = Union[Fragment, Break]


@dataclass(frozen=True)
class WeightedText:
    """One text to encode as a single conditioning: emphasis fragments and BREAKs."""

    pieces: tuple[Piece, ...]

    @classmethod
    def plain(cls, text: str) -> "WeightedText":
        """The text with no syntax: one fragment of weight 1."""
        return cls((Fragment(text, 1.0),))

    @property
    def text(self) -> str:
        """Readable form (for logs and cache metadata); not re-parseable."""
        return "".join(" BREAK " if p is BREAK else p.text for p in self.pieces)  # type: ignore[union-attr]


@dataclass(frozen=True)
class BlockBlend:
    """Weight blocks: plain texts encoded separately, averaged with these normalised weights."""

    blocks: tuple[tuple[str, float], ...]

    @property
    def text(self) -> str:
        return " ".join(f"{t}:{w:g}" for t, w in self.blocks)


ConditioningSpec = Union[WeightedText, BlockBlend]
"""What one conditioning tensor is made of; hashable, so each distinct one is encoded once."""


# --------------------------------------------------------------------------- helpers


def _finite_float(text: str) -> float | None:
    """``float(text)`` if it parses to a finite number, else None."""
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _bracket_pairs(text: str) -> dict[int, int]:
    """Matched ``(``/``)`` and ``[``/``]`` positions, opener -> closer; escaped characters skipped.

    A closer matches the nearest open bracket of its kind; brackets opened after that one and
    still open stay unmatched. A closer with no open bracket of its kind is unmatched. Unmatched
    brackets are plain text for the scheduling layer. Linear time, no recursion.
    """
    pairs: dict[int, int] = {}
    stack: list[int] = []
    open_count = {"(": 0, "[": 0}
    i = 0
    n = len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c in "([":
            stack.append(i)
            open_count[c] += 1
        elif c in ")]":
            want = "(" if c == ")" else "["
            if open_count[want]:
                while True:
                    j = stack.pop()
                    open_count[text[j]] -= 1
                    if text[j] == want:
                        pairs[j] = i
                        break
        i += 1
    return pairs


# --------------------------------------------------------------------------- a1111: emphasis

_RE_ATTENTION = re.compile(
    r"""
\\\(|\\\)|\\\[|\\]|\\\\|\\|
\(|\[|
:\s*([+-]?[.\d]+)\s*\)|
\)|]|
[^\\()\[\]:]+|
:
""",
    re.X,
)
_RE_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_attention(text: str) -> tuple[Piece, ...]:
    """A1111's emphasis syntax -> fragments with weights and BREAKs (``parse_prompt_attention``).

    ``(x)`` x1.1, ``[x]`` /1.1, ``(x:1.3)`` x1.3, nesting multiplies, ``\\(`` ``\\)`` ``\\[``
    ``\\]`` ``\\\\`` are literal characters and a backslash before any other character is
    dropped (so ``\\:`` is ``:``). An unclosed bracket applies to the end of the text; a
    stray closer is text. Adjacent fragments of equal weight are merged, as A1111 does.
    ``BREAK`` (upper case, a whole word) becomes :data:`BREAK`.

    Deviations from A1111, both where A1111 fails: a ``(x:w)`` whose ``w`` is not a finite
    number (``(x:1.2.3)``) keeps ``:w`` as text and closes as ``(x)``; a ``BREAK`` inside
    brackets stays a BREAK (A1111 multiplies its marker and then encodes the word "break").

    Raises InvalidRequestError if nested weights multiply to a non-finite number.
    """
    res: list[list | Break] = []  # [text, weight] lists, or BREAK
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply(start: int, factor: float) -> None:
        for p in range(start, len(res)):
            item = res[p]
            if isinstance(item, list):
                item[1] *= factor

    for m in _RE_ATTENTION.finditer(text):
        token = m.group(0)
        weight = m.group(1)
        if token.startswith("\\"):
            res.append([token[1:], 1.0])
        elif token == "(":
            round_open.append(len(res))
        elif token == "[":
            square_open.append(len(res))
        elif weight is not None and round_open:
            value = _finite_float(weight)
            if value is None:  # "(x:1.2.3)": keep ":1.2.3" as text, close as a plain "("
                res.append([token[:-1], 1.0])
                value = ROUND_MULTIPLIER
            multiply(round_open.pop(), value)
        elif token == ")" and round_open:
            multiply(round_open.pop(), ROUND_MULTIPLIER)
        elif token == "]" and square_open:
            multiply(square_open.pop(), SQUARE_MULTIPLIER)
        else:
            for i, part in enumerate(_RE_BREAK.split(token)):
                if i:
                    res.append(BREAK)
                res.append([part, 1.0])
    for pos in round_open:
        multiply(pos, ROUND_MULTIPLIER)
    for pos in square_open:
        multiply(pos, SQUARE_MULTIPLIER)
    if not res:
        res = [["", 1.0]]

    merged: list[list | Break] = [res[0]]
    for item in res[1:]:
        last = merged[-1]
        if isinstance(item, list) and isinstance(last, list) and last[1] == item[1]:
            last[0] += item[0]
        else:
            merged.append(item)

    pieces: list[Piece] = []
    for item in merged:
        if isinstance(item, Break):
            pieces.append(BREAK)
            continue
        if not math.isfinite(item[1]):
            raise InvalidRequestError(
                f"prompt emphasis weights multiply to {item[1]} around {item[0][:40]!r}; use smaller weights"
            )
        pieces.append(Fragment(item[0], float(item[1])))
    return tuple(pieces)


# --------------------------------------------------------------------------- a1111: AND

_RE_AND = re.compile(r"\bAND\b")
# A1111's re_weight, except that the colon may not follow a digit or a backslash, so
# times and ratios ("12:30", "16:9") and escaped colons ("\:5") stay text.
_RE_AND_WEIGHT = re.compile(
    r"^(?P<text>.*?)(?:(?<![\d\\])\s*:\s*(?P<weight>[-+]?(?:\d+\.?|\d*\.\d+)))?\s*$", re.S
)


def split_and(prompt: str) -> list[tuple[str, float]]:
    """Composable-diffusion sub-prompts: split on the word ``AND``, each with its ``:weight``.

    ``a cat AND a dog :0.5`` -> ``[("a cat ", 1.0), (" a dog", 0.5)]``. A weight is a
    trailing ``:number`` (optionally spaced, ``-``/``+`` allowed), as in A1111, except that a
    colon right after a digit or a backslash is text (``at 12:30`` has no weight). Without a
    weight the sub-prompt weighs 1; a weight that is not a finite float is text. A single
    prompt with no AND still takes a trailing weight, as in A1111 (``a cat:0.5``).
    """
    parts: list[tuple[str, float]] = []
    for sub in _RE_AND.split(prompt):
        m = _RE_AND_WEIGHT.match(sub)
        weight = _finite_float(m.group("weight")) if m and m.group("weight") else None
        if m is None or weight is None:
            parts.append((sub, 1.0))
        else:
            parts.append((m.group("text"), weight))
    return parts


# --------------------------------------------------------------------------- a1111: schedules

_RE_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")


@dataclass(frozen=True)
class _Group:
    """Brackets kept as text around a body that changes over the steps."""

    open: str
    body: tuple["_Node", ...]
    close: str


@dataclass(frozen=True)
class _Edit:
    """``[before:after:when]``: ``before`` while the step is at most :func:`switch_step` of ``when``."""

    before: tuple["_Node", ...]
    after: tuple["_Node", ...]
    when: float
    fraction: bool
    """True if ``when`` was written with a decimal point (``0.5``, ``1.``, ``.5``): a fraction of the steps."""


@dataclass(frozen=True)
class _Alternate:
    """``[a|b|...]``: option ``(max(step, 1) - 1) % len(options)`` (see :meth:`PromptTree.text_at`)."""

    options: tuple[tuple["_Node", ...], ...]


_Node = Union[str, _Group, _Edit, _Alternate]


def switch_step(when: float, steps: int, *, fraction: bool, base_steps: int | None = None) -> int:
    """AUTOMATIC1111's switch point of ``[from:to:when]``: ``from`` is used while A1111's step is <= this.

    ``fraction`` (``when`` written with a decimal point): ``int(when * steps)``; otherwise the step
    number ``int(when)``; capped at ``steps`` (``int`` truncates toward zero, as A1111). For a
    hires-fix second pass (``base_steps`` = the first pass's step count) A1111 counts on from
    the first pass: ``int((when - 1) * steps)`` for a fraction, ``int(when - base_steps)`` for a
    step number. A result below 1 means ``to`` from the first step. (A1111 >= 1.6 scheduling,
    ``modules/prompt_parser.py``; 20 steps: ``[a:b:10]`` -> 10, ``[a:b:0.5]`` -> 10,
    ``[a:b:1.5]`` -> 20.)
    """
    if base_steps is None:
        value = when * steps if fraction else when
    else:
        value = (when - 1) * steps if fraction else when - base_steps
    if not value < steps:  # also inf
        return steps
    if not value > -1:  # also -inf: int() would fail; any value below 1 means "never from"
        return 0
    return int(value)


class PromptTree:
    """A sub-prompt parsed for prompt editing and alternation; :meth:`text_at` expands one step."""

    def __init__(self, nodes: tuple[_Node, ...]) -> None:
        self.nodes = nodes
        self.is_static = all(isinstance(n, str) for n in nodes)

    def text_at(self, step: int, steps: int, *, base_steps: int | None = None) -> str:
        """The text used at 0-based loop step ``step`` of a ``steps``-step schedule (emphasis kept).

        As AUTOMATIC1111: its denoiser counts model calls from 0 and uses the first schedule
        entry whose end step ``t`` is >= the count; its schedule ends at every switch point, and
        at every step when the prompt alternates. That entry's text is the expansion at
        ``t = max(step, 1)``: an edit shows ``from`` while ``t <= switch_step(when)``, an
        alternation shows option ``(t - 1) % n``. So at 10 steps ``[a:b:5]`` is ``a`` for loop
        steps 0-5 and ``[a|b]`` gives a, a, b, a, b, ... ``base_steps``: see :func:`switch_step`.
        """
        if self.is_static:
            return "".join(self.nodes)  # type: ignore[arg-type]
        t = min(max(step, 1), steps)
        out: list[str] = []
        stack: list[_Node] = list(reversed(self.nodes))
        while stack:  # iterative: deeply nested edits must not hit the recursion limit
            node = stack.pop()
            if isinstance(node, str):
                out.append(node)
            elif isinstance(node, _Group):
                out.append(node.open)
                stack.append(node.close)
                stack.extend(reversed(node.body))
            elif isinstance(node, _Edit):
                switch = switch_step(node.when, steps, fraction=node.fraction, base_steps=base_steps)
                stack.extend(reversed(node.before if t <= switch else node.after))
            else:
                stack.extend(reversed(node.options[(t - 1) % len(node.options)]))
        return "".join(out)


def _collapse(nodes: list[_Node]) -> tuple[_Node, ...]:
    """Join adjacent strings."""
    out: list[_Node] = []
    for node in nodes:
        if isinstance(node, str) and out and isinstance(out[-1], str):
            out[-1] = out[-1] + node
        elif node != "":
            out.append(node)
    return tuple(out)


def _text_of(nodes: Sequence[_Node]) -> str | None:
    """The text if every node is static, else None."""
    return "".join(nodes) if all(isinstance(n, str) for n in nodes) else None  # type: ignore[arg-type]


def _as_text(parts: list[tuple[_Node, ...]], seps: list[str]) -> _Node:
    """A ``[...]`` that is neither editing nor alternation: its brackets and separators are text."""
    merged: list[_Node] = []
    for i, part in enumerate(parts):
        if i:
            merged.append(seps[i - 1])
        merged.extend(part)
    flat = _collapse(merged)
    text = _text_of(flat)
    return f"[{text}]" if text is not None else _Group("[", flat, "]")


def _close_square(parts: list[tuple[_Node, ...]], seps: list[str], valid: list[bool]) -> tuple[_Node, bool]:
    """Classify a matched ``[...]`` by its top-level separators; also say if A1111's grammar accepts it.

    ``valid[i]``: part ``i`` is a well-formed A1111 prompt (balanced brackets, no stray ``:``
    or ``|``). Editing and alternation need well-formed parts; otherwise the bracket is text.
    """
    if not seps:
        body = parts[0]
        text = _text_of(body)
        return (f"[{text}]" if text is not None else _Group("[", body, "]")), valid[0]
    if all(s == "|" for s in seps):
        return _Alternate(tuple(parts)), all(valid)
    if all(s == ":" for s in seps) and len(seps) <= 2 and all(valid[:-1]):
        when_text = _text_of(parts[-1])
        if when_text is not None and _RE_NUMBER.fullmatch(when_text.strip()):
            when = float(when_text.strip())
            before = parts[0] if len(seps) == 2 else ()
            return _Edit(before, parts[-2], when, "." in when_text), True
    return _as_text(parts, seps), False


def parse_schedule(text: str) -> PromptTree:
    """Parse prompt editing ``[from:to:when]``, ``[to:when]``, ``[from::when]`` and ``[a|b]``.

    Everything else (emphasis brackets, escapes, stray ``:``, unbalanced brackets) is kept
    verbatim for :func:`parse_attention`. Colons and bars inside ``(...)`` belong to the
    parentheses, not to an enclosing ``[...]``. ``when`` is a number (``0.5``, ``10``,
    ``.25``, ``1e1``), optionally with spaces around it. The parts of an edit or alternation
    must be well-formed (balanced brackets, no stray ``:``; ``(a:b)`` may hold one ``:``), else
    the bracket is text. As in AUTOMATIC1111, whose grammar has no other place for it, a ``|``
    outside a well-formed alternation, or a lone ``\\`` at the end, makes the whole prompt
    plain text: no editing or alternation anywhere (emphasis still applies).
    """
    if text.endswith("\\") and (len(text) - len(text.rstrip("\\"))) % 2:
        return PromptTree((text,))
    pairs = _bracket_pairs(text)
    # Frames: (kind, closer index, parts, seps, per-part well-formedness, colons inside "(").
    frames: list[tuple[str, int, list[list[_Node]], list[str], list[bool], list[int]]] = [
        ("", -1, [[]], [], [True], [0])
    ]
    i = 0
    n = len(text)
    while i < n:
        kind, closer, parts, seps, valid, colons = frames[-1]
        c = text[i]
        if c == "\\":
            parts[-1].append(text[i : i + 2])
            i += 2
        elif i in pairs:
            frames.append((c, pairs[i], [[]], [], [True], [0]))
            i += 1
        elif kind and i == closer:
            frames.pop()
            collapsed = [_collapse(p) for p in parts]
            if kind == "(":
                body = collapsed[0]
                body_text = _text_of(body)
                node: _Node = f"({body_text})" if body_text is not None else _Group("(", body, ")")
                ok = valid[0] and colons[0] <= 1
            else:
                node, ok = _close_square(collapsed, seps, valid)
                if not ok and "|" in seps:  # a bar A1111's grammar cannot place
                    return PromptTree((text,))
            frames[-1][2][-1].append(node)
            frames[-1][4][-1] = frames[-1][4][-1] and ok
            i += 1
        elif kind == "[" and c in ":|":
            seps.append(c)
            parts.append([])
            valid.append(True)
            i += 1
        else:
            if c == "|":  # outside any [...]: no alternation can hold it
                return PromptTree((text,))
            if c in "()[]":  # unmatched
                valid[-1] = False
            elif c == ":":
                colons[0] += 1
                if kind != "(":
                    valid[-1] = False
            parts[-1].append(c)
            i += 1
    return PromptTree(_collapse(frames[0][2][0]))


def scheduled_texts(text: str, steps: int, *, calls: int | None = None, base_steps: int | None = None) -> list[str]:
    """The text used at each loop step (0-based), after editing and alternation.

    ``steps``: the schedule's step count as AUTOMATIC1111 counts it (:func:`schedule_steps`);
    ``calls``: how many loop steps read it (default ``steps``); ``base_steps``: see :func:`switch_step`.
    """
    tree = parse_schedule(text)
    return [tree.text_at(i, steps, base_steps=base_steps) for i in range(steps if calls is None else calls)]


def schedule_steps(steps: int, *, second_order: bool = False) -> int:
    """AUTOMATIC1111's step count for prompt schedules: ``2 * steps`` for second-order samplers.

    A1111 (``SamplerData.total_steps``) doubles the steps of Heun, DPM2, DPM2 a, DPM++ 2S a and
    DPM++ SDE, whose loop evaluates the model about twice per step, and its denoiser counts
    every evaluation: ``[a:b:0.5]`` at 10 Heun steps switches after 10 of the 19 evaluations.
    """
    return 2 * steps if second_order else steps


# --------------------------------------------------------------------------- blocks

# A weight block ends with ":number" where the colon does not follow a digit, a backslash or
# another colon, and the number ends at whitespace or at the end of the prompt.
_RE_BLOCK_WEIGHT = re.compile(r"(?<![\d\\:]):(?P<weight>[-+]?(?:\d+(?:\.\d*)?|\.\d+))(?=\s|$)")


def split_weight_blocks(text: str) -> list[tuple[str, float]]:
    """optimizedSD / lstein weight blocks -> ``[(text, raw weight), ...]`` (not normalised).

    Each ``text:weight`` block ends at a weight marker: a ``:`` directly followed by a number
    (``1``, ``0.5``, ``-2``, ``.5``) that ends at whitespace or at the end of the prompt,
    where the colon does not follow a digit, ``\\`` or ``:``. Text after the last marker is a
    block of weight 1, as in lstein's ``split_weighted_subprompts``:
    ``tabby cat:0.25 white duck:0.75 hybrid`` -> ``[("tabby cat", 0.25), ("white duck",
    0.75), ("hybrid", 1.0)]``. ``\\:`` is a literal colon. Block texts are stripped;
    empty blocks are dropped with their weight; a prompt with no block left is ``[("", 1)]``.

    Stricter than lstein, which splits at every colon: ``http://x.com``, ``12:30`` and
    ``16:9`` stay inside their block, and brackets are ordinary characters.
    """
    blocks: list[tuple[str, float]] = []
    start = 0
    for m in _RE_BLOCK_WEIGHT.finditer(text):
        weight = _finite_float(m.group("weight"))
        if weight is None:
            continue
        blocks.append((text[start : m.start()], weight))
        start = m.end()
    blocks.append((text[start:], 1.0))
    kept = [(t.replace("\\:", ":").strip(), w) for t, w in blocks]
    kept = [(t, w) for t, w in kept if t]
    return kept or [("", 1.0)]


def normalise_weights(weights: Sequence[float]) -> list[float]:
    """Weights divided by their sum (lstein's rule); equal weights if the sum is 0.

    Negative weights are allowed. If the sum is zero, or the division overflows, every
    weight becomes ``1/len`` (lstein does the same for a zero sum) and a warning is logged.
    """
    if not weights:
        return []
    try:
        total = math.fsum(weights)
    except OverflowError:
        total = math.inf
    if total != 0 and math.isfinite(total):
        out = [w / total for w in weights]
        if all(math.isfinite(w) for w in out):
            return out
    scale = max(abs(w) for w in weights)
    if scale != 0:  # the sum or a quotient overflowed: scale into [-1, 1] first
        scaled = [w / scale for w in weights]
        scaled_total = math.fsum(scaled)
        if scaled_total != 0:
            out = [w / scaled_total for w in scaled]
            if all(math.isfinite(w) for w in out):
                return out
    logger.warning("prompt block weights %s sum to zero; using equal weights", list(weights))
    return [1.0 / len(weights)] * len(weights)


# --------------------------------------------------------------------------- choice and schedule

_RE_BRACKET = re.compile(r"\\.|[()\[\]]", re.S)


def _has_top_level_block_weight(prompt: str) -> bool:
    """True if a weight-block marker appears outside brackets (an unclosed bracket runs to the end)."""
    depth = 0
    pos = 0
    for m in _RE_BRACKET.finditer(prompt):
        if depth == 0 and _has_block_weight(prompt, pos, m.start()):
            return True
        c = m.group(0)
        if c in "([":
            depth += 1
        elif c in ")]" and depth:
            depth -= 1
        pos = m.end()
    return depth == 0 and _has_block_weight(prompt, pos, len(prompt))


def _has_block_weight(prompt: str, start: int, end: int) -> bool:
    for m in _RE_BLOCK_WEIGHT.finditer(prompt, start, end):
        # The lookahead saw the whole prompt; the number must also end inside [start, end).
        if _finite_float(m.group("weight")) is not None and (m.end() == len(prompt) or prompt[m.end()].isspace()):
            return True
    return False


def resolve_syntax(prompt: str, syntax: str) -> str:
    """The syntax that applies to ``prompt``: ``syntax`` itself, or for ``auto`` the rule below.

    ``auto`` -> ``blocks`` if the prompt contains no ``AND`` keyword and has at least one
    weight-block marker (``word:number`` followed by whitespace or the end, the colon not
    after a digit; see :func:`split_weight_blocks`) outside all ``(...)``/``[...]``
    brackets; otherwise ``a1111``. A prompt without special syntax therefore reads as
    ``a1111``, which encodes it exactly like ``plain``.

    Raises InvalidRequestError for an unknown syntax.
    """
    if syntax not in PROMPT_SYNTAXES:
        raise InvalidRequestError(
            f"unknown prompt syntax {brief(syntax)}; valid values: {', '.join(PROMPT_SYNTAXES)}"
        )
    if syntax != "auto":
        return syntax
    if not _RE_AND.search(prompt) and _has_top_level_block_weight(prompt):
        return "blocks"
    return "a1111"


Parts = tuple[tuple[ConditioningSpec, float], ...]


@dataclass(frozen=True)
class PromptSchedule:
    """A parsed prompt: for each sampling step, the (spec, weight) parts to condition on.

    One part of weight 1 is an ordinary prompt; several parts come from ``AND``
    (composable diffusion). ``per_step[i]`` is the parts tuple of 0-based step ``i``;
    steps with the same conditioning share one tuple.
    """

    prompt: str
    syntax: str
    steps: int
    """Loop steps covered (``len(per_step)``)."""
    per_step: tuple[Parts, ...]

    def at(self, step: int) -> Parts:
        """Parts of 0-based step ``step``."""
        if not 0 <= step < self.steps:
            raise IndexError(f"step {step} is outside 0..{self.steps - 1}")
        return self.per_step[step]

    def distinct_specs(self) -> list[ConditioningSpec]:
        """Every spec used at some step, in order of first use."""
        seen: dict[ConditioningSpec, None] = {}
        for parts in dict.fromkeys(self.per_step):
            for spec, _ in parts:
                seen.setdefault(spec, None)
        return list(seen)

    @property
    def is_static(self) -> bool:
        """True if every step uses the same parts."""
        return len(set(self.per_step)) == 1


def parse_prompt(
    prompt: str,
    *,
    syntax: str = "auto",
    steps: int,
    negative: bool = False,
    calls: int | None = None,
    base_steps: int | None = None,
) -> PromptSchedule:
    """Parse ``prompt`` for a ``steps``-step schedule into a :class:`PromptSchedule`.

    ``steps`` is the step count prompt editing counts, as AUTOMATIC1111 counts it
    (:func:`schedule_steps`); ``calls`` is how many loop steps will read the schedule (default
    ``steps``; fewer for img2img, which A1111 schedules over all its steps but runs the tail
    of); ``base_steps`` marks a hires-fix second pass (:func:`switch_step`).
    ``negative=True`` parses a negative prompt: as in A1111, ``AND`` and the trailing
    ``:weight`` are not special there (editing, alternation and emphasis are); blocks work.
    Raises InvalidRequestError for an unknown syntax, ``steps < 1`` or overflowing weights.
    """
    if steps < 1:
        raise InvalidRequestError(f"steps must be at least 1 to schedule a prompt, got {steps}")
    rows = steps if calls is None else calls
    if rows < 1:
        raise InvalidRequestError(f"a prompt schedule needs at least 1 loop step, got {rows}")
    resolved = resolve_syntax(prompt, syntax)
    if resolved == "plain":
        return _static(prompt, resolved, rows, ((WeightedText.plain(prompt), 1.0),))
    if resolved == "blocks":
        blocks = split_weight_blocks(prompt)
        weights = normalise_weights([w for _, w in blocks])
        kept = tuple((t, w) for (t, _), w in zip(blocks, weights, strict=True) if w != 0)
        spec: ConditioningSpec = WeightedText.plain(kept[0][0]) if len(kept) == 1 else BlockBlend(kept)
        logger.debug("weight blocks %s", kept)
        return _static(prompt, resolved, rows, ((spec, 1.0),))

    subprompts = [(prompt, 1.0)] if negative else split_and(prompt)
    attention: dict[str, WeightedText] = {}

    def spec_of(text: str) -> WeightedText:
        if text not in attention:
            attention[text] = WeightedText(parse_attention(text))
        return attention[text]

    trees = [(parse_schedule(text), weight) for text, weight in subprompts]
    if all(tree.is_static for tree, _ in trees):
        parts = tuple((spec_of(tree.text_at(0, steps)), w) for tree, w in trees)
        return _static(prompt, resolved, rows, parts)
    per_step: dict[Parts, Parts] = {}
    out = []
    for i in range(rows):
        row = tuple((spec_of(tree.text_at(i, steps, base_steps=base_steps)), w) for tree, w in trees)
        out.append(per_step.setdefault(row, row))
    return PromptSchedule(prompt, resolved, rows, tuple(out))


def _static(prompt: str, syntax: str, steps: int, parts: Parts) -> PromptSchedule:
    return PromptSchedule(prompt, syntax, steps, (parts,) * steps)
