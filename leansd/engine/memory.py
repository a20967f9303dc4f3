"""Accounting of what the engine placed on the compute device, and the model sizes the planner needs."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from leansd.engine.planner import ModelSizes
    from leansd.models.bundle import ModelBundle
    from leansd.models.family import ModelFamily

logger = logging.getLogger(__name__)


class MemoryMeter:
    """Bytes placed on the compute device by our placement operations, plus the planner's activation
    estimate of the running stage; and the peak of their sum.

    On a CUDA device this is the engine's own view (`torch.cuda.max_memory_allocated` is the
    measured truth); on the CPU with a virtual budget it is the only view, and the tests hold it
    to the budget.
    """

    def __init__(self, budget: int | None = None) -> None:
        self.budget = budget
        self.placed: dict[str, int] = {}
        self.activation = 0
        self.stage = ""
        self.peak = 0

    @property
    def current(self) -> int:
        return sum(self.placed.values()) + self.activation

    def place(self, name: str, nbytes: int) -> None:
        self.placed[name] = nbytes
        self._update()

    def release(self, name: str) -> None:
        self.placed.pop(name, None)

    def enter_stage(self, stage: str, activation: int) -> None:
        self.stage, self.activation = stage, activation
        self._update()

    def reset_peak(self) -> None:
        """Between requests: no stage runs, only the placed weights count."""
        self.activation = 0
        self.peak = self.current

    def _update(self) -> None:
        if self.current > self.peak:
            self.peak = self.current
        if self.budget is not None and self.current > self.budget:
            logger.warning(
                "accounted device memory %d MiB exceeds the budget of %d MiB in stage %s",
                self.current >> 20, self.budget >> 20, self.stage,
            )


def module_bytes(module: "torch.nn.Module", dtype_bytes: int | None = None) -> int:
    """Bytes of parameters and buffers; at `dtype_bytes` per floating element if given, else as stored."""
    total = 0
    for t in list(module.parameters()) + list(module.buffers()):
        size = dtype_bytes if dtype_bytes is not None and t.is_floating_point() else t.element_size()
        total += t.numel() * size
    return total


def module_bytes_direct(module: "torch.nn.Module", dtype_bytes: int | None = None) -> int:
    """Bytes of the parameters and buffers `module` holds itself (not its children's)."""
    total = 0
    for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
        size = dtype_bytes if dtype_bytes is not None and t.is_floating_point() else t.element_size()
        total += t.numel() * size
    return total


def model_sizes(
    bundle: "ModelBundle | ReferenceModels", *, dtype_bytes: int, vae_dtype_bytes: int | None = None
) -> "ModelSizes":
    """The planner's view of a bundle: sizes at the compute dtype, block split as group offloading makes it."""
    import torch

    from leansd.engine.planner import ModelSizes
    from leansd.engine.tiled_vae import supports

    unet = bundle.unet
    blocks = []
    rest = 0
    for _, child in unet.named_children():
        if isinstance(child, (torch.nn.ModuleList, torch.nn.Sequential)):
            blocks += [module_bytes(block, dtype_bytes) for block in child]
        else:
            rest += module_bytes(child, dtype_bytes)
    rest += sum(p.numel() * dtype_bytes for p in unet.parameters(recurse=False))
    # Layer-by-layer streaming (diffusers' leaf-level group offloading): each module without children
    # is a group; parameters of modules with children stay with their parent's group.
    layers, held = [], 0
    for module in unet.modules():
        own = module_bytes_direct(module, dtype_bytes)
        if next(module.children(), None) is None:
            layers.append(own)
        else:
            held += own
    layer_peak = held + sum(sorted(layers, reverse=True)[:2])
    head_dim = unet.config.attention_head_dim
    head_dim = head_dim[0] if isinstance(head_dim, (list, tuple)) else head_dim
    channels = int(unet.config.block_out_channels[0])
    # The first level with attention (SDXL has none at full resolution) and its width and heads.
    level = next((i for i, t in enumerate(unet.config.down_block_types) if "CrossAttn" in t), 0)
    per_level = unet.config.attention_head_dim if unet.config.num_attention_heads is None else (
        unet.config.num_attention_heads)
    level_heads = int(per_level[level] if isinstance(per_level, (list, tuple)) else per_level)
    # diffusers' SD1 UNet reads attention_head_dim as the number of heads (a historical misnomer).
    heads = int(head_dim) if unet.config.num_attention_heads is None else int(
        unet.config.num_attention_heads if isinstance(unet.config.num_attention_heads, int)
        else unet.config.num_attention_heads[0])
    encoders = list(getattr(bundle, "text_encoders", None) or [bundle.text_encoder])
    return ModelSizes(
        text_encoder=sum(module_bytes(encoder, dtype_bytes) for encoder in encoders),
        unet_blocks=tuple(blocks),
        unet_rest=rest,
        unet_layer_peak=layer_peak,
        vae=module_bytes(bundle.vae, vae_dtype_bytes or dtype_bytes),
        unet_channels=channels,
        unet_heads=heads,
        attention_level=level,
        attention_channels=int(unet.config.block_out_channels[level]),
        attention_heads=level_heads,
        vae_channels=int(bundle.vae.config.block_out_channels[0]),
        vae_mid_channels=int(bundle.vae.config.block_out_channels[-1]),
        vae_exact_tiles=supports(bundle.vae),
        text_hidden=sum(int(encoder.config.hidden_size) for encoder in encoders),
        vae_scale=bundle.vae_scale_factor,
        dtype_bytes=dtype_bytes,
        vae_dtype_bytes=vae_dtype_bytes,
    )


@dataclass
class ReferenceModels:
    """A family's published architecture on the meta device (no memory): what `model_sizes` reads."""

    family: "ModelFamily"
    unet: Any
    vae: Any
    text_encoders: list[Any]

    @property
    def text_encoder(self) -> Any:
        return self.text_encoders[0]

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


def reference_models(family: "ModelFamily") -> ReferenceModels:
    """Full-size models of ``family`` (its published configs) with parameters on the meta device."""
    import accelerate
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.utils import logging as diffusers_logging

    from leansd.models.configs import full_size_configs

    unet_config, vae_config, texts = full_size_configs(family)
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # not the "cast with to()" advice
    try:
        with accelerate.init_empty_weights(include_buffers=True):
            unet = UNet2DConditionModel(**unet_config)
            vae = AutoencoderKL(**vae_config)
            encoders = [getattr(transformers, name)(transformers.CLIPTextConfig(**config)) for name, config in texts]
    finally:
        diffusers_logging.set_verbosity(verbosity)
    return ReferenceModels(family=family, unet=unet, vae=vae, text_encoders=encoders)


def reference_sizes(family: "ModelFamily", *, dtype_bytes: int = 2) -> "ModelSizes":
    """The planner's view of a family's full-size model at ``dtype_bytes`` per weight, without loading one."""
    return model_sizes(reference_models(family), dtype_bytes=dtype_bytes)


class SplitBatchUNet:
    """The UNet called one pass at a time: cond/uncond (and AND parts) as separate batches.

    Same outputs as one batched call (every op is per sample); the planner uses it to halve the
    UNet's activations. `batch` is the images per pass.
    """

    def __init__(self, unet: Any, batch: int) -> None:
        self.unet = unet
        self.batch = batch
        self.config = unet.config

    def __call__(self, sample: "torch.Tensor", timestep: Any, *, encoder_hidden_states: "torch.Tensor",
                 return_dict: bool = False, **kwargs: Any) -> tuple["torch.Tensor"]:
        import torch

        added = kwargs.pop("added_cond_kwargs", None)  # SDXL: per-pass pooled embeddings and size ids

        def part(i: int) -> dict[str, Any]:
            if added is None:
                return kwargs
            return {**kwargs, "added_cond_kwargs": {k: v[i : i + self.batch] for k, v in added.items()}}

        outs = [
            self.unet(sample[i : i + self.batch], timestep, encoder_hidden_states=encoder_hidden_states[i : i + self.batch],
                      return_dict=False, **part(i))[0]
            for i in range(0, sample.shape[0], self.batch)
        ]
        return (torch.cat(outs),)  # (k*B, 4, h, w)
