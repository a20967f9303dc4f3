"""Each family's description matches its published architecture, and the planner plans it from that.

The architectures are built on the meta device (no memory): parameter counts, the text width and
the planner's budgets for the issue's targets (SD 2.1 768x768 under 2 GiB, SDXL 1024x1024 under 4 GiB).
"""

from __future__ import annotations

import pytest

from leansd.engine.memory import reference_models, reference_sizes
from leansd.engine.planner import GiB, PlanRequest, plan_memory
from leansd.models.families import FAMILIES, Component, describe
from leansd.models.family import ModelFamily


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("family", list(FAMILIES), ids=lambda f: f.value)
def test_description_part_sizes_are_the_architectures(family):
    spec = describe(family)
    models = reference_models(family)
    assert _count(models.unet) == spec.unet_parameters
    assert _count(models.vae) == spec.vae_parameters
    assert [_count(t) for t in models.text_encoders] == [t.parameters for t in spec.text_encoders]
    assert [t.config.hidden_size for t in models.text_encoders] == [t.hidden_size for t in spec.text_encoders]
    assert sum(t.hidden_size for t in spec.text_encoders) == spec.text_hidden
    assert models.unet.config.cross_attention_dim == spec.context_width
    assert models.vae.config.scaling_factor == spec.vae_scaling_factor
    assert models.unet.config.in_channels == (9 if spec.inpainting else 4)
    assert spec.components == (Component.TEXT, Component.UNET, Component.VAE)


def test_published_sizes():
    assert describe(ModelFamily.SDXL).unet_parameters == 2_567_463_684  # 2.57 B
    assert describe(ModelFamily.SDXL).text_parameters == 123_060_480 + 694_659_840  # CLIP-L + bigG
    assert describe(ModelFamily.SD2).text_parameters == 354_032_640  # OpenCLIP-H text, 24 blocks


def test_planner_reads_each_familys_text_width():
    assert reference_sizes(ModelFamily.SD1).text_hidden == 768
    assert reference_sizes(ModelFamily.SD2).text_hidden == 1024
    assert reference_sizes(ModelFamily.SDXL).text_hidden == 768 + 1280


@pytest.mark.parametrize(
    ("family", "side", "budget"),
    [(ModelFamily.SD2, 768, 2 * GiB), (ModelFamily.SDXL, 1024, 4 * GiB), (ModelFamily.SD1, 512, 1 * GiB)],
)
def test_issue_targets_fit_their_budgets_in_fp16(family, side, budget):
    sizes = reference_sizes(family, dtype_bytes=2)
    for efficient in (True, False):
        plan = plan_memory(sizes, PlanRequest(width=side, height=side, efficient_attention=efficient), budget)
        assert plan.peak <= budget * 0.9
        # The smallest plan cannot go below the largest part that must sit on the device whole: the
        # text encoders during the text stage.
        assert plan.minimum >= sizes.text_encoder
    resident = plan_memory(sizes, PlanRequest(width=side, height=side, efficient_attention=True), None)
    assert resident.placement == "resident" and resident.peak > budget  # the budget really constrains


def test_unet_attention_terms_at_the_first_attention_level():
    from leansd.engine.planner import unet_activation

    sd1, sdxl = reference_sizes(ModelFamily.SD1), reference_sizes(ModelFamily.SDXL)
    assert (sd1.attention_level, sd1.attention_channels, sd1.attention_heads) == (0, 320, 8)
    assert (sdxl.attention_level, sdxl.attention_channels, sdxl.attention_heads) == (1, 640, 10)
    request = PlanRequest(width=1024, height=1024, efficient_attention=False)
    n = 128 * 128
    # SDXL's scores: 10 heads over (N/4)^2 token pairs, 8.5 bytes each (fp32 scores and softmax), CFG batched.
    scores = int(8.5 * 2 * 10 * (n // 4) ** 2)
    assert unet_activation(sdxl, request, cfg_batched=True, chunk=None) == (14 * 2 + 16) * 2 * (n // 4) * 640 + scores
    efficient = PlanRequest(width=1024, height=1024, efficient_attention=True)
    assert unet_activation(sdxl, efficient, cfg_batched=True, chunk=None) == 18 * 2 * n * 320 * 2
    assert unet_activation(sd1, efficient, cfg_batched=True, chunk=None) == 28 * 2 * n * 320 * 2  # unchanged
