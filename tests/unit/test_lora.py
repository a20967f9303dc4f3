"""LoRA: prompt tags, file formats, the maths, exact restore, bad files, the library, hashes."""

from __future__ import annotations

import hashlib
import logging
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from leansd import Engine, GenerationRequest
from leansd.errors import InvalidRequestError, ModelLoadError
from leansd.models.hashes import addnet_hash, addnet_short_hash
from leansd.models.library import ModelLibrary, automatic_vae
from leansd.models.lora import ActiveLora, apply_loras, lora_from_state_dict, read_lora
from leansd.prompts.extra_networks import LoraTag, extract_networks, lora_tags, strip_networks
from tests.helpers import tiny_bundle, tiny_kohya_lora

# ------------------------------------------------------------------ prompt tags

TAG_CASES = [
    ("a cat <lora:ink:0.8>", [LoraTag("ink", 0.8, 0.8)]),
    ("<lora:ink>", [LoraTag("ink", 1.0, 1.0)]),
    ("<lora:ink:0.5:1.2>", [LoraTag("ink", 0.5, 1.2)]),
    ("<lora:ink:te=0.3:unet=-1>", [LoraTag("ink", 0.3, -1.0)]),
    ("<lora:ink:1:2:dyn=8>", [LoraTag("ink", 1.0, 2.0)]),
    ("<lyco:loha:1.5> <lora:b:2>", [LoraTag("loha", 1.5, 1.5), LoraTag("b", 2.0, 2.0)]),
    ("<hypernet:x:1> cat", []),  # other kinds: removed from the text, not applied (A1111 skips them)
    ("a cat", []),
]


@pytest.mark.parametrize(("prompt", "expected"), TAG_CASES)
def test_lora_tags(prompt, expected):
    assert lora_tags(prompt) == expected


def test_tags_are_removed_from_the_text_as_a1111():
    assert strip_networks("a cat <lora:ink:0.8>, (red:1.2) <hypernet:x:1>") == "a cat , (red:1.2) "
    text, tags = extract_networks("<lora:a:1>x<lyco:b:2>")
    assert text == "x" and [t.kind for t in tags] == ["lora", "lyco"]


@pytest.mark.parametrize("prompt", ["<lora::1>", "<lora:ink:abc>", "<lora:ink:inf>", "<lora:ink:bad=1>"])
def test_bad_tags_are_clear_errors(prompt):
    with pytest.raises(InvalidRequestError, match="lora"):
        lora_tags(prompt)


# ------------------------------------------------------------------ the maths on one layer


