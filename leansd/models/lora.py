"""LoRA networks: read kohya / AUTOMATIC1111, LyCORIS LoCon and diffusers / PEFT files; apply them.

A LoRA layer adds a low-rank term to a Linear or Conv2d weight (Hu et al. 2021), as
AUTOMATIC1111 does it: ``W' = W + multiplier * (alpha / rank) * up @ down`` (``alpha`` defaults
to the rank). Here the term is applied on the fly: a forward hook adds
``multiplier * (alpha / rank) * up(down(x))`` to the layer's output, which is the same linear map.
The model's own weights are never written, so:

- switching or removing LoRAs restores the original model bit for bit, instantly, without a
  reload and without a backup copy of any weight (memory grows by the LoRA tensors only);
- every memory plan works unchanged: the hook runs wherever the layer runs (resident, per-stage
  placement, or streamed block by block / layer by layer), and the LoRA tensors follow the input
  to its device and dtype once.

File formats (keys):

- kohya / A1111: ``lora_unet_<module>.lora_down.weight``, ``.lora_up.weight``, ``.alpha``;
  ``lora_te_`` for the SD 1.x/2.x text encoder, ``lora_te1_`` / ``lora_te2_`` for SDXL's two;
  ``<module>`` is the diffusers module path with ``_`` for ``.``. LyCORIS LoCon uses the same
  keys with convolution ``down`` weights (``(rank, in, kh, kw)``).
- diffusers / PEFT: ``unet.<module path>.lora_A.weight`` / ``lora_B.weight`` (or ``.lora.down`` /
  ``.lora.up``), ``text_encoder.`` / ``text_encoder_2.`` for the text encoders, attention
  processor names (``attn1.processor.to_q_lora.down.weight``), optional ``.alpha``.

Component targets are named ``unet``, ``te`` (SD 1.x/2.x), ``te1`` and ``te2`` (SDXL), so an SDXL
model plugs in by naming its two text encoders.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

from leansd.errors import ModelLoadError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

TEXT_TARGETS = ("te", "te1", "te2")
_KOHYA_PREFIXES = (("lora_unet_", "unet"), ("lora_te1_", "te1"), ("lora_te2_", "te2"), ("lora_te_", "te"))
_DIFFUSERS_PREFIXES = (("unet.", "unet"), ("text_encoder_2.", "te2"), ("text_encoder.", "te"), ("lora_unet.", "unet"))
_KOHYA_SUFFIXES = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
_DOTTED_SUFFIXES = (
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora.down.weight", "down"),
    (".lora.up.weight", "up"),
    (".lora_down.weight", "down"),
    (".lora_up.weight", "up"),
    (".alpha", "alpha"),
)
_PROCESSOR = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
_UNSUPPORTED = {
    "hada_w1_a": "LyCORIS LoHa",
    "lokr_w1": "LyCORIS LoKr",
    "lokr_w1_a": "LyCORIS LoKr",
    "oft_diag": "OFT",
    "lora_mid.weight": "LyCORIS LoCon with a CP-decomposed middle weight",
    "diff": "full-weight difference (LyCORIS 'full')",
}


@dataclass(frozen=True)
class LoraLayer:
    """One adapted layer: ``down`` (rank, in[, kh, kw]), ``up`` (out, rank[, 1, 1]), ``alpha``."""

    down: "torch.Tensor"
    up: "torch.Tensor"
    alpha: float | None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        """``alpha / rank`` (1 when the file has no alpha, as A1111 and diffusers)."""
        return 1.0 if self.alpha is None else float(self.alpha) / self.rank

    def delta_shape(self) -> tuple[int, ...]:
        """Shape of the adapted weight: (out, in) or (out, in, kh, kw)."""
        return (int(self.up.shape[0]), *(int(d) for d in self.down.shape[1:]))

    def delta(self) -> "torch.Tensor":
        """``(alpha / rank) * up @ down`` in float32, shaped like the adapted weight (for checks and tests)."""
        up = self.up.float().flatten(1)
        down = self.down.float().flatten(1)
        shape = (up.shape[0], *self.down.shape[1:])
        return (up @ down).reshape(shape) * self.scale


@dataclass
class LoraFile:
    """A LoRA read from disk: ``layers`` keyed by (target, module key)."""

    name: str
    path: Path
    layers: dict[tuple[str, str], LoraLayer]
    nbytes: int = 0

    @property
    def targets(self) -> set[str]:
        return {target for target, _ in self.layers}


def read_lora(path: str | os.PathLike[str], *, name: str | None = None) -> LoraFile:
    """Read a LoRA file (``.safetensors``; ``.pt``/``.ckpt`` through the weights-only loader).

    Raises ModelLoadError (one line, naming the file) for unreadable files, unsafe pickles,
    files with no LoRA keys and formats that are not supported (LoHa, LoKr, ...).
    """
    from leansd.models.checkpoint import read_state_dict

    p = Path(path)
    state = read_state_dict(p)
    return lora_from_state_dict(state, name=name or p.stem, path=p)


def lora_from_state_dict(
    state: Mapping[str, "torch.Tensor"], *, name: str, path: Path | None = None
) -> LoraFile:
    """Group a LoRA state dict by layer; see the module docstring for the key layouts."""
    where = str(path) if path is not None else name
    for key in state:
        tail = key.split(".", 1)[-1]
        for marker, label in _UNSUPPORTED.items():
            if tail == marker or tail.startswith(marker + ".") or key.endswith("." + marker):
                raise ModelLoadError(f"{where}: {label} networks are not supported (only LoRA and LoCon)")
    parts: dict[tuple[str, str], dict[str, "torch.Tensor"]] = {}
    ignored: list[str] = []
    for key, value in state.items():
        parsed = _parse_key(key)
        if parsed is None:
            ignored.append(key)
            continue
        target, module, role = parsed
        parts.setdefault((target, module), {})[role] = value
    layers: dict[tuple[str, str], LoraLayer] = {}
    nbytes = 0
    for (target, module), roles in parts.items():
        if "down" not in roles or "up" not in roles:
            missing = "up" if "down" in roles else "down"
            raise ModelLoadError(f"{where}: layer {target}:{module} has no '{missing}' weight; the file is incomplete")
        down, up = roles["down"], roles["up"]
        if down.shape[0] != up.shape[1] or down.dim() not in (2, 4) or up.dim() not in (2, 4):
            raise ModelLoadError(
                f"{where}: layer {target}:{module} has mismatched LoRA shapes {tuple(down.shape)} and {tuple(up.shape)}"
            )
        alpha = roles.get("alpha")
        layers[(target, module)] = LoraLayer(down, up, None if alpha is None else float(alpha.float().item()))
        nbytes += down.numel() * down.element_size() + up.numel() * up.element_size()
    if not layers:
        raise ModelLoadError(f"{where}: no LoRA weights in this file (expected lora_unet_*/lora_te_* or diffusers keys)")
    if ignored:
        logger.warning("%s: %d key(s) that are not LoRA weights ignored, e.g. %s", where, len(ignored), ignored[0])
    return LoraFile(name=name, path=path or Path(name), layers=layers, nbytes=nbytes)


def _parse_key(key: str) -> tuple[str, str, str] | None:
    """(target, module key with '_' separators, role) of one state-dict key, or None."""
    for prefix, target in _KOHYA_PREFIXES:
        if key.startswith(prefix) and "." in key:
            base, suffix = key.split(".", 1)
            role = _KOHYA_SUFFIXES.get(suffix)
            if role is None:
                return None
            module = base[len(prefix):]
            return target, _text_key(module) if target != "unet" else module, role
    processor = _PROCESSOR.search(key)
    if processor:  # attention-processor LoRA: "attn1.processor.to_out_lora.down.weight" -> "attn1.to_out.0"
        layer = processor.group(1)
        path = key[: processor.start()] + "." + (layer + ".0" if layer == "to_out" else layer)
        role = processor.group(2)
    else:
        for suffix, suffix_role in _DOTTED_SUFFIXES:
            if key.endswith(suffix):
                path, role = key[: -len(suffix)], suffix_role
                break
        else:
            return None
    target = "unet"
    for prefix, candidate in _DIFFUSERS_PREFIXES:
        if path.startswith(prefix):
            path, target = path[len(prefix):], candidate
            break
    module = path.replace(".", "_")
    return target, _text_key(module) if target != "unet" else module, role


def _text_key(module: str) -> str:
    """Text-encoder module keys always start at ``text_model_`` (transformers 5 modules lack that level)."""
    return module if module.startswith("text_model_") else "text_model_" + module


def module_index(model: "torch.nn.Module", target: str) -> dict[str, "torch.nn.Module"]:
    """Module key (as in LoRA files) -> Linear/Conv2d module of ``model`` (a UNet or a text encoder)."""
    import torch

    index: dict[str, "torch.nn.Module"] = {}
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            key = name.replace(".", "_")
            index[key if target == "unet" else _text_key(key)] = module
    return index


@dataclass(frozen=True)
class ActiveLora:
    """A LoRA and its multipliers: ``te`` for the text encoder(s), ``unet`` for the UNet."""

    lora: LoraFile
    te: float = 1.0
    unet: float = 1.0

    def multiplier(self, target: str) -> float:
        return self.unet if target == "unet" else self.te


class _LoraHook:
    """Forward hook of one adapted layer: adds sum_i m_i * (alpha_i / r_i) * up_i(down_i(x))."""

    def __init__(self, module: "torch.nn.Module", terms: list[tuple[LoraLayer, float]]) -> None:
        import torch

        self.conv = isinstance(module, torch.nn.Conv2d)
        self.terms = terms
        self._cache: dict[tuple, list[tuple["torch.Tensor", "torch.Tensor", float]]] = {}

    def _weights(self, module: Any, device: "torch.device", dtype: "torch.dtype") -> list:
        """(down, up, factor) per LoRA on `device` in `dtype`; no copy when the file's tensors already are."""
        key = (device, dtype)
        if key not in self._cache:
            self._cache.clear()  # one placement at a time: keep only the copy the layer uses now
            out = []
            for layer, multiplier in self.terms:
                down, up = layer.down, layer.up
                if self.conv:
                    if down.dim() == 2:  # a linear LoRA on a 1x1 convolution
                        down = down[:, :, None, None]
                    if up.dim() == 2:
                        up = up[:, :, None, None]  # (out, rank, 1, 1)
                else:
                    down, up = down.flatten(1), up.flatten(1)  # 1x1 convolution LoRA on a Linear layer
                out.append((down.to(device=device, dtype=dtype), up.to(device=device, dtype=dtype),
                            multiplier * layer.scale))
            self._cache[key] = out
        return self._cache[key]

    def __call__(self, module: Any, args: tuple, output: "torch.Tensor") -> "torch.Tensor":
        import torch.nn.functional as F

        x = args[0]
        dtype = output.dtype  # under autocast the layer computed in this dtype
        for down, up, factor in self._weights(module, x.device, dtype):
            h = x.to(dtype)
            if self.conv:
                h = F.conv2d(h, down, None, module.stride, module.padding, module.dilation)
                h = F.conv2d(h, up)
            else:
                h = F.linear(F.linear(h, down), up)
            output = output + h * factor  # multiplier * alpha / rank
        return output


