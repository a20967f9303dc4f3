"""Text -> conditioning: prompt syntax parsers, 77-token chunking, emphasis, the embedding cache.

The loop's entry points are :func:`build_conditioning` (-> :class:`ConditioningPlan`, one
:class:`StepConditioning` per step) and :func:`combine_guidance`; see
:mod:`leansd.prompts.conditioning` for the calling code and docs/PROMPTS.md for the syntax.
Importing this package imports no torch.
"""

from leansd.prompts.cache import CacheStats, PromptCache, text_encoder_fingerprint
from leansd.prompts.conditioning import ConditioningPlan, StepConditioning, build_conditioning, combine_guidance
from leansd.prompts.encode import encode_prompts
from leansd.prompts.parse import PROMPT_SYNTAXES, parse_prompt, resolve_syntax

__all__ = [
    "PROMPT_SYNTAXES",
    "CacheStats",
    "ConditioningPlan",
    "PromptCache",
    "StepConditioning",
    "build_conditioning",
    "combine_guidance",
    "encode_prompts",
    "parse_prompt",
    "resolve_syntax",
    "text_encoder_fingerprint",
]