def test_linear_and_conv_layers_add_mult_alpha_over_rank_up_down():
    torch.manual_seed(0)
    linear = torch.nn.Linear(6, 5)
    conv = torch.nn.Conv2d(3, 4, 3, padding=1)
    state = {
        "lora_unet_lin.lora_down.weight": torch.randn(2, 6), "lora_unet_lin.lora_up.weight": torch.randn(5, 2),
        "lora_unet_lin.alpha": torch.tensor(1.0),
        "lora_unet_conv.lora_down.weight": torch.randn(2, 3, 3, 3), "lora_unet_conv.lora_up.weight": torch.randn(4, 2, 1, 1),
        "lora_unet_conv.alpha": torch.tensor(3.0),
    }
    lora = lora_from_state_dict(state, name="t")
    model = torch.nn.ModuleDict({"lin": linear, "conv": conv})
    x, img = torch.randn(7, 6), torch.randn(1, 3, 8, 8)
    before_lin, before_conv = linear(x), conv(img)
    patch = apply_loras({"unet": model}, [ActiveLora(lora, te=1.0, unet=0.7)])
    w_lin = linear.weight + 0.7 * (1.0 / 2) * state["lora_unet_lin.lora_up.weight"] @ state["lora_unet_lin.lora_down.weight"]
    up, down = state["lora_unet_conv.lora_up.weight"].flatten(1), state["lora_unet_conv.lora_down.weight"].flatten(1)
    w_conv = conv.weight + 0.7 * (3.0 / 2) * (up @ down).reshape(conv.weight.shape)
    torch.testing.assert_close(linear(x), torch.nn.functional.linear(x, w_lin, linear.bias), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(conv(img), torch.nn.functional.conv2d(img, w_conv, conv.bias, padding=1),
                               rtol=1e-5, atol=1e-5)
    patch.remove()
    assert torch.equal(linear(x), before_lin) and torch.equal(conv(img), before_conv)


def test_diffusers_peft_keys_read_like_kohya():
    kohya = tiny_kohya_lora(text=True)
    peft = {}
    for key, value in kohya.items():
        base, suffix = key.split(".", 1)
        if base.startswith("lora_unet_"):
            continue
        module = base[len("lora_te_text_model_"):].replace("_", ".")
        module = module.replace("self.attn", "self_attn").replace("q.proj", "q_proj").replace("k.proj", "k_proj")
        module = module.replace("v.proj", "v_proj").replace("out.proj", "out_proj")
        role = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight", "alpha": "alpha"}[suffix]
        peft[f"text_encoder.text_model.{module}.{role}"] = value
    a = lora_from_state_dict({k: v for k, v in kohya.items() if k.startswith("lora_te_")}, name="k")
    b = lora_from_state_dict(peft, name="p")
    assert a.layers.keys() == b.layers.keys()
    processor = lora_from_state_dict({
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.down.weight": torch.zeros(2, 32),
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.up.weight": torch.zeros(32, 2),
    }, name="proc")
    assert list(processor.layers) == [("unet", "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0")]


# ------------------------------------------------------------------ whole model: exact restore, cache key

@pytest.fixture()
def library(tmp_path: Path) -> ModelLibrary:
    (tmp_path / "models" / "Lora" / "styles").mkdir(parents=True)
    save_file(tiny_kohya_lora(seed=1), str(tmp_path / "models" / "Lora" / "styles" / "ink.safetensors"))
    save_file(tiny_kohya_lora(seed=2, text=False), str(tmp_path / "models" / "Lora" / "unetonly.safetensors"))
    return ModelLibrary(data_dir=tmp_path)


def _request(prompt: str, **kw) -> GenerationRequest:
    base = dict(prompt=prompt, negative_prompt="blurry", width=64, height=64, num_inference_steps=3, sampler="DDIM",
                seed=4)
    base.update(kw)
    return GenerationRequest(**base)


def test_switching_restores_the_original_weights_bit_for_bit(library):
    engine = Engine(tiny_bundle(), device="cpu", precision="full", prompt_cache=False, library=library)
    before = {k: v.clone() for k, v in {**engine.bundle.unet.state_dict(),
                                        **{"te." + k: v for k, v in engine.bundle.text_encoder.state_dict().items()}}.items()}
    plain = engine.generate(_request("a red fox"), progress_bar=False).pixels
    ink = engine.generate(_request("a red fox <lora:ink:0.8>"), progress_bar=False).pixels
    both = engine.generate(_request("a red fox <lora:ink:0.8> <lora:unetonly:-0.5>"), progress_bar=False).pixels
    again = engine.generate(_request("a red fox"), progress_bar=False).pixels
    after = {**engine.bundle.unet.state_dict(),
             **{"te." + k: v for k, v in engine.bundle.text_encoder.state_dict().items()}}
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    np.testing.assert_array_equal(plain, again)
    assert np.abs(ink - plain).max() > 1e-3 and np.abs(both - ink).max() > 1e-3
    # Zero multipliers change nothing; a negative multiplier is allowed.
    np.testing.assert_array_equal(engine.generate(_request("a red fox <lora:ink:0>"), progress_bar=False).pixels, plain)


def test_negative_prompt_tags_stay_text(library):
    engine = Engine(tiny_bundle(), device="cpu", precision="full", prompt_cache=False, library=library)
    tagged = engine.generate(_request("a red fox", negative_prompt="<lora:ink:1>"), progress_bar=False)
    assert engine.active_loras == ()
    plain = engine.generate(_request("a red fox", negative_prompt="blurry"), progress_bar=False)
    assert np.abs(tagged.pixels - plain.pixels).max() > 1e-3  # the tag was encoded as text
    assert "Lora hashes" not in tagged.infotexts[0]


def test_prompt_cache_key_includes_text_encoder_loras(library, tmp_path):
    from leansd.prompts.cache import PromptCache

    cache = PromptCache(tmp_path / "cache")
    cached = Engine(tiny_bundle(), device="cpu", precision="full", prompt_cache=cache, library=library)
    fresh = Engine(tiny_bundle(), device="cpu", precision="full", prompt_cache=False, library=library)
    base = cached.text_encoder_fingerprint()
    cached.generate(_request("a red fox"), progress_bar=False)  # fills the cache without the LoRA
    with_lora = cached.generate(_request("a red fox <lora:ink:1>"), progress_bar=False)
    assert cached.text_encoder_fingerprint() != base
    expected = fresh.generate(_request("a red fox <lora:ink:1>"), progress_bar=False)
    np.testing.assert_array_equal(with_lora.pixels, expected.pixels)  # no stale hit from the LoRA-less entry
    half = cached.generate(_request("a red fox <lora:ink:0.5>"), progress_bar=False)
    np.testing.assert_array_equal(half.pixels, fresh.generate(_request("a red fox <lora:ink:0.5>"),
                                                              progress_bar=False).pixels)
    # A UNet-only LoRA leaves the text encoder's key alone.
    cached.generate(_request("a red fox <lora:unetonly:1>"), progress_bar=False)
    assert cached.text_encoder_fingerprint() == base


def test_infotext_keeps_the_tag_and_writes_lora_hashes(library):
    from leansd.outputs.infotext import parse_infotext

    engine = Engine(tiny_bundle(), device="cpu", precision="full", prompt_cache=False, library=library)
    result = engine.generate(_request("a red fox <lora:ink:0.8>"), progress_bar=False)
    info = parse_infotext(result.infotexts[0])
    assert info["Prompt"] == "a red fox <lora:ink:0.8>"
    path = library.require("lora", "ink").path
    assert info["Lora hashes"] == f"ink: {addnet_hash(path)[:12]}"
    assert '"ink: ' in result.infotexts[0]  # quoted, as A1111 writes it
    # PNG Info (the /png-info route and the web UI's tab) reads it back from the file.
    from leansd.frontends.a1111 import encode_png, png_info

    parameters = png_info(encode_png(result.images[0], result.infotexts[0]))["parameters"]
    assert parameters["Lora hashes"] == info["Lora hashes"] and parameters["Prompt"] == "a red fox <lora:ink:0.8>"


def test_missing_lora_is_a_clear_error(library):
    engine = Engine(tiny_bundle(), device="cpu", precision="full", prompt_cache=False, library=library)
    with pytest.raises(InvalidRequestError, match=r"no lora named 'nope'.*available: ink, unetonly"):
        engine.generate(_request("a fox <lora:nope:1>"), progress_bar=False)


# ------------------------------------------------------------------ wrong family, unknown keys, bad files

def _te_only(state: dict) -> dict:
    return {k: v for k, v in state.items() if k.startswith("lora_te_")}


def test_wrong_family_is_a_clear_error():
    bundle = tiny_bundle()
    components = {"unet": bundle.unet, "te": bundle.text_encoder}
    sdxl = {k.replace("lora_te_", "lora_te1_"): v for k, v in _te_only(tiny_kohya_lora()).items()}
    with pytest.raises(ModelLoadError, match="another model family.*te1"):
        apply_loras(components, [ActiveLora(lora_from_state_dict(sdxl, name="xl"))], family="SD 1.x")
    wide = {k: (torch.zeros(4, 1024) if k.endswith("attn2_to_k.lora_down.weight") else v)
            for k, v in tiny_kohya_lora(text=False).items()}
    with pytest.raises(ModelLoadError, match="another model family: layer unet:.*attn2_to_k"):
        apply_loras(components, [ActiveLora(lora_from_state_dict(wide, name="sd2"))], family="SD 1.x")
    nothing = {"lora_unet_input_blocks_1_1_proj_in.lora_down.weight": torch.zeros(2, 4),
               "lora_unet_input_blocks_1_1_proj_in.lora_up.weight": torch.zeros(4, 2)}
    with pytest.raises(ModelLoadError, match="matches no layer"):
        apply_loras(components, [ActiveLora(lora_from_state_dict(nothing, name="none"))], family="SD 1.x")


def test_unmatched_keys_are_reported_in_one_warning(caplog):
    bundle = tiny_bundle()
    state = tiny_kohya_lora(text=False)
    state["lora_unet_mid_block_nothing_here.lora_down.weight"] = torch.zeros(2, 4)
    state["lora_unet_mid_block_nothing_here.lora_up.weight"] = torch.zeros(4, 2)
    state["lora_unet_up_blocks_9_x.lora_down.weight"] = torch.zeros(2, 4)
    state["lora_unet_up_blocks_9_x.lora_up.weight"] = torch.zeros(4, 2)
    with caplog.at_level(logging.WARNING, logger="leansd.models.lora"):
        patch = apply_loras({"unet": bundle.unet, "te": bundle.text_encoder},
                            [ActiveLora(lora_from_state_dict(state, name="extra"))])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith("2 LoRA layer(s) match no module")
    assert "mid_block_nothing_here" in warnings[0] and "up_blocks_9_x" in warnings[0]
    assert len(patch.unmatched) == 2
    patch.remove()


def test_bad_files(tmp_path):
    good = tmp_path / "good.safetensors"
    save_file(tiny_kohya_lora(), str(good))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(ModelLoadError, match="truncated.safetensors"):
        read_lora(truncated)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as f:
        pickle.dump({"lora_unet_x.lora_down.weight": Evil()}, f)
    with pytest.raises(ModelLoadError, match="evil.pt"):
        read_lora(evil)
    loha = tmp_path / "loha.safetensors"
    save_file({"lora_unet_x.hada_w1_a": torch.zeros(2, 2), "lora_unet_x.hada_w1_b": torch.zeros(2, 2)}, str(loha))
    with pytest.raises(ModelLoadError, match="LoHa networks are not supported"):
        read_lora(loha)
    half = tmp_path / "half.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, str(half))
    with pytest.raises(ModelLoadError, match="no 'up' weight"):
        read_lora(half)
    none = tmp_path / "none.safetensors"
    save_file({"model.diffusion_model.x": torch.zeros(2)}, str(none))
    with pytest.raises(ModelLoadError, match="no LoRA weights"):
        read_lora(none)
    pt = tmp_path / "plain.pt"
    torch.save(tiny_kohya_lora(text=False), pt)  # a tensors-only pickle goes through the weights-only loader
    unet_keys = {k for k in read_lora(good).layers if k[0] == "unet"}
    assert set(read_lora(pt).layers) == unet_keys


# ------------------------------------------------------------------ hashes

def test_addnet_hash_and_sshs_metadata(tmp_path):
    path = tmp_path / "a.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.ones(2, 2)}, str(path))
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert addnet_hash(path) == hashlib.sha256(raw[8 + n:]).hexdigest()
    assert addnet_short_hash(path) == hashlib.sha256(raw[8 + n:]).hexdigest()[:12]
    tagged = tmp_path / "b.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.ones(2, 2)}, str(tagged),
              metadata={"sshs_model_hash": "ABCDEF0123456789" * 4})
    assert addnet_short_hash(tagged) == "abcdef012345"
    hostile = tmp_path / "c.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.ones(2, 2)}, str(hostile),
              metadata={"sshs_model_hash": "<img src=x onerror=alert(1)>"})
    assert addnet_short_hash(hostile) == addnet_hash(hostile)[:12]  # not hex: ignored
    pt = tmp_path / "d.pt"
    pt.write_bytes(b"not really a pickle")
    assert addnet_short_hash(pt) == hashlib.sha256(b"not really a pickle").hexdigest()[:12]


