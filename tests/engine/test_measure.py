"""leansd.engine.measure: exact byte counts for known op sequences, the attention modes, meta == CPU."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from leansd.engine.measure import ActivationTracker, activation_peak, round_block

DEVICES = ("meta", "cpu")


def test_round_block_is_the_cuda_allocators_512_byte_rounding():
    assert [round_block(n) for n in (0, 1, 511, 512, 513, 4000, 1024)] == [0, 512, 512, 512, 1024, 4096, 1024]


@pytest.mark.parametrize("device", DEVICES)
def test_counts_new_storages_once_and_releases_them_when_the_last_view_dies(device):
    a = torch.ones(1000, device=device)  # 4000 bytes from before: not counted
    with ActivationTracker() as t:
        b = a * 2
        assert (t.current, t.peak, t.allocations) == (4096, 4096, 1)
        v = b.view(10, 100)
        w = b[10:]
        assert t.current == 4096  # views share b's storage
        del b, w
        assert t.current == 4096  # v still holds it
        c = a + 1
        assert (t.current, t.peak) == (8192, 8192)
        del v
        assert t.current == 4096  # b's storage is gone
        e = torch.empty(3, device=device)  # 12 bytes -> one 512-byte block
        assert t.current == 4608
        del c, e
        assert (t.current, t.peak, t.allocations) == (0, 8192, 3)


@pytest.mark.parametrize("device", DEVICES)
def test_views_and_in_place_ops_on_existing_tensors_are_not_new_memory(device):
    a = torch.ones(1000, device=device)
    with ActivationTracker() as t:
        view = a[:500].view(50, 10)
        a.mul_(2)
        torch.add(a, 1, out=a)
        assert (t.current, t.peak, t.allocations) == (0, 0, 0)
    del view


def test_a_resized_storage_is_counted_at_its_new_size():
    with ActivationTracker() as t:
        x = torch.empty(0)
        assert t.current == 0
        x.resize_(1000)
        assert (t.current, t.peak) == (4096, 4096)
        del x
        assert t.current == 0


@pytest.mark.parametrize("device", DEVICES)
def test_peak_is_the_most_live_at_once_not_the_sum(device):
    a = torch.ones(256, device=device)  # 1 KiB

    def churn():
        out = None
        for _ in range(10):
            out = a * 2  # the previous one dies when the name is rebound
        return out

    result, peak = activation_peak(churn)
    assert peak == 2 * 1024  # old and new are live together during the assignment
    assert result.shape == (256,)


def test_unknown_attention_mode_names_the_valid_ones():
    with pytest.raises(ValueError, match="native, efficient, math"):
        ActivationTracker(attention="flash")


def _qkv(device, dtype=torch.float16, heads=8, tokens=64, head_dim=40):
    # As diffusers builds them: (B, N, heads * d) viewed as (B, N, heads, d), transposed to (B, heads, N, d).
    x = torch.randn(2, tokens, heads * head_dim).to(device=device, dtype=dtype)
    return x.view(2, tokens, heads, head_dim).transpose(1, 2)


def test_efficient_attention_allocates_the_flash_output_and_logsumexp_only():
    q = _qkv("meta")
    out, peak = activation_peak(F.scaled_dot_product_attention, q, q, q, attention="efficient")
    output = 2 * 64 * 8 * 40 * 2
    logsumexp = 2 * 8 * 64 * 4  # fp32, freed at once
    assert peak == output + logsumexp
    assert out.shape == (2, 8, 64, 40) and out.stride() == (64 * 8 * 40, 40, 8 * 40, 1)  # (B, N, heads, d) memory


def test_efficient_attention_over_head_dim_256_has_no_logsumexp():
    q = _qkv("meta", heads=1, head_dim=512)  # the VAE's single 512-wide head: memory-efficient kernel
    _, peak = activation_peak(F.scaled_dot_product_attention, q, q, q, attention="efficient")
    assert peak == 2 * 64 * 512 * 2


def test_math_attention_materialises_fp32_scores_and_softmax_on_meta():
    q = _qkv("meta")
    scores = 2 * 8 * 64 * 64 * 4  # fp16 inputs, fp32 scores (torch's math path upcasts)
    _, efficient = activation_peak(F.scaled_dot_product_attention, q, q, q, attention="efficient")
    _, math = activation_peak(F.scaled_dot_product_attention, q, q, q, attention="math")
    _, native = activation_peak(F.scaled_dot_product_attention, q, q, q)
    assert math >= 2 * scores > efficient
    assert native == math  # SDPA on meta takes the math path


@pytest.mark.parametrize("mode", ("efficient", "math"))
def test_attention_modes_keep_the_values_on_the_cpu(mode):
    q, k, v = (_qkv("cpu", torch.float32) for _ in range(3))
    out, _ = activation_peak(F.scaled_dot_product_attention, q, k, v, attention=mode)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))


def test_cpu_sdpa_materialises_no_scores():
    q = _qkv("cpu", torch.float32, tokens=256)
    _, native = activation_peak(F.scaled_dot_product_attention, q, q, q)
    assert native < 2 * 8 * 256 * 256 * 4  # less than one fp32 score matrix: the CPU flash kernel


@pytest.fixture(scope="module")
def tiny_unets():
    from tests.helpers import tiny_bundle

    unet = tiny_bundle().unet.eval()
    return {"cpu": unet, "meta": copy.deepcopy(unet).to("meta")}


def _unet_peak(unet, device, attention, chunk=None):
    from leansd.engine.attention import ChunkedAttnProcessor

    default = dict(unet.attn_processors)
    if chunk is not None:
        unet.set_attn_processor(ChunkedAttnProcessor(chunk))
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 8, 8, generator=generator).to(device)
    context = torch.randn(2, 77, unet.config.cross_attention_dim, generator=generator).to(device)
    try:
        with torch.no_grad():
            _, peak = activation_peak(unet, sample, 999, encoder_hidden_states=context, attention=attention)
    finally:
        unet.set_attn_processor(default)
    return peak


@pytest.mark.parametrize("attention, chunk", [("efficient", None), ("math", None), ("math", 16)])
def test_meta_measures_the_same_bytes_as_the_cpu_for_the_tiny_unet(tiny_unets, attention, chunk):
    cpu = _unet_peak(tiny_unets["cpu"], "cpu", attention, chunk)
    meta = _unet_peak(tiny_unets["meta"], "meta", attention, chunk)
    assert cpu == meta > 0


def test_chunked_attention_bounds_the_scores(tiny_unets):
    unet = tiny_unets["meta"]
    tokens, heads, batch = 8 * 8, 8, 2
    efficient = _unet_peak(unet, "meta", "efficient")
    full = _unet_peak(unet, "meta", "math")
    chunked = _unet_peak(unet, "meta", "math", chunk=16)
    assert full >= 2 * batch * heads * tokens * tokens * 4  # fp32 scores + softmax of all queries live at once
    assert efficient <= chunked < full
