"""The pure memory planner, driven with plain integers."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from leansd.engine.planner import (
    GiB,
    MiB,
    ModelSizes,
    PlanRequest,
    candidate_plans,
    format_size,
    parse_size,
    plan_memory,
)
from leansd.errors import InvalidRequestError

# SD 1.5 in fp16, rounded: CLIP-L 246M, UNet 1.72G in 8 blocks + the rest (its two largest layers,
# the up blocks' 2560 -> 1280 3x3 convolutions, are 56M each), VAE 167M.
SD15 = ModelSizes(
    text_encoder=246 * MiB,
    unet_blocks=(33 * MiB, 104 * MiB, 390 * MiB, 60 * MiB, 460 * MiB, 330 * MiB, 100 * MiB, 43 * MiB),
    unet_rest=200 * MiB,
    vae=167 * MiB,
    unet_channels=320,
    unet_heads=8,
    vae_channels=128,
    unet_layer_peak=113 * MiB,
    vae_mid_channels=512,
)
R512 = PlanRequest(width=512, height=512)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("4G", 4 * GiB), ("1500M", 1500 * MiB), ("750MiB", 750 * MiB), ("2.5GB", int(2.5 * GiB)), ("auto", "auto"),
     ("none", None), (None, None), (123, 123)],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["4X", "-1G", "G", "0", "lots", 0])
def test_parse_size_rejects(bad):
    with pytest.raises(InvalidRequestError, match="memory size"):
        parse_size(bad)


def test_no_budget_is_all_resident_and_unchunked():
    plan = plan_memory(SD15, R512, None)
    assert (plan.placement, plan.cfg_batched, plan.attention_chunk, plan.vae_tile, plan.vae_on_cpu) == (
        "resident", True, None, None, False)
    assert plan.resident("text") and plan.resident("unet") and plan.resident("vae")


def test_degrades_step_by_step_as_the_budget_shrinks():
    """Smaller budgets never give a larger peak, and placement only moves towards streaming."""
    order = ["resident", "text-visits", "stages", "stream", "stream-layers"]
    last_peak, last_rank = None, -1
    for budget in [8 * GiB, 4 * GiB, 3 * GiB, 2 * GiB, 1536 * MiB, 1280 * MiB, 1100 * MiB, 700 * MiB, 400 * MiB]:
        plan = plan_memory(SD15, PlanRequest(width=512, height=512, efficient_attention=True), budget, prefer_speed=True)
        assert plan.peak <= budget
        rank = order.index(plan.placement)
        assert rank >= last_rank
        last_rank = rank
        if last_peak is not None:
            assert plan.peak <= last_peak
        last_peak = plan.peak
    assert last_rank == order.index("stream-layers")


def test_layer_streaming_reaches_the_lowest_peak_target():
    """SD 1.5 at 512x512 in fp16 plans under 600 MiB only by streaming layer by layer: blocks of up to
    460M (plus the prefetched one and the 200M rest) cannot."""
    request = PlanRequest(width=512, height=512, efficient_attention=True)
    plan = plan_memory(SD15, request, 600 * MiB)
    assert plan.placement == "stream-layers" and plan.peak <= 540 * MiB
    assert plan.streamed_bytes_per_step == SD15.unet
    blocks_only = ModelSizes(**{**SD15.__dict__, "unet_layer_peak": 0})  # no layer streaming offered
    with pytest.raises(InvalidRequestError):
        plan_memory(blocks_only, request, 600 * MiB)
    assert plan_memory(SD15, request, 8 * GiB, policy="lowvram").placement == "stream"  # blocks when they fit


def test_prefers_residency_when_it_fits():
    plan = plan_memory(SD15, PlanRequest(width=512, height=512, efficient_attention=True), 4 * GiB)
    assert plan.placement == "resident"


def test_below_minimum_names_the_minimum():
    with pytest.raises(InvalidRequestError) as info:
        plan_memory(SD15, R512, 150 * MiB)
    message = str(info.value)
    minimum = min(p.peak for _, p in candidate_plans(SD15, R512, None))
    assert "--vram 150M is below the minimum of" in message and "512x512" in message
    stated = message.split("minimum of ")[1].split(" ")[0]
    assert parse_size(stated) >= minimum / 0.9
    plan_memory(SD15, R512, parse_size(stated))  # the stated minimum is enough


def test_turbo_plans_against_the_whole_budget():
    minimum = min(p.peak for _, p in candidate_plans(SD15, R512, None))
    with pytest.raises(InvalidRequestError):
        plan_memory(SD15, R512, minimum)
    assert plan_memory(SD15, R512, minimum, prefer_speed=True).peak <= minimum


def test_presets():
    request = PlanRequest(width=512, height=512, efficient_attention=True)
    assert plan_memory(SD15, request, 8 * GiB, policy="lowvram").placement == "stream"
    assert plan_memory(SD15, request, 8 * GiB, policy="medvram").placement == "stages"
    with pytest.raises(InvalidRequestError, match="medvram"):
        plan_memory(SD15, request, 8 * GiB, policy="fast")


def test_large_image_tiles_the_vae_and_chunks_attention():
    plan = plan_memory(SD15, PlanRequest(width=2048, height=2048), 4 * GiB)
    assert plan.vae_tile is not None or plan.vae_on_cpu
    assert plan.attention_chunk is not None
    assert plan.peak <= 4 * GiB


def test_vae_on_cpu_request():
    plan = plan_memory(SD15, PlanRequest(width=512, height=512, vae_on_cpu=True), None)
    assert plan.vae_on_cpu and not plan.resident("vae") and plan.stage_peaks["vae"] < plan.stage_peaks["unet"]


def test_describe_is_one_line():
    line = plan_memory(SD15, R512, 2 * GiB).describe()
    assert "\n" not in line and "budget 2G" in line and "placement" in line


def test_format_size_rounds_up():
    assert format_size(412 * MiB + 1) == "413M"
    assert format_size(4 * GiB) == "4G"


sizes = st.builds(
    ModelSizes,
    text_encoder=st.integers(1, 2 * GiB),
    unet_blocks=st.lists(st.integers(1, GiB), min_size=1, max_size=12).map(tuple),
    unet_rest=st.integers(0, 2 * GiB),
    vae=st.integers(1, GiB),
    unet_channels=st.integers(1, 640),
    unet_heads=st.integers(1, 16),
    vae_channels=st.integers(1, 256),
    dtype_bytes=st.sampled_from([2, 4]),
    unet_layer_peak=st.integers(0, GiB),
)
requests = st.builds(
    PlanRequest,
    width=st.integers(1, 32).map(lambda k: 64 * k),
    height=st.integers(1, 32).map(lambda k: 64 * k),
    batch=st.integers(1, 4),
    passes=st.integers(1, 3),
    efficient_attention=st.booleans(),
    vae_on_cpu=st.booleans(),
)


@settings(max_examples=150, deadline=None)
@given(sizes=sizes, request=requests, budget=st.integers(1, 64 * GiB), turbo=st.booleans(),
       policy=st.sampled_from(["auto", "medvram", "lowvram"]))
def test_plan_never_exceeds_the_budget_or_names_the_minimum(sizes, request, budget, turbo, policy):
    try:
        plan = plan_memory(sizes, request, budget, prefer_speed=turbo, policy=policy)
    except InvalidRequestError as exc:
        minimum = min(p.peak for _, p in candidate_plans(sizes, request, None, policy=policy))
        assert minimum > (budget if turbo else int(budget * 0.9))
        stated = parse_size(str(exc).split("minimum of ")[1].split(" ")[0])
        plan_memory(sizes, request, stated, prefer_speed=turbo, policy=policy)  # the stated minimum suffices
        return
    assert plan.peak <= budget
    assert plan.minimum <= plan.peak