# ------------------------------------------------------------------ the library

def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def test_library_scans_recursively_by_stem(tmp_path):
    _touch(tmp_path / "models/Stable-diffusion/sd15.safetensors")
    _touch(tmp_path / "models/Stable-diffusion/anime/waifu.ckpt")
    _touch(tmp_path / "models/Stable-diffusion/notes.txt")
    _touch(tmp_path / "models/Stable-diffusion/.hidden/secret.safetensors")
    _touch(tmp_path / "models/VAE/ft-mse.vae.safetensors")
    _touch(tmp_path / "embeddings/sub/bad-hands.pt")
    lib = ModelLibrary(data_dir=tmp_path)
    assert lib.names("checkpoint") == ["sd15", "waifu"]
    assert lib.names("vae") == ["ft-mse.vae"]
    assert lib.names("embedding") == ["bad-hands"]
    assert lib.names("lora") == []  # the folder does not exist: nothing, no error
    waifu = lib.find_checkpoint("waifu")
    assert waifu is not None and waifu.relative == "anime/waifu.ckpt"
    assert lib.find_checkpoint("anime/waifu.ckpt").path == waifu.path
    assert lib.find_checkpoint("anime/waifu.ckpt [0123456789]").path == waifu.path  # A1111 title
    assert lib.find_checkpoint("waifu.ckpt").path == waifu.path
    assert lib.find_checkpoint("nothing") is None
    assert waifu.title("0123456789") == "anime/waifu.ckpt [0123456789]"
    # Refresh sees new files.
    _touch(tmp_path / "models/Stable-diffusion/new.safetensors")
    assert "new" not in lib.names("checkpoint")
    lib.refresh("checkpoint")
    assert "new" in lib.names("checkpoint")


