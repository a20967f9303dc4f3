"""Prompt + negative prompt -> the conditioning of every sampling step; composable guidance.

This is the API the denoising loop calls. :func:`build_conditioning` parses both prompts
(:mod:`leansd.prompts.parse`), encodes each distinct text once (from the on-disk
:class:`~leansd.prompts.cache.PromptCache` when possible, else with the text encoder),
pads every tensor with encoded empty-prompt chunks to one common number of 77-token chunks,
and returns a :class:`ConditioningPlan`. ``plan.at(i)`` is the :class:`StepConditioning` of
0-based loop step ``i``: the negative-prompt embedding ``uncond`` (1, 77k, D) and the ``AND``
parts ``conds`` (each (1, 77k, D)) with their ``weights``. :func:`combine_guidance` is
classifier-free guidance generalised to several parts (composable diffusion).

Usage in the loop (``B`` images per batch)::

    plan = build_conditioning(prompt, negative_prompt, steps=num_inference_steps, calls=len(scheduler.timesteps),
                              syntax="auto", tokenizer=tokenizer, text_encoder=load_encoder,
                              device=device, cache=PromptCache()).to(dtype=unet.dtype)
    context, last = None, None
    for i, t in enumerate(scheduler.timesteps):
        step = plan.at(i)
        if step is not last:  # steps with the same conditioning share one object
            context, last = step.context(B), step  # ((1 + n) * B, 77k, D): [uncond; cond_1; ...; cond_n]
        n = len(step.conds)
        x = scheduler.scale_model_input(torch.cat([latents] * (1 + n)), t)
        noise = unet(x, t, encoder_hidden_states=context, return_dict=False)[0]
        noise_uncond, *noise_conds = noise.chunk(1 + n)
        noise_pred = combine_guidance(noise_uncond, noise_conds, step.weights, guidance_scale)
        latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]

With guidance off (one UNet pass per step) and ``not plan.is_composable``, use
``step.context(B, include_uncond=False)`` and the single prediction as is; a composable plan
needs the unconditional pass even then (``combine_guidance`` with the given scale).

Steps: ``steps`` is the step count prompt editing counts, as AUTOMATIC1111 counts it
(``num_inference_steps``, doubled for second-order samplers; ``schedule_steps``), and
``calls`` the number of loop iterations that will call ``plan.at`` (``len(timesteps)``).

The text encoder is touched only on a cache miss: ``text_encoder`` may be the module or a
zero-argument callable that loads/places it and is called at most once, on the first miss.
The cache key needs the encoder's weight fingerprint; with a module it is computed from its
weights once per module object (no forward call, no ``.to``); with a callable pass
``encoder_fingerprint`` (e.g. computed by the engine from the checkpoint), or the callable
is invoked to fingerprint the module. ``plan.needs_text_encoder`` is False when nothing
had to be encoded.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Union, cast

from leansd.prompts.cache import CacheStats, PromptCache, entry_key, text_encoder_fingerprint
from leansd.prompts.encode import CHUNK_LENGTH, TokenChunks, chunk_tokens, encode_chunks_pooled, pad_chunks
from leansd.prompts.parse import ConditioningSpec, Fragment, WeightedText, parse_prompt
from leansd.sampling.denoiser import combine_guidance as combine_guidance  # re-exported

if TYPE_CHECKING:
    import torch
    from transformers import CLIPTextModel, CLIPTokenizerFast  # type: ignore[attr-defined]  # a runtime alias of CLIPTokenizer in transformers 5

    from leansd.models.embeddings import EmbeddingMatcher

logger = logging.getLogger(__name__)

TextEncoderSource = Union["CLIPTextModel", Callable[[], "CLIPTextModel"]]
"""The text encoder module, or a zero-argument callable returning it (called only if needed)."""


@dataclass(frozen=True, eq=False)
class StepConditioning:
    """The conditioning of one step: ``uncond`` and the weighted ``conds``, all (1, 77k, D)."""

    uncond: "torch.Tensor" = field(repr=False)
    conds: tuple["torch.Tensor", ...] = field(repr=False)
    weights: tuple[float, ...]
    pooled_uncond: "torch.Tensor | None" = field(default=None, repr=False)
    """(1, P) pooled text embedding of the negative prompt, for families that condition on one (SDXL)."""
    pooled_conds: "tuple[torch.Tensor, ...] | None" = field(default=None, repr=False)
    """(1, P) pooled embedding of each AND part."""

    @property
    def parts(self) -> tuple[tuple["torch.Tensor", float], ...]:
        """(cond, weight) pairs, one per ``AND`` sub-prompt."""
        return tuple(zip(self.conds, self.weights, strict=True))

    def context(self, batch_size: int = 1, *, include_uncond: bool = True) -> "torch.Tensor":
        """UNet ``encoder_hidden_states``: [uncond; cond_1; ...; cond_n], each repeated ``batch_size`` times.

        Shape ((1 + n) * batch_size, 77k, D), or (n * batch_size, 77k, D) without the uncond.
        """
        import torch

        items = ([self.uncond] if include_uncond else []) + list(self.conds)
        return torch.cat([t.expand(batch_size, -1, -1) for t in items])  # ((1+n)B, 77k, D)

    def pooled_context(self, batch_size: int = 1, *, include_uncond: bool = True) -> "torch.Tensor | None":
        """The pooled embeddings in the order of :meth:`context`: ((1 + n) * batch_size, P); None without them."""
        import torch

        if self.pooled_conds is None or self.pooled_uncond is None:
            return None
        items = ([self.pooled_uncond] if include_uncond else []) + list(self.pooled_conds)
        return torch.cat([t.expand(batch_size, -1) for t in items])  # ((1+n)B, P)


@dataclass(frozen=True, eq=False)
class ConditioningPlan:
    """Per-step conditioning of one job (see the module docstring for the loop code).

    ``chunks``: 77-token chunks in every tensor (for the CLI: "used N chunks").
    ``needs_text_encoder``: False when every text came from the cache (the encoder was
    neither loaded nor called). ``cache_stats``: this job's cache events.
    ``syntax`` / ``negative_syntax``: the syntaxes that applied after ``auto``.
    """

    steps: int
    chunks: int
    syntax: str
    negative_syntax: str
    needs_text_encoder: bool
    cache_stats: CacheStats
    per_step: tuple[StepConditioning, ...] = field(repr=False)

    def at(self, step: int) -> StepConditioning:
        """Conditioning of 0-based step ``step``; the same object for steps that share it."""
        if not 0 <= step < self.steps:
            raise IndexError(f"step {step} is outside 0..{self.steps - 1} of this conditioning plan")
        return self.per_step[step]

    @property
    def is_static(self) -> bool:
        """True if every step has the same conditioning (no editing or alternation in effect)."""
        return all(s is self.per_step[0] for s in self.per_step)

    @property
    def is_composable(self) -> bool:
        """True if some step has several parts or a weight other than 1 (needs the uncond pass)."""
        return any(len(s.conds) != 1 or s.weights != (1.0,) for s in self._distinct())

    @property
    def max_parts(self) -> int:
        """The most AND parts any step has (the loop runs one UNet pass per part, plus the negative)."""
        return max(len(s.conds) for s in self._distinct())

    def _distinct(self) -> list[StepConditioning]:
        return list({id(s): s for s in self.per_step}.values())

    def to(
        self, *, device: "torch.device | str | None" = None, dtype: "torch.dtype | None" = None
    ) -> "ConditioningPlan":
        """A copy with every tensor moved/cast (each distinct tensor converted once; sharing kept)."""
        converted: dict[int, "torch.Tensor"] = {}

        def conv(t: "torch.Tensor") -> "torch.Tensor":
            if id(t) not in converted:
                converted[id(t)] = t.to(device=device, dtype=dtype)
            return converted[id(t)]

        steps: dict[int, StepConditioning] = {}
        for s in self._distinct():
            pooled_uncond = None if s.pooled_uncond is None else conv(s.pooled_uncond)
            pooled_conds = None if s.pooled_conds is None else tuple(conv(c) for c in s.pooled_conds)
            steps[id(s)] = StepConditioning(conv(s.uncond), tuple(conv(c) for c in s.conds), s.weights,
                                            pooled_uncond, pooled_conds)
        return ConditioningPlan(
            self.steps,
            self.chunks,
            self.syntax,
            self.negative_syntax,
            self.needs_text_encoder,
            self.cache_stats,
            tuple(steps[id(s)] for s in self.per_step),
        )


class _Encoder:
    """The text encoder, resolved from a module or a loader on first use."""

    def __init__(self, source: TextEncoderSource) -> None:
        self._source = source
        self._module: "CLIPTextModel | None" = None
        self.encoded = 0

    def module(self) -> "CLIPTextModel":
        import torch

        if self._module is None:
            source = self._source
            self._module = cast("CLIPTextModel", source) if isinstance(source, torch.nn.Module) else source()
        return self._module


class _Units:
    """Encoded texts (ids + multipliers -> (1, 77k, D)), memoised per job, read through the cache."""

    def __init__(
        self,
        *,
        encoder: _Encoder,
        device: "torch.device | str",
        cache: PromptCache | None,
        fingerprint: str | None,
        layer: int = -1,
        final_norm: bool = True,
        pooled_width: int | None = None,
    ) -> None:
        self.pooled_width = pooled_width
        self.encoder = encoder
        self.device = device
        self.cache = cache
        self.fingerprint = fingerprint
        self.layer = layer
        self.final_norm = final_norm
        self.memo: dict[TokenChunks, "torch.Tensor"] = {}
        self.pooled: dict[TokenChunks, "torch.Tensor"] = {}
        """(1, P) pooled embedding of each encoded text, for encoders that give one (SDXL)."""

    def get(self, chunks: TokenChunks, text: str) -> "torch.Tensor":
        found = self.memo.get(chunks)
        if found is not None:
            return found
        key = entry_key(self.fingerprint, chunks) if self.cache is not None and self.fingerprint else None
        tensor = self.cache.get(key) if key is not None else None  # type: ignore[union-attr]
        # A pooled embedding (SDXL) is stored in one more 77-row chunk: its first row, zero-padded.
        expected = CHUNK_LENGTH * (chunks.count + (1 if self.pooled_width else 0))
        if tensor is not None and tensor.shape[1] != expected:
            logger.warning(
                "prompt cache: entry %s has %d tokens, expected %d; re-encoding", key, tensor.shape[1], expected,
            )
            tensor = None
        pooled = None
        if tensor is None:
            tensor, pooled = encode_chunks_pooled(chunks, text_encoder=self.encoder.module(), device=self.device,
                                                  layer=self.layer, final_norm=self.final_norm)
            self.encoder.encoded += 1
            if key is not None:
                stored = tensor if pooled is None else _with_pooled_row(tensor, pooled)
                self.cache.put(key, stored, text=text)  # type: ignore[union-attr]
        else:
            tensor = tensor.to(self.device)
            if expected != CHUNK_LENGTH * chunks.count:
                tensor, pooled = tensor[:, : CHUNK_LENGTH * chunks.count], tensor[:, CHUNK_LENGTH * chunks.count]
                pooled = pooled[:, : self.pooled_width]  # (1, P)
        self.memo[chunks] = tensor
        if pooled is not None:
            self.pooled[chunks] = pooled
        return tensor


def _with_pooled_row(z: "torch.Tensor", pooled: "torch.Tensor") -> "torch.Tensor":
    """(1, 77k, D) and (1, P <= D) -> (1, 77(k + 1), D): one more chunk whose first row holds the pooled embedding."""
    import torch

    extra = torch.zeros((1, CHUNK_LENGTH, z.shape[-1]), dtype=z.dtype, device=z.device)
    extra[0, 0, : pooled.shape[-1]] = pooled[0].to(z.dtype)
    return torch.cat([z, extra], dim=1)


def build_conditioning(
    prompt: str,
    negative_prompt: str,
    *,
    steps: int,
    syntax: str = "auto",
    tokenizer: "CLIPTokenizerFast",
    text_encoder: TextEncoderSource,
    device: "torch.device | str",
    cache: PromptCache | None = None,
    encoder_fingerprint: str | None = None,
    hidden_layer: int = -1,
    final_norm: bool = True,
    pooled_width: int | None = None,
    zero_empty_negative: bool = False,
    calls: int | None = None,
    base_steps: int | None = None,
    embeddings: "EmbeddingMatcher | None" = None,
) -> ConditioningPlan:
    """Parse and encode ``prompt`` and ``negative_prompt`` for ``steps`` loop steps.

    ``steps`` is what prompt editing counts (AUTOMATIC1111's count,
    :func:`~leansd.prompts.parse.schedule_steps`); ``calls`` is the number of loop steps
    the plan covers (default ``steps``); ``base_steps`` marks a hires-fix second pass
    (:func:`~leansd.prompts.parse.switch_step`). ``embeddings``: textual-inversion names
    to replace by their vectors (in both prompts and every syntax).

    ``syntax``: ``auto``, ``a1111``, ``blocks`` or ``plain``, applied to each prompt
    (``auto`` decides per prompt). Tensors are on ``device`` in the encoder's dtype (a cached
    entry keeps the dtype it was stored in; the fingerprint includes the weights' dtype).
    ``cache=None`` disables the on-disk cache (texts are still encoded once per job).
    ``hidden_layer`` / ``final_norm``: which hidden states of the encoder condition the UNet (the
    family's choice, see :func:`leansd.prompts.encode.hidden_states`); a given
    ``encoder_fingerprint`` must tell them apart. ``pooled_width``: the width of the pooled text
    embedding the encoder gives (SDXL's :class:`~leansd.prompts.encode.TextEncoderPair`), kept per
    step beside the hidden states (and in the cache entry) for the UNet's added conditioning.
    ``zero_empty_negative``: on steps whose negative prompt text is empty (``""``, also a prompt-editing
    step such as the first ones of ``[:blurry:5]``) the negative conditions with zeros, hidden states
    and pooled embedding alike (the family's choice, SDXL; AUTOMATIC1111 tests the scheduled text).
    Raises InvalidRequestError for an unknown syntax, ``steps < 1`` or overflowing weights.
    """
    import torch

    positive = parse_prompt(prompt, syntax=syntax, steps=steps, calls=calls, base_steps=base_steps)
    negative = parse_prompt(negative_prompt, syntax=syntax, steps=steps, negative=True, calls=calls,
                            base_steps=base_steps)

    encoder = _Encoder(text_encoder)
    fingerprint = encoder_fingerprint
    if cache is not None and fingerprint is None:
        try:
            fingerprint = text_encoder_fingerprint(encoder.module())
        except (RuntimeError, NotImplementedError, TypeError, AttributeError) as exc:  # e.g. weights on meta
            logger.warning("prompt cache disabled for this job: cannot fingerprint the text encoder (%s)", exc)
            cache = None
    before = cache.stats.copy() if cache is not None else CacheStats()
    if fingerprint is not None and encoder_fingerprint is None and (hidden_layer, final_norm) != (-1, True):
        fingerprint = f"{fingerprint}-layer{hidden_layer}{'' if final_norm else '-nonorm'}"
    units = _Units(encoder=encoder, device=device, cache=cache, fingerprint=fingerprint,
                   layer=hidden_layer, final_norm=final_norm, pooled_width=pooled_width)
    pooled: dict[ConditioningSpec, "torch.Tensor"] = {}

    def empty() -> "torch.Tensor":
        return units.get(chunk_tokens(tokenizer, (Fragment("", 1.0),)), "")

    def encode_spec(spec: ConditioningSpec) -> "torch.Tensor":
        if isinstance(spec, WeightedText):
            token_chunks = chunk_tokens(tokenizer, spec.pieces, embeddings=embeddings)
            z = units.get(token_chunks, spec.text)
            if token_chunks in units.pooled:
                pooled[spec] = units.pooled[token_chunks]
            return z
        block_chunks = [chunk_tokens(tokenizer, WeightedText.plain(t).pieces, embeddings=embeddings)
                        for t, _ in spec.blocks]
        blocks = [units.get(c, t) for c, (t, _) in zip(block_chunks, spec.blocks, strict=True)]
        k = max(z.shape[1] // CHUNK_LENGTH for z in blocks)
        blocks = [pad_chunks(z, k, empty()) if z.shape[1] != k * CHUNK_LENGTH else z for z in blocks]
        mixed = torch.zeros_like(blocks[0])
        for z, (_, weight) in zip(blocks, spec.blocks, strict=True):  # optimizedSD: c += w_i / sum(w) * enc(block_i)
            mixed = torch.add(mixed, z, alpha=weight)
        if all(c in units.pooled for c in block_chunks):  # the pooled embeddings mix the same way
            mixed_pooled = torch.zeros_like(units.pooled[block_chunks[0]])
            for c, (_, weight) in zip(block_chunks, spec.blocks, strict=True):
                mixed_pooled = torch.add(mixed_pooled, units.pooled[c], alpha=weight)
            pooled[spec] = mixed_pooled
        return mixed

    specs = list(dict.fromkeys(negative.distinct_specs() + positive.distinct_specs()))
    with torch.inference_mode():
        raw = {spec: encode_spec(spec) for spec in specs}
        chunks = max(z.shape[1] // CHUNK_LENGTH for z in raw.values())
        tensors = {
            spec: pad_chunks(z, chunks, empty()) if z.shape[1] != chunks * CHUNK_LENGTH else z
            for spec, z in raw.items()
        }

    # Only the negative branch is zeroed: an empty prompt shares its spec and keeps its encoding.
    uncond = dict(tensors)
    pooled_uncond = dict(pooled)
    for spec in negative.distinct_specs() if zero_empty_negative else ():
        if isinstance(spec, WeightedText) and spec.text == "":  # steps whose negative text is empty
            uncond[spec] = torch.zeros_like(tensors[spec])
            if spec in pooled:
                pooled_uncond[spec] = torch.zeros_like(pooled[spec])

    shared: dict[tuple, StepConditioning] = {}
    per_step = []
    for i in range(positive.steps):
        [(neg_spec, _)] = negative.at(i)  # a negative prompt is one part of weight 1
        parts = positive.at(i)
        key = (neg_spec, parts)
        if key not in shared:
            has_pooled = neg_spec in pooled and all(s in pooled for s, _ in parts)
            shared[key] = StepConditioning(
                uncond[neg_spec], tuple(tensors[s] for s, _ in parts), tuple(float(w) for _, w in parts),
                pooled_uncond[neg_spec] if has_pooled else None,
                tuple(pooled[s] for s, _ in parts) if has_pooled else None,
            )
        per_step.append(shared[key])

    stats = cache.stats - before if cache is not None else CacheStats()
    plan = ConditioningPlan(
        steps=positive.steps,
        chunks=chunks,
        syntax=positive.syntax,
        negative_syntax=negative.syntax,
        needs_text_encoder=encoder.encoded > 0,
        cache_stats=stats,
        per_step=tuple(per_step),
    )
    logger.debug(
        "conditioning: syntax %s/%s, %d chunk(s), %d distinct step conditioning(s), %d text(s) encoded, cache: %s",
        plan.syntax, plan.negative_syntax, chunks, len(shared), encoder.encoded, stats,
    )
    return plan