@dataclass
class LoraPatch:
    """The LoRAs applied to a model's components (forward hooks); :meth:`remove` undoes it exactly."""

    active: tuple[ActiveLora, ...]
    handles: list = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def apply_loras(
    components: Mapping[str, "torch.nn.Module"], active: Sequence[ActiveLora], *, family: str = "this model"
) -> LoraPatch:
    """Hook ``active`` LoRAs into ``components`` (target name -> module: ``unet``, ``te``, ...).

    Raises ModelLoadError when a LoRA is for another family: it targets a component the model
    lacks (an SDXL LoRA's ``te1``/``te2`` on SD 1.x), a layer's shape differs, or nothing of it
    matches. Keys that match no layer are reported in one warning.
    """
    indexes = {target: module_index(module, target) for target, module in components.items()}
    terms: dict[tuple[str, str], list[tuple[LoraLayer, float]]] = {}
    unmatched: list[str] = []
    for item in active:
        lora = item.lora
        foreign = sorted(t for t in lora.targets if t not in components and not (t == "te" and "te1" in components))
        if foreign:
            raise ModelLoadError(
                f"LoRA {lora.name!r} ({lora.path}) is for another model family: it adapts "
                f"{', '.join(foreign)}, which {family} does not have"
            )
        matched = 0
        for (target, key), layer in lora.layers.items():
            component = "te1" if target == "te" and "te" not in components else target
            module = indexes[component].get(key)
            if module is None:
                unmatched.append(f"{lora.name}:{target}:{key}")
                continue
            expected = _expected_shape(module)
            got = layer.delta_shape()
            # A 2-D LoRA (or a Linear layer) counts as a 1x1 kernel: a 3x3 LoCon on a Linear, or a
            # linear LoRA on a 3x3 convolution, cannot be applied (its output would not fit).
            if got[:2] != expected[:2] or _kernel(got) != _kernel(expected):
                raise ModelLoadError(
                    f"LoRA {lora.name!r} ({lora.path}) is for another model family: layer {target}:{key} "
                    f"is {got}, {family} has {expected}"
                )
            matched += 1
            if item.multiplier(target) != 0:
                terms.setdefault((component, key), []).append((layer, item.multiplier(target)))
        if matched == 0:
            raise ModelLoadError(
                f"LoRA {lora.name!r} ({lora.path}) matches no layer of {family}; it is for another model family"
            )
    patch = LoraPatch(tuple(active), unmatched=unmatched)
    for (component, key), layer_terms in terms.items():
        module = indexes[component][key]
        patch.handles.append(module.register_forward_hook(_LoraHook(module, layer_terms)))
    if unmatched:
        modules = sorted({u.split(":", 1)[1].split("_")[0] for u in unmatched})
        logger.warning(
            "%d LoRA layer(s) match no module of %s and are not applied (%s), e.g. %s",
            len(unmatched), family, ", ".join(modules), ", ".join(unmatched[:3]),
        )
    return patch


