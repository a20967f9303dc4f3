"""What a UNet predicts (epsilon or v), told as AUTOMATIC1111 users tell it.

For a single file, first match wins:
1. an explicit choice (``--prediction-type``, ``Engine.load(prediction_type=...)``);
2. a ``.yaml`` beside the checkpoint with the same stem (the original inference configs:
   ``parameterization: "v"`` in ``v2-inference-v.yaml``; none in ``v2-inference.yaml``);
3. marker keys in the file: ``v_pred`` (v-prediction) and ``ztsnr`` (zero terminal SNR) that
   v-prediction fine-tunes carry;
4. the family's default, except for an SD 2.x (4-channel) file, where the UNet is probed once:
   run on a constant half-grey latent at the last training timestep with a constant context, an
   epsilon model returns about its input, a v model about minus the clean image, so the mean of
   (output - input) falls far below zero. The decision and its reason are logged.
For a diffusers folder: the explicit choice, else its ``scheduler/scheduler_config.json``.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from leansd.errors import InvalidRequestError, ModelLoadError

logger = logging.getLogger(__name__)

PREDICTION_TYPES = ("epsilon", "v_prediction")
V_PRED_MARKER = "v_pred"
ZTSNR_MARKER = "ztsnr"
PROBE_THRESHOLD = -1.0
"""v-prediction when mean(UNet(x) - x) is below this (x = 0.5 everywhere, t = 999)."""
PROBE_TIMESTEP = 999
_YAML_MAX_BYTES = 1 << 20
_PARAMETERIZATION = re.compile(r"""^\s*parameterization\s*:\s*["']?([A-Za-z_]+)["']?\s*(#.*)?$""")


def normalise_prediction_type(value: str | None) -> str | None:
    """"epsilon", "eps", "v", "v_prediction", "v-prediction" -> the diffusers name; None stays None."""
    if value is None:
        return None
    key = str(value).strip().lower().replace("-", "_")
    key = {"eps": "epsilon", "v": "v_prediction", "vpred": "v_prediction", "v_pred": "v_prediction"}.get(key, key)
    if key not in PREDICTION_TYPES:
        raise InvalidRequestError(f"unknown prediction type {value!r}; valid: {', '.join(PREDICTION_TYPES)}")
    return key


def yaml_beside(path: str | os.PathLike[str]) -> Path | None:
    """The ``.yaml`` (or ``.yml``) beside a checkpoint with the same stem, if there is one."""
    p = Path(path)
    for suffix in (".yaml", ".yml"):
        candidate = p.with_suffix(suffix)
        if candidate.is_file():
            return candidate
    return None


def prediction_from_yaml(path: str | os.PathLike[str]) -> str:
    """The prediction type an original inference config declares (``model.params.parameterization``).

    Read with ``yaml.safe_load`` when PyYAML is installed, else a line scan for
    ``parameterization:``; no ``parameterization`` means epsilon (the LatentDiffusion default).
    """
    p = Path(path)
    try:
        if p.stat().st_size > _YAML_MAX_BYTES:
            raise ModelLoadError(f"{p}: too large for a model config ({p.stat().st_size} bytes)")
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{p}: cannot read the model config ({type(e).__name__}: {e})") from e
    value: Any = None
    try:
        import yaml
    except ImportError:
        for line in text.splitlines():
            if m := _PARAMETERIZATION.match(line):
                value = m[1]
                break
    else:
        try:
            data = yaml.safe_load(text)
        except (yaml.YAMLError, RecursionError) as e:  # deep nesting exhausts the parser's recursion
            raise ModelLoadError(f"{p}: not a valid YAML model config ({one_line_yaml(e)})") from e
        model = data.get("model") if isinstance(data, dict) else None
        params = model.get("params") if isinstance(model, dict) else None
        value = params.get("parameterization") if isinstance(params, dict) else None
    if value is None:
        return "epsilon"
    try:
        return normalise_prediction_type(str(value)) or "epsilon"
    except InvalidRequestError:
        raise ModelLoadError(f"{p}: parameterization {value!r} is not supported (expected eps or v)") from None


def one_line_yaml(error: Exception) -> str:
    return " ".join(str(error).split())[:200]


def markers(sd: Mapping[str, Any]) -> tuple[bool, bool]:
    """(v_pred, ztsnr): the marker keys a file carries."""
    return V_PRED_MARKER in sd, ZTSNR_MARKER in sd


def probe_v_prediction(unet: Any, *, context_width: int) -> tuple[bool, float]:
    """Run the UNet once (see the module docstring); returns (is v-prediction, mean(out - x))."""
    import torch

    dtype = next(unet.parameters()).dtype
    x = torch.full((1, int(unet.config.in_channels), 8, 8), 0.5, dtype=dtype)  # (1, 4, 8, 8)
    context = torch.full((1, 2, context_width), 0.5, dtype=dtype)  # (1, 2, D)
    with torch.inference_mode():
        out = unet(x, torch.tensor([PROBE_TIMESTEP]), encoder_hidden_states=context, return_dict=False)[0]
    score = float((out.float() - x.float()).mean())
    return score < PROBE_THRESHOLD, score


def resolve_single_file(
    *,
    path: str | os.PathLike[str] | None,
    sd: Mapping[str, Any],
    explicit: str | None,
    default: str,
    probe: "Any | None",
    source: str,
) -> tuple[str, bool, str]:
    """(prediction type, zero terminal SNR, why) for a single file; ``probe()`` -> (bool, score) or None."""
    v_pred, ztsnr = markers(sd)
    if explicit is not None:
        return explicit, ztsnr, "given explicitly"
    config = yaml_beside(path) if path is not None else None
    if config is not None:
        return prediction_from_yaml(config), ztsnr, f"from {config.name}"
    if v_pred:
        return "v_prediction", ztsnr, f"the file carries the {V_PRED_MARKER!r} marker key"
    if probe is not None:
        is_v, score = probe()
        chosen = "v_prediction" if is_v else "epsilon"
        why = (f"no .yaml beside {Path(source).name} and no marker key: probed the UNet once "
               f"(mean output - input {score:.3g}, v-prediction below {PROBE_THRESHOLD:g})")
        return chosen, ztsnr, why
    return default, ztsnr, "the family's default"