def test_duplicate_names_are_an_error_naming_both(tmp_path):
    a = _touch(tmp_path / "models/Lora/a/ink.safetensors")
    b = _touch(tmp_path / "models/Lora/b/ink.pt")
    lib = ModelLibrary(data_dir=tmp_path)
    with pytest.raises(InvalidRequestError) as err:
        lib.get("lora", "ink")
    assert str(a) in str(err.value) and str(b) in str(err.value) and "ambiguous" in str(err.value)
    assert lib.get("lora", "a/ink.safetensors").path == a  # the relative path still names one


def test_explicit_folders_override_and_must_exist(tmp_path):
    loras = tmp_path / "elsewhere"
    _touch(loras / "x.safetensors")
    lib = ModelLibrary.from_options(data_dir=tmp_path, lora_dir=loras)
    assert lib.names("lora") == ["x"] and lib.folder("checkpoint") == tmp_path / "models/Stable-diffusion"
    with pytest.raises(InvalidRequestError, match="--lora-dir .*: no such folder"):
        ModelLibrary.from_options(lora_dir=tmp_path / "missing")


def test_automatic_vae_beside_the_checkpoint(tmp_path):
    ckpt = _touch(tmp_path / "m.safetensors")
    assert automatic_vae(ckpt) is None
    vae = _touch(tmp_path / "m.vae.pt")
    assert automatic_vae(ckpt) == vae
    preferred = _touch(tmp_path / "m.vae.safetensors")
    assert automatic_vae(ckpt) == preferred


