"""Our original-layout single files read by diffusers' own converter functions (offline, configs passed
explicitly): every tensor diffusers makes of the file equals the one our loader makes of it.

The writer and the loader are otherwise only checked against each other; this pins the key names of
the SDXL (sgm: ``conditioner.embedders.0.transformer`` CLIP-L, ``conditioner.embedders.1.model``
OpenCLIP-bigG with fused ``in_proj``), SD 2.x (OpenCLIP-H under ``cond_stage_model.model``) and SD 1.x
layouts to what ``diffusers.loaders.single_file_utils`` (``convert_ldm_unet_checkpoint``,
``convert_ldm_vae_checkpoint``, ``convert_ldm_clip_checkpoint``, ``convert_open_clip_checkpoint``)
expects of the original files.
"""

from __future__ import annotations

import pytest
import torch

from leansd.models.family import ModelFamily
from leansd.models.loader import load_model
from leansd.models.tiny import write_tiny_single_file


def _normalised(state: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """diffusers' text keys carry transformers' ``text_model.`` level; drop it where the model's have none."""
    own = set(model.state_dict())
    out = {}
    for key, value in state.items():
        if key not in own and key.startswith("text_model.") and key[len("text_model."):] in own:
            key = key[len("text_model."):]
        out[key] = value
    return out


def _assert_same(ours: torch.nn.Module, reference: dict[str, torch.Tensor], part: str,
                 skip: tuple[str, ...] = ()) -> None:
    mine = {k: v for k, v in ours.state_dict().items() if not k.endswith("position_ids") and k not in skip}
    theirs = {k: v for k, v in _normalised(reference, ours).items() if not k.endswith("position_ids")}
    assert sorted(theirs) == sorted(mine), f"{part}: key sets differ"
    for key, value in mine.items():
        assert theirs[key].shape == value.shape, f"{part}.{key}: {tuple(theirs[key].shape)} vs {tuple(value.shape)}"
        assert torch.equal(theirs[key].to(value.dtype), value), f"{part}.{key} differs"


@pytest.mark.parametrize(("family", "inpainting"), [(ModelFamily.SDXL, False), (ModelFamily.SDXL, True),
                                                    (ModelFamily.SD2, False), (ModelFamily.SD1, False)])
def test_diffusers_converters_read_our_single_files(tmp_path, family, inpainting):
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )
    from safetensors.torch import load_file

    path = write_tiny_single_file(tmp_path / "m.safetensors", family=family, inpainting=inpainting)
    checkpoint = load_file(str(path))
    bundle = load_model(path, prediction_type="epsilon")
    assert bundle.unet.config.in_channels == (9 if inpainting else 4)

    _assert_same(bundle.unet, convert_ldm_unet_checkpoint(checkpoint, dict(bundle.unet.config)), "unet")
    _assert_same(bundle.vae, convert_ldm_vae_checkpoint(checkpoint, dict(bundle.vae.config)), "vae")
    if family is ModelFamily.SDXL:
        assert any(k.startswith("conditioner.embedders.0.transformer.") for k in checkpoint)
        _assert_same(bundle.text_encoder, convert_ldm_clip_checkpoint(checkpoint), "text_encoder")
        _assert_same(bundle.text_encoder_2, convert_open_clip_checkpoint(
            bundle.text_encoder_2, checkpoint, prefix="conditioner.embedders.1.model."), "text_encoder_2")
    elif family is ModelFamily.SD2:
        # diffusers' SD 2 text encoder has no projection (it ignores the file's text_projection); ours keeps it
        _assert_same(bundle.text_encoder, convert_open_clip_checkpoint(bundle.text_encoder, checkpoint), "text_encoder",
                     skip=("text_projection.weight",))
        assert torch.equal(bundle.text_encoder.text_projection.weight,
                           checkpoint["cond_stage_model.model.text_projection"].T)
    else:
        _assert_same(bundle.text_encoder, convert_ldm_clip_checkpoint(checkpoint), "text_encoder")
