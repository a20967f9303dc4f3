"""load_model on every kind of source, round-tripping the tiny random model; errors as one-liners."""

from __future__ import annotations

import hashlib
import logging
import shutil

import pytest
import torch

from leansd.errors import ModelLoadError, UnsupportedModelError
from leansd.models import hub
from leansd.models.configs import SD1_SCHEDULER_CONFIG
from leansd.models.convert import diffusers_to_ldm
from leansd.models.family import ModelFamily
from leansd.models.loader import bundle_from_state_dict, load_model
from leansd.models.tiny import (
    TINY_DEFAULT_SIZE,
    build_tiny_components,
    write_tiny_diffusers_folder,
    write_tiny_single_file,
)


@pytest.fixture(autouse=True)
def _hash_cache(tmp_path, monkeypatch):
    """Keep model_hash's cache out of the home folder."""
    monkeypatch.setenv("LEANSD_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def reference():
    return build_tiny_components(seed=0)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {
        "safetensors": write_tiny_single_file(root / "tiny-sd.safetensors"),
        "ckpt": write_tiny_single_file(root / "tiny-sd.ckpt"),
        "ckpt-old": write_tiny_single_file(root / "tiny-old.ckpt", text_model_level=False),
        "folder": write_tiny_diffusers_folder(root / "tiny-diffusers"),
    }


def _sha10(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:10]


def _assert_same_weights(bundle, reference):
    for name in ("unet", "vae", "text_encoder"):
        loaded, expected = getattr(bundle, name).state_dict(), getattr(reference, name).state_dict()
        assert set(loaded) == set(expected), name
        for key, value in expected.items():
            assert torch.equal(loaded[key], value), f"{name}.{key}"


@pytest.mark.parametrize("kind", ["safetensors", "ckpt", "ckpt-old", "folder"])
def test_round_trip_every_tensor(files, reference, kind):
    path = files[kind]
    bundle = load_model(path)
    _assert_same_weights(bundle, reference)
    assert bundle.family is ModelFamily.SD1
    assert bundle.default_size == TINY_DEFAULT_SIZE == 64
    assert bundle.name == path.stem if kind != "folder" else bundle.name == "tiny-diffusers"
    assert bundle.source == str(path)
    assert bundle.hash == (None if kind == "folder" else _sha10(path))
    assert bundle.is_random is False
    assert bundle.scheduler_config == SD1_SCHEDULER_CONFIG
    assert len(bundle.tokenizer) == 49408
    for module in (bundle.unet, bundle.vae, bundle.text_encoder):
        assert not module.training
        assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in module.parameters())
        assert not any(p.requires_grad for p in module.parameters())
    # position_ids is a real buffer, rebuilt rather than read from the file.
    assert torch.equal(bundle.text_encoder.embeddings.position_ids, torch.arange(77)[None])


def test_tiny_spec(reference, caplog):
    with caplog.at_level(logging.WARNING, logger="leansd.models.loader"):
        bundle = load_model("tiny")
    assert "random" in caplog.text
    assert (bundle.name, bundle.source, bundle.hash, bundle.is_random) == ("tiny", "tiny", None, True)
    assert bundle.default_size == 64
    _assert_same_weights(bundle, reference)