def test_kernel_size_mismatch_is_a_clear_error_not_a_crash_mid_generation():
    # A linear LoRA on a 3x3 convolution, and a 3x3 LoCon on a Linear layer: their outputs would not
    # fit the layer's, so they are refused when applied, naming the layer.
    model = torch.nn.ModuleDict({"lin": torch.nn.Linear(6, 5), "conv": torch.nn.Conv2d(3, 4, 3, padding=1)})
    linear_on_conv = {"lora_unet_conv.lora_down.weight": torch.randn(2, 3), "lora_unet_conv.lora_up.weight": torch.randn(4, 2)}
    conv_on_linear = {"lora_unet_lin.lora_down.weight": torch.randn(2, 6, 3, 3),
                      "lora_unet_lin.lora_up.weight": torch.randn(5, 2, 1, 1)}
    for state, layer in ((linear_on_conv, "unet:conv"), (conv_on_linear, "unet:lin")):
        with pytest.raises(ModelLoadError, match=f"another model family: layer {layer} is"):
            apply_loras({"unet": model}, [ActiveLora(lora_from_state_dict(state, name="k"))], family="SD 1.x")
    # A 1x1 LoCon on a Linear and a linear LoRA on a 1x1 convolution still apply.
    one = torch.nn.Conv2d(3, 4, 1)
    ok = {"lora_unet_lin.lora_down.weight": torch.randn(2, 6, 1, 1), "lora_unet_lin.lora_up.weight": torch.randn(5, 2, 1, 1),
          "lora_unet_one.lora_down.weight": torch.randn(2, 3), "lora_unet_one.lora_up.weight": torch.randn(4, 2)}
    model = torch.nn.ModuleDict({"lin": torch.nn.Linear(6, 5), "one": one})
    img = torch.randn(1, 3, 4, 4)
    before = one(img)
    patch = apply_loras({"unet": model}, [ActiveLora(lora_from_state_dict(ok, name="ok"))])
    delta = (ok["lora_unet_one.lora_up.weight"] @ ok["lora_unet_one.lora_down.weight"])[:, :, None, None]
    torch.testing.assert_close(one(img), before + torch.nn.functional.conv2d(img, delta), rtol=1e-5, atol=1e-5)
    patch.remove()


def test_prompt_cache_key_hashes_the_weights_not_the_metadata_hash(tmp_path):
    # Two LoRAs carrying the same (copied, stale) sshs_model_hash but different text-encoder
    # weights must not share prompt-cache entries.
    from leansd.models.lora import lora_identity

    te = _te_only(tiny_kohya_lora())
    stale = {"sshs_model_hash": "ab" * 32}
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    save_file(te, str(one), metadata=stale)
    save_file({k: v * 2 if k.endswith("lora_up.weight") else v for k, v in te.items()}, str(two), metadata=stale)
    assert addnet_short_hash(one) == addnet_short_hash(two) == "ab" * 6  # A1111's infotext hash: as stored
    first = lora_identity([ActiveLora(read_lora(one))], "te")
    second = lora_identity([ActiveLora(read_lora(two))], "te")
    assert first and second and first != second
    assert first.split("*")[0] == addnet_hash(one)[:16]
