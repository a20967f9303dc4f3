"""Query-chunked attention: the fallback when flash / memory-efficient SDPA is unavailable or the
memory plan asks for it. Set on our own module instances (`unet.set_attn_processor`), never globally.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import torch
    from diffusers.models.attention_processor import Attention


class ChunkedAttnProcessor:
    """diffusers' SDPA attention (AttnProcessor2_0) computed `chunk` queries at a time.

    Softmax is over the keys, so each block of query rows is independent: chunking the queries
    bounds the materialised score matrix to (B, heads, chunk, N) and gives the same output.
    """

    def __init__(self, chunk: int, *, check: Callable[[], None] | None = None) -> None:
        if chunk < 1:
            raise ValueError(f"attention chunk must be positive, got {chunk}")
        self.chunk = chunk
        self.check = check
        """Called before every chunk (a job can stop within one attention call)."""

    def __call__(
        self,
        attn: "Attention",
        hidden_states: "torch.Tensor",
        encoder_hidden_states: "torch.Tensor | None" = None,
        attention_mask: "torch.Tensor | None" = None,
        temb: "torch.Tensor | None" = None,
        *args: object,
        **kwargs: object,
    ) -> "torch.Tensor":
        import torch
        import torch.nn.functional as F

        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)  # (B, N, C)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # (B, heads, N, d)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # (B, heads, M, d)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        out = torch.empty_like(query)
        for start in range(0, query.shape[2], self.chunk):
            if self.check is not None:
                self.check()
            stop = start + self.chunk
            mask = None
            if attention_mask is not None:
                mask = attention_mask if attention_mask.shape[2] == 1 else attention_mask[:, :, start:stop]
            out[:, :, start:stop] = F.scaled_dot_product_attention(
                query[:, :, start:stop], key, value, attn_mask=mask, dropout_p=0.0, is_causal=False
            )
        hidden_states = out.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)  # (B, N, heads*d)
        hidden_states = attn.to_out[0](hidden_states.to(query.dtype))
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


INTERRUPT_SCORES = 2**24
"""Interruptible attention: scores per query chunk (about a second of CPU work per chunk and head batch)."""


class InterruptibleAttnProcessor:
    """Wraps a module's attention processor while a job must be stoppable within a step.

    `check()` runs before the attention; an attention with more than 4 * `INTERRUPT_SCORES` scores
    (self-attention over 8192+ tokens: where one call takes seconds on a CPU) runs in query chunks
    with `check()` between them. Smaller attention calls go to the wrapped processor unchanged.
    """

    def __init__(self, inner: Any, check: Callable[[], None], *, max_scores: int = INTERRUPT_SCORES) -> None:
        self.inner = inner
        self.check = check
        self.max_scores = max_scores

    def __call__(
        self,
        attn: "Attention",
        hidden_states: "torch.Tensor",
        encoder_hidden_states: "torch.Tensor | None" = None,
        attention_mask: "torch.Tensor | None" = None,
        temb: "torch.Tensor | None" = None,
        *args: object,
        **kwargs: object,
    ) -> "torch.Tensor":
        self.check()
        queries = hidden_states.shape[2] * hidden_states.shape[3] if hidden_states.ndim == 4 else hidden_states.shape[1]
        keys = queries if encoder_hidden_states is None else encoder_hidden_states.shape[1]
        if queries * keys <= 4 * self.max_scores or args or kwargs:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        chunk = max(1, self.max_scores // keys)
        if isinstance(self.inner, ChunkedAttnProcessor):
            chunk = min(chunk, self.inner.chunk)
        return ChunkedAttnProcessor(chunk, check=self.check)(
            attn, hidden_states, encoder_hidden_states, attention_mask, temb
        )
