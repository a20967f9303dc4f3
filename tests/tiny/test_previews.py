"""Step state from the real loop, live previews in progress events, TAESD (tiny random weights)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from leansd.errors import InvalidRequestError, ModelLoadError
from leansd.request import GenerationRequest
from leansd.sampling.samplers import sampler_names
from tests.helpers import TINY_TAESD_CONFIG, tiny_bundle, write_tiny_taesd

LAST_STEP_TO_ZERO = {"Euler", "Euler a", "Heun", "DPM2", "DPM2 a", "DPM++ 2M", "DPM++ 2M Karras",
                     "DPM++ SDE Karras", "UniPC", "LCM"}


@pytest.fixture(scope="module")
def engine():
    from leansd.engine.engine import Engine

    return Engine(tiny_bundle(), device="cpu", precision="full", prompt_cache=False)


@pytest.fixture(scope="module")
def taesd_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("taesd")
    write_tiny_taesd(folder, seed=5)
    return folder


@pytest.fixture(scope="module")
def taesd_engine(taesd_folder):
    from leansd.engine.engine import Engine
    from leansd.models.taesd import load_taesd

    return Engine(tiny_bundle(), device="cpu", precision="full", prompt_cache=False, taesd=load_taesd(taesd_folder))


def _states(engine, sampler: str, *, steps: int = 4, guidance: float = 7.5):
    from leansd.pipelines.steps import encode_conditioning, loop_length, make_scheduler, noise_for, run_denoise
    from leansd.sampling.noise import image_generators

    request = GenerationRequest(prompt="a red fox", negative_prompt="blurry", sampler=sampler, seed=11,
                                num_inference_steps=steps, guidance_scale=guidance, batch_size=2).validated()
    seeds = request.image_seeds()
    text = encode_conditioning(engine, request, steps=loop_length(engine, request, steps=steps))
    generators = image_generators(seeds)
    scheduler = make_scheduler(engine, request, seeds=seeds, steps=steps)
    latents = noise_for(engine, generators, width=64, height=64) * scheduler.init_noise_sigma
    states = []
    final = run_denoise(engine, request, scheduler=scheduler, latents=latents, generators=generators, text=text,
                        on_step=states.append)
    return states, final


@pytest.mark.parametrize("sampler", sampler_names())
def test_step_state_for_every_sampler(engine, sampler):
    states, final = _states(engine, sampler)
    total = states[0].total
    assert [s.step for s in states] == list(range(1, total + 1))
    # 2N-1 evaluations for the 2nd-order samplers; PLMS repeats its first timestep (N+1)
    assert total == {"Heun": 7, "DPM2": 7, "DPM2 a": 7, "DPM++ SDE Karras": 7, "PLMS": 5}.get(sampler, 4)
    assert all(s.latents.shape == s.denoised.shape == (2, 4, 8, 8) for s in states)
    assert torch.equal(states[-1].latents, final)
    if sampler in LAST_STEP_TO_ZERO:  # the last step lands on sigma 0: x0 is the result
        assert torch.allclose(states[-1].denoised, final.float(), atol=1e-4 * float(final.abs().max()))
    # x0 is affine in the model output, so the guided x0 mixes the branches' x0 as CFG mixes eps
    for s in states:
        negative, prompt = s.denoised_of("negative-prompt"), s.denoised_of("prompt")
        assert torch.allclose(s.denoised, negative + 7.5 * (prompt - negative), atol=1e-3 * float(s.denoised.abs().max()))
        assert not torch.allclose(prompt, negative)


def test_without_guidance_every_content_is_the_prompts(engine):
    states, _ = _states(engine, "Euler", guidance=1.0)
    s = states[1]
    assert torch.equal(s.denoised_of("prompt"), s.denoised) and torch.equal(s.denoised_of("negative-prompt"), s.denoised)
    with pytest.raises(ValueError, match="unknown preview content"):
        s.denoised_of("both")


def _generate(engine, **fields):
    events = []
    base = dict(prompt="a red fox", sampler="Euler", seed=3, num_inference_steps=4)
    result = engine.generate(GenerationRequest(**{**base, **fields}), progress=events.append, progress_bar=False)
    return result, events


def test_previews_ride_on_the_due_progress_events(engine):
    result, events = _generate(engine, num_inference_steps=5, preview_every=2, batch_size=2, n_iter=2)
    assert [(e.batch_index, e.step) for e in events if e.preview is not None] == [(0, 2), (0, 4), (1, 2), (1, 4)]
    assert all(e.preview is None for e in events if e.step % 2)
    sizes = {e.preview.size for e in events if e.preview is not None}
    assert sizes == {(16, 8)}  # Approx cheap: latent size (64 / 8), the batch of 2 side by side
    assert len(result.images) == 4


def test_no_previews_by_default(engine):
    _, events = _generate(engine)
    assert len(events) == 4 and all(e.preview is None for e in events)


def test_preview_content_changes_the_picture(engine):
    shown = {}
    for content in ("combined", "prompt", "negative-prompt"):
        _, events = _generate(engine, preview_every=2, preview_content=content, negative_prompt="blurry")
        shown[content] = np.asarray(events[1].preview)
    assert not np.array_equal(shown["prompt"], shown["negative-prompt"])
    assert not np.array_equal(shown["combined"], shown["prompt"])


def test_full_preview_of_the_last_step_is_the_result(engine):
    """Euler's last x0 is the final latent, so the full-VAE preview then equals the image (8-bit)."""
    result, events = _generate(engine, preview_every=4, preview_method="Full")
    preview = np.asarray(events[-1].preview).astype(int)
    assert preview.shape == (64, 64, 3)
    assert np.abs(preview - np.asarray(result.images[0]).astype(int)).max() <= 1


