"""TAESD: the tiny autoencoder (diffusers `AutoencoderTiny`) used for live previews and as a fast decoder.

`taesd` matches the SD 1.x/2.x latent space, `taesdxl` SDXL's (the family description names the
hub id: `ModelFamily.latent_preview.taesd_repo`). Weights are read from a diffusers folder
(`config.json` + `diffusion_pytorch_model.safetensors`) or a hub id (online, or from the local
Hugging Face cache). No device choice here: the module comes back on the CPU in float32.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from leansd.errors import ModelLoadError, OfflineError

if TYPE_CHECKING:
    from diffusers import AutoencoderTiny

logger = logging.getLogger(__name__)


def load_taesd(spec: "str | os.PathLike[str]", *, latent_channels: int | None = None) -> "AutoencoderTiny":
    """Load TAESD from a diffusers folder or a hub id (e.g. madebyollin/taesd); one-line errors.

    `latent_channels` (the model's, if known): a TAESD for another latent space is refused.
    """
    from leansd.models import hub

    text = os.fspath(spec)
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"--taesd {text}: no config.json in the folder (expected a diffusers AutoencoderTiny)")
        module = _from_pretrained(str(path), label=text)
    elif path.exists():
        raise ModelLoadError(
            f"--taesd {text}: expected a diffusers AutoencoderTiny folder (config.json + weights) or a hub id"
        )
    elif hub.is_hub_id(text):
        module = _from_hub(text)
    else:
        raise ModelLoadError(f"--taesd {text}: no such folder (expected a diffusers AutoencoderTiny folder or a hub id)")
    channels = int(module.config.latent_channels)
    if latent_channels is not None and channels != latent_channels:
        raise ModelLoadError(
            f"--taesd {text}: it decodes {channels}-channel latents but the model makes {latent_channels}"
        )
    module.requires_grad_(False)
    return module.eval()


def _from_pretrained(source: str, *, label: str, **options: object) -> "AutoencoderTiny":
    """AutoencoderTiny.from_pretrained, refusing another model's folder and missing weights (which
    diffusers would fill with random values, with only a warning)."""
    import torch
    from diffusers import AutoencoderTiny

    try:
        config = AutoencoderTiny.load_config(source, **options)
        kind = config.get("_class_name")
        if kind != "AutoencoderTiny":
            raise ModelLoadError(f"--taesd {label}: holds a {kind or 'model of unknown class'}, not a TAESD (AutoencoderTiny)")
        module, info = AutoencoderTiny.from_pretrained(source, torch_dtype=torch.float32, output_loading_info=True,
                                                       **options)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        first = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise ModelLoadError(f"--taesd {label}: cannot load it as a TAESD (AutoencoderTiny): {first}") from exc
    missing = list(info.get("missing_keys") or [])
    if missing:
        raise ModelLoadError(f"--taesd {label}: its weights lack {len(missing)} tensors (e.g. {missing[0]})")
    return module


def _from_hub(repo_id: str) -> "AutoencoderTiny":
    """A hub id: downloaded online; offline (HF_HUB_OFFLINE=1 or no answer) only the local cache."""
    from leansd.models import hub

    offline = hub.hub_offline() or not hub._probe_endpoint(hub.hub_endpoint(), timeout=3.0)
    if not offline:
        with hub._hub_errors(repo_id, None):
            return _from_pretrained(repo_id, label=repo_id, token=hub.hf_token())
    try:
        return _from_pretrained(repo_id, label=repo_id, local_files_only=True)
    except ModelLoadError as exc:
        raise OfflineError(
            f"--taesd {repo_id}: the hub cannot be reached and it is not in the local Hugging Face cache; "
            "download it once online or pass a local folder"
        ) from exc