def test_single_file_outputs_equal_in_process_models(files, reference):
    import copy

    bundle = load_model(files["safetensors"])
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 8, 8, generator=g)  # (B, 4, H/8, W/8)
    context = torch.randn(1, 77, 32, generator=g)
    ids = torch.tensor([[49406, 320, 8853, 539, 550, 18376, 49407] + [49407] * 70])

    def run(unet, vae, text_encoder):
        with torch.no_grad():
            return (
                unet(latents, 10, encoder_hidden_states=context).sample,
                vae.decode(latents).sample,
                text_encoder(ids).last_hidden_state,
            )

    expected = run(reference.unet, reference.vae, reference.text_encoder)
    # Copies into fresh (aligned) memory: bit for bit the same computation.
    copies = [copy.deepcopy(m) for m in (bundle.unet, bundle.vae, bundle.text_encoder)]
    for got, want in zip(run(*copies), expected, strict=True):
        assert got.abs().sum() > 0
        assert torch.equal(got, want)
    # In place, the parameters live in the file mapping, whose tensors are not 64-byte aligned;
    # CPU kernels may then sum in another order (measured: 1.7e-6 on the tiny UNet).
    for got, want in zip(run(bundle.unet, bundle.vae, bundle.text_encoder), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_single_file_parameters_are_the_read_tensors(files):
    """No RAM doubling: every parameter is (a view of) a tensor read from the file, not a copy."""
    from leansd.models.checkpoint import read_state_dict

    path = files["safetensors"]
    sd = read_state_dict(path)
    storages = {t.untyped_storage().data_ptr() for t in sd.values()}
    pointers = {t.data_ptr() for t in sd.values()}
    bundle = bundle_from_state_dict(sd, source=str(path), name="x")
    count = 0
    for module in (bundle.unet, bundle.vae, bundle.text_encoder):
        for name, param in module.named_parameters():
            assert param.data_ptr() in pointers, name
            assert param.untyped_storage().data_ptr() in storages, name
            count += 1
    assert count == 304 + 176 + 36
    attention = bundle.vae.encoder.mid_block.attentions[0].to_q.weight
    original = sd["first_stage_model.encoder.mid.attn_1.q.weight"]
    assert attention.shape == (32, 32) and original.shape == (32, 32, 1, 1)
    assert attention.data_ptr() == original.data_ptr()


def test_half_precision_file_keeps_its_dtype_without_copies(tmp_path, reference):
    """An fp16 file stays fp16 (no 2x upcast copy in RAM); the engine casts once when placing it."""
    from safetensors.torch import save_file

    from leansd import Engine
    from leansd.models.checkpoint import read_state_dict
    from leansd.models.loader import bundle_from_state_dict

    sd = diffusers_to_ldm(reference.unet, reference.vae, reference.text_encoder)
    half = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in sd.items()}
    path = tmp_path / "tiny-fp16.safetensors"
    save_file(half, str(path))
    read = read_state_dict(path)
    bundle = bundle_from_state_dict(read, source=str(path), name="tiny-fp16")
    param = bundle.unet.conv_in.weight
    assert param.dtype == torch.float16
    assert param.data_ptr() == read["model.diffusion_model.input_blocks.0.0.weight"].data_ptr()
    assert torch.equal(param, reference.unet.conv_in.weight.half())
    engine = Engine(load_model(path), device="cpu", precision="full")
    placed = engine.bundle.unet.conv_in.weight
    assert placed.dtype == torch.float32
    assert torch.equal(placed, reference.unet.conv_in.weight.half().float())


def _tiny_ldm(reference) -> dict[str, torch.Tensor]:
    return {
        k: v.detach().contiguous().clone()
        for k, v in diffusers_to_ldm(reference.unet, reference.vae, reference.text_encoder).items()
    }


def _save(sd, path):
    from safetensors.torch import save_file

    save_file(sd, str(path))
    return path


def test_missing_and_unexpected_tensors_are_named(tmp_path, reference):
    sd = _tiny_ldm(reference)
    del sd["model.diffusion_model.out.2.bias"]
    del sd["first_stage_model.decoder.up.0.block.0.conv1.weight"]
    with pytest.raises(ModelLoadError) as info:
        load_model(_save(sd, tmp_path / "broken.safetensors"))
    message = str(info.value)
    assert "\n" not in message
    path = tmp_path / "broken.safetensors"
    assert message.startswith(f"{path}: not a complete SD 1.x checkpoint: 2 missing tensors (")
    assert "model.diffusion_model.out.2.bias" in message
    assert "first_stage_model.decoder.up.0.block.0.conv1.weight" in message

    sd = _tiny_ldm(reference)
    sd["model.diffusion_model.input_blocks.1.1.extra.weight"] = torch.zeros(3)
    with pytest.raises(ModelLoadError) as info:
        load_model(_save(sd, tmp_path / "extra.safetensors"))
    assert str(info.value).endswith("1 unexpected tensors (model.diffusion_model.input_blocks.1.1.extra.weight)")


def test_wrong_shape_is_a_one_line_error(tmp_path, reference):
    sd = _tiny_ldm(reference)
    sd["model.diffusion_model.out.2.bias"] = torch.zeros(5)
    with pytest.raises(ModelLoadError) as info:
        load_model(_save(sd, tmp_path / "shape.safetensors"))
    assert "\n" not in str(info.value)
    assert "UNet weights do not fit the architecture" in str(info.value)
    assert "out.2.bias" in str(info.value) or "conv_out.bias" in str(info.value)


def test_sd1_inpainting_file_loads_as_a_9_channel_model(tmp_path, reference):
    sd = _tiny_ldm(reference)
    weight = torch.randn(32, 9, 3, 3)
    sd["model.diffusion_model.input_blocks.0.0.weight"] = weight
    bundle = load_model(_save(sd, tmp_path / "inpaint.safetensors"))
    assert bundle.family is ModelFamily.SD1_INPAINT
    assert bundle.is_inpainting and bundle.latent_channels == 4
    assert bundle.unet.config.in_channels == 9
    assert torch.equal(bundle.unet.conv_in.weight, weight)