def test_taesd_preview_of_the_last_step_is_the_taesd_decoded_result(taesd_engine):
    result, events = _generate(taesd_engine, preview_every=4, preview_method="TAESD", vae_decoder="taesd")
    preview = np.asarray(events[-1].preview).astype(int)
    assert preview.shape == (64, 64, 3)  # TAESD upsamples 8x
    assert np.abs(preview - np.asarray(result.images[0]).astype(int)).max() <= 1
    assert "VAE decoder: TAESD (approximate)" in result.infotexts[0]


def test_taesd_decoder_is_diffusers_autoencoder_tiny(taesd_engine, taesd_folder):
    from diffusers import AutoencoderTiny

    from leansd.engine.previews import taesd_decode

    reference = AutoencoderTiny.from_pretrained(str(taesd_folder)).eval()
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference.decode(latents / reference.config.scaling_factor).sample
    assert torch.allclose(taesd_decode(taesd_engine, latents), expected, atol=1e-6)


def test_taesd_changes_the_picture_and_full_infotext_says_nothing(taesd_engine):
    full, _ = _generate(taesd_engine)
    tiny, _ = _generate(taesd_engine, vae_decoder="taesd")
    assert full.seeds == tiny.seeds
    assert not np.array_equal(np.asarray(full.images[0]), np.asarray(tiny.images[0]))
    assert "VAE decoder" not in full.infotexts[0]


@pytest.mark.parametrize("fields, message", [
    (dict(vae_decoder="taesd"), "the TAESD decoder need TAESD weights"),
    (dict(preview_every=2, preview_method="taesd"), "TAESD previews need TAESD weights"),
])
def test_taesd_without_weights_is_a_clear_error(engine, fields, message):
    with pytest.raises(InvalidRequestError, match=message):
        engine.generate(GenerationRequest(prompt="x", num_inference_steps=2, **fields), progress_bar=False)


@pytest.mark.parametrize("fields, message", [
    (dict(preview_every=-1), "preview_every must be between 0"),
    (dict(preview_every=2.5), "preview_every must be an integer"),
    (dict(preview_method="fancy"), "unknown preview_method 'fancy'; valid: approx-cheap, taesd, full"),
    (dict(preview_content="both"), "unknown preview_content 'both'; valid: combined, prompt, negative-prompt"),
    (dict(vae_decoder="tiny"), "unknown vae_decoder 'tiny'; valid: full, taesd"),
])
def test_bad_preview_fields(fields, message):
    with pytest.raises(InvalidRequestError, match=message.replace("(", r"\(")):
        GenerationRequest(prompt="x", **fields).validated()


def test_a1111_spellings_are_accepted():
    request = GenerationRequest(prompt="x", preview_method="Approx cheap", preview_content="Negative prompt").validated()
    assert (request.preview_method, request.preview_content) == ("approx-cheap", "negative-prompt")