def _kernel(shape: tuple[int, ...]) -> tuple[int, ...]:
    return shape[2:] if len(shape) == 4 else (1, 1)


def _expected_shape(module: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in module.weight.shape)


def lora_identity(active: Iterable[ActiveLora], target_prefix: str) -> str:
    """A stable id of what the active LoRAs do to the components whose name starts with ``target_prefix``.

    Used in the prompt-cache key (``te``): names, file hashes and multipliers of every LoRA that
    adapts a text encoder with a non-zero multiplier (the hash of the weights, not the
    ``sshs_model_hash`` a file's metadata may carry). Empty when none does.
    """
    parts = []
    for item in active:
        if any(t.startswith(target_prefix) for t in item.lora.targets) and item.multiplier(target_prefix) != 0:
            parts.append(f"{_content_hash(item.lora.path)[:16]}*{item.multiplier(target_prefix)!r}")
    return "+".join(parts)


def _content_hash(path: str | os.PathLike[str]) -> str:
    """A hash of the LoRA's weights themselves (never a hash copied into the file's metadata, which
    can be stale): kohya's addnet hash for ``.safetensors``, else the file's sha256; memoised."""
    from leansd.models.hashes import addnet_hash, file_sha256

    return addnet_hash(path) if Path(path).suffix.lower() == ".safetensors" else file_sha256(path)


def lora_short_hash(path: str | os.PathLike[str]) -> str:
    """AUTOMATIC1111's short LoRA hash (12 hex digits); see :func:`leansd.models.hashes.addnet_hash`."""
    from leansd.models.hashes import addnet_short_hash

    return addnet_short_hash(path)
