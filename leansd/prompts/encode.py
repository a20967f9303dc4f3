"""Text -> conditioning: tokenise (77-token window) and run the CLIP text encoder."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from transformers import CLIPTextModel, CLIPTokenizerFast

logger = logging.getLogger(__name__)

MAX_CONTENT_TOKENS = 75
"""77 positions minus BOS and EOS."""


def encode_prompts(
    texts: list[str],
    *,
    tokenizer: "CLIPTokenizerFast",
    text_encoder: "CLIPTextModel",
    device: "torch.device | str",
) -> "torch.Tensor":
    """Encode each text to its last hidden state, (len(texts), 77, D), on `device`."""
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
        hidden = text_encoder(ids, return_dict=False)[0]  # (U, 77, D)
    index = torch.tensor([unique.index(t) for t in texts], device=hidden.device)
    return hidden.index_select(0, index)