def test_load_taesd_errors(tmp_path):
    from diffusers import AutoencoderKL

    from leansd.models.taesd import load_taesd

    with pytest.raises(ModelLoadError, match="no such folder"):
        load_taesd(tmp_path / "missing")
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_taesd(tmp_path)
    (tmp_path / "file.safetensors").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="expected a diffusers AutoencoderTiny folder"):
        load_taesd(tmp_path / "file.safetensors")
    kl = tmp_path / "kl"
    AutoencoderKL(block_out_channels=(32,), norm_num_groups=32).save_pretrained(str(kl))
    with pytest.raises(ModelLoadError, match="holds a AutoencoderKL, not a TAESD"):
        load_taesd(kl)
    wide = tmp_path / "wide"
    from diffusers import AutoencoderTiny

    AutoencoderTiny(**{**TINY_TAESD_CONFIG, "latent_channels": 16}).save_pretrained(str(wide))
    with pytest.raises(ModelLoadError, match="decodes 16-channel latents but the model makes 4"):
        load_taesd(wide, latent_channels=4)


def test_taesd_previews_stay_within_a_virtual_budget():
    """On a budgeted (virtual) device TAESD runs there only when it fits beside the UNet stage."""
    from diffusers import AutoencoderTiny

    from leansd.engine.engine import Engine
    from leansd.engine.previews import taesd_need, taesd_on_device

    torch.manual_seed(0)
    taesd = AutoencoderTiny().eval()  # the published TAESD architecture (2.4 M parameters), random weights

    def run(vram, *, every=1):
        engine = Engine(tiny_bundle(), device="cpu", precision="full", prompt_cache=False, vram=vram,
                        virtual_device=True, taesd=taesd)
        seen = []

        def progress(event):
            seen.append((taesd_on_device(engine, width=64, height=64, batch=1), engine.memory.current))

        engine.generate(GenerationRequest(prompt="x", sampler="Euler", seed=1, num_inference_steps=2,
                                          preview_every=every, preview_method="taesd"),
                        progress=progress, progress_bar=False)
        return engine, seen

    roomy, seen = run(4 << 30)
    need = taesd_need(roomy, width=64, height=64, batch=1)
    weights = sum(p.numel() * 4 for p in taesd.parameters())
    assert need == weights + 3 * 64 * 64 * 64 * 4  # fp32 weights + three 64-channel maps at 64x64
    assert all(on for on, _ in seen)
    unet_stage = seen[0][1]
    assert roomy.memory.peak == max(run(4 << 30, every=0)[0].memory.peak, unet_stage + need) <= roomy.budget
    # a budget that holds every stage but not TAESD beside the UNet: TAESD decodes on the host
    budget = unet_stage + need // 2
    tight, seen = run(budget)
    assert seen and not any(on for on, _ in seen) and tight.memory.peak <= budget


def test_full_previews_within_a_virtual_budget():
    """Full-VAE previews run in place only where the plan keeps the VAE resident and its activations fit."""
    from leansd.engine.engine import Engine
    from leansd.engine.previews import full_preview_bytes

    def run(vram):
        engine = Engine(tiny_bundle(), device="cpu", precision="full", prompt_cache=False, vram=vram,
                        virtual_device=True)
        seen = []

        def progress(event):
            seen.append((full_preview_bytes(engine), event.preview.size))

        result = engine.generate(GenerationRequest(prompt="x", sampler="Euler", seed=1, num_inference_steps=2,
                                                   preview_every=1, preview_method="full"),
                                 progress=progress, progress_bar=False)
        return engine, seen, result

    roomy, seen, result = run(4 << 30)
    assert all(need == roomy.plan.activations["vae"] > 0 and size == (64, 64) for need, size in seen)
    assert roomy.memory.peak <= roomy.budget
    # at the smallest budget the plan keeps only the running stage's model on the device: the VAE is
    # not there during sampling, so the preview falls back to Approx cheap (1/8 size) instead
    tight, seen, _ = run(roomy.plan.minimum * 5 // 4)  # the minimum plus the planner's safety margin
    assert not tight.plan.resident("vae")
    assert seen and all(need is None and size == (8, 8) for need, size in seen)
    assert tight.memory.peak <= tight.budget


def test_taesd_hub_id_offline_is_one_clear_line():
    from leansd.errors import OfflineError
    from leansd.models.taesd import load_taesd

    with pytest.raises(OfflineError, match=r"--taesd leansd-test/no-such-taesd: the hub cannot be reached and it is "
                                           r"not in the local Hugging Face cache"):
        load_taesd("leansd-test/no-such-taesd")  # HF_HUB_OFFLINE=1 in the test suite
