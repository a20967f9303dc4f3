"""VAE override (AUTOMATIC1111's ``sd_vae`` / ``--vae-path``): read a VAE file for a loaded model.

A VAE file holds the autoencoder alone, in the original layout (``encoder.down.0.block.0...``,
as ``vae-ft-mse-840000-ema-pruned``), the same with a ``first_stage_model.`` prefix, or diffusers'
layout (``encoder.down_blocks.0.resnets.0...``). Loss and EMA tensors some files carry are ignored.
The result is a new ``AutoencoderKL`` with the model's VAE configuration; a VAE of another shape
(another family) is a clear error. Pickle-based files go through the weights-only loader.

Choices, as A1111's ``sd_vae`` setting: ``Automatic`` (default) uses ``<checkpoint stem>.vae.*``
beside a single-file checkpoint when there is one, else the checkpoint's own VAE; ``None`` is
the checkpoint's own VAE; anything else is a file path or a name (stem or file name) from the
VAE folder.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from leansd.errors import InvalidRequestError, ModelLoadError

if TYPE_CHECKING:
    from diffusers import AutoencoderKL

    from leansd.models.library import ModelLibrary

AUTOMATIC = "Automatic"
NONE = "None"
_PARTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")


def resolve_vae(
    choice: str | None,
    *,
    library: "ModelLibrary",
    checkpoint: str | os.PathLike[str] | None,
    allow_paths: bool = True,
) -> Path | None:
    """The VAE file ``choice`` means (None: the checkpoint's own VAE). Raises InvalidRequestError.

    ``allow_paths=False`` (network front ends) accepts only Automatic, None and the library's VAEs,
    never a file path on the server.
    """
    from leansd.models.library import automatic_vae

    text = (choice or AUTOMATIC).strip()
    if text.lower() == AUTOMATIC.lower():
        return automatic_vae(checkpoint) if checkpoint is not None else None
    if text.lower() == NONE.lower():
        return None
    if allow_paths:
        path = Path(text).expanduser()
        if path.is_file():
            return path
    entry = library.get("vae", text)
    if entry is None:
        matches = [e for e in library.entries("vae") if e.path.name == text]
        entry = matches[0] if len(matches) == 1 else None
    if entry is None:
        names = library.names("vae")
        raise InvalidRequestError(
            f"VAE {text!r}: {'no such file, and ' if allow_paths else ''}no VAE of that name in {library.folder('vae')} (--vae-dir); "
            f"valid: {', '.join([AUTOMATIC, NONE, *names])}"
        )
    return entry.path


def load_vae_file(path: str | os.PathLike[str], *, like: "AutoencoderKL") -> "AutoencoderKL":
    """A new AutoencoderKL shaped like ``like`` with the weights of the VAE file ``path``."""
    import accelerate
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    from leansd.models.checkpoint import read_state_dict

    p = Path(path)
    sd = read_state_dict(p)
    if any(k.startswith("first_stage_model.") for k in sd):
        sd = {k[len("first_stage_model."):]: v for k, v in sd.items() if k.startswith("first_stage_model.")}
    sd = {k: v for k, v in sd.items() if k.startswith(_PARTS)}
    if not sd:
        raise ModelLoadError(f"{p}: holds no VAE weights (encoder.*, decoder.*)")
    config = dict(like.config)
    if any(k.startswith("encoder.down.") for k in sd):  # original layout
        try:
            sd = convert_ldm_vae_checkpoint({"first_stage_model." + k: v for k, v in sd.items()}, config)
        except (KeyError, IndexError, RuntimeError, ValueError) as exc:
            raise ModelLoadError(f"{p}: is not a VAE for this model ({exc})") from exc
    with accelerate.init_empty_weights(include_buffers=False):
        vae = AutoencoderKL.from_config(config)
    expected = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    missing = sorted(set(expected) - set(sd))
    wrong = sorted(k for k in set(expected) & set(sd) if tuple(sd[k].shape) != expected[k])
    if missing or wrong:
        what = f"{len(wrong)} tensor(s) of another shape, e.g. {wrong[0]}" if wrong else f"{len(missing)} missing tensor(s), e.g. {missing[0]}"
        raise ModelLoadError(f"{p}: this VAE does not fit the loaded model ({what}); it is for another model family")
    dtype = like.dtype
    vae.load_state_dict({k: sd[k].to(dtype) for k in expected}, assign=True, strict=True)
    vae.eval().requires_grad_(False)
    return vae