@pytest.mark.parametrize(
    ("extra", "label"),
    [
        (
            {
                "conditioner.embedders.0.model.token_embedding.weight": (10, 1280),
                "model.diffusion_model.label_emb.0.0.weight": (8, 16),
            },
            "SDXL refiner",
        ),
    ],
)
def test_other_families_are_unsupported(tmp_path, extra, label):
    context = 1280
    shapes = {
        "model.diffusion_model.input_blocks.0.0.weight": (8, 4, 3, 3),
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (8, context),
        **extra,
    }
    path = _save({k: torch.zeros(s) for k, s in shapes.items()}, tmp_path / "other.safetensors")
    with pytest.raises(UnsupportedModelError) as info:
        load_model(path)
    assert str(info.value) == (
        f"{path}: recognised an {label} checkpoint; leansd supports SD 1.x, SD 2.x and SDXL base "
        "checkpoints (incl. 9-channel inpainting) for now"
    )


def test_incomplete_sd2_file_names_what_is_missing(tmp_path):
    shapes = {
        "model.diffusion_model.input_blocks.0.0.weight": (8, 4, 3, 3),
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (8, 1024),
        "cond_stage_model.model.token_embedding.weight": (10, 1024),
    }
    path = _save({k: torch.zeros(s) for k, s in shapes.items()}, tmp_path / "sd2-cut.safetensors")
    with pytest.raises(ModelLoadError) as info:
        load_model(path)
    assert str(info.value) == (
        f"{path}: not a complete SD 2.x checkpoint: cannot infer the UNet architecture: tensor out.2.weight is missing"
    )


def test_not_stable_diffusion(tmp_path):
    path = _save({"bert.embeddings.weight": torch.zeros(4, 2)}, tmp_path / "bert.safetensors")
    with pytest.raises(ModelLoadError) as info:
        load_model(path)
    assert str(info.value) == (
        f"{path} does not look like a Stable Diffusion checkpoint (no model.diffusion_model.* tensors)"
    )


def test_nonexistent_path(tmp_path):
    spec = str(tmp_path / "nope.safetensors")
    with pytest.raises(ModelLoadError) as info:
        load_model(spec)
    assert str(info.value) == (
        f"{spec}: no such file or folder (expected a .safetensors/.ckpt file, a diffusers folder, "
        "a hub id like owner/name, or 'tiny')"
    )


def test_folder_problems(tmp_path, files):
    incomplete = tmp_path / "incomplete"
    shutil.copytree(files["folder"], incomplete)
    shutil.rmtree(incomplete / "vae")
    with pytest.raises(ModelLoadError) as info:
        load_model(incomplete)
    assert str(info.value) == f"{incomplete}: incomplete diffusers model folder: missing vae/"

    no_weights = tmp_path / "no-weights"
    shutil.copytree(files["folder"], no_weights)
    (no_weights / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ModelLoadError) as info:
        load_model(no_weights)
    assert str(info.value).startswith(f"{no_weights}: cannot load unet/ (")

    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(ModelLoadError, match="without model_index.json is not a diffusers model"):
        load_model(plain)


def test_folder_schedule_keys_override(tmp_path, files):
    import json

    folder = tmp_path / "v-pred"
    shutil.copytree(files["folder"], folder)
    config_path = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config.update(prediction_type="v_prediction", beta_end=0.02, timestep_spacing="trailing")
    config_path.write_text(json.dumps(config))
    bundle = load_model(folder)
    assert bundle.scheduler_config == {**SD1_SCHEDULER_CONFIG, "prediction_type": "v_prediction", "beta_end": 0.02}


def test_hub_id_downloads_then_loads_as_folder(monkeypatch, files, reference):
    calls = []

    def fake_download(repo_id, *, token=None, **kwargs):
        calls.append((repo_id, token))
        return files["folder"]

    monkeypatch.setenv("HF_TOKEN", "hf_dummy")
    monkeypatch.setattr(hub, "download_diffusers_model", fake_download)
    bundle = load_model("someone/tiny-sd")
    assert calls == [("someone/tiny-sd", "hf_dummy")]
    assert (bundle.name, bundle.source, bundle.hash) == ("someone/tiny-sd", "someone/tiny-sd", None)
    _assert_same_weights(bundle, reference)


def test_writers_are_deterministic(tmp_path, files):
    again = write_tiny_single_file(tmp_path / "tiny-sd.safetensors")
    assert again.read_bytes() == files["safetensors"].read_bytes()
    assert files["safetensors"].stat().st_size < 16 * 2**20


def test_extras_of_original_files_are_ignored(tmp_path, reference):
    """EMA copies, the VAE's training-loss buffers and schedule buffers do not get in the way."""
    sd = _tiny_ldm(reference)
    sd["model_ema.decay"] = torch.tensor(0.9999)
    sd["model_ema.diffusion_modelout2bias"] = torch.zeros(4)
    sd["first_stage_model.loss.logvar"] = torch.zeros(())
    sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.zeros(1, 77)  # corrupted copy
    bundle = load_model(_save(sd, tmp_path / "extras.safetensors"))
    _assert_same_weights(bundle, reference)
    assert torch.equal(bundle.text_encoder.embeddings.position_ids, torch.arange(77)[None])
