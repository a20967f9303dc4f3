"""The OpenVINO backend: the UNet and the VAE run as OpenVINO models compiled for the CPU.

Each part is converted in-process from the torch module the engine loaded (`torch.export`, then
`openvino.convert_model`), with the module's current state: LoRA forward hooks and circular
(seamless-tiling) padding are part of the exported graph, so the patch set and the padding
mode are part of the cache key. Shapes are static: one model per (part, input shapes). A static
model ran about 17 % faster than a dynamic one on full-size SD 1.5, and tracing bakes some
shape-dependent Python branches of diffusers' code (upsampling, attention size checks) into the
graph, which only a static shape makes safe. Models are fp32 (`INFERENCE_PRECISION_HINT` f32,
weights stored fp32), so outputs match torch's within float rounding.

Text encoders stay on torch: they run once per prompt (and not at all on a prompt-cache hit),
a negligible share of an image's time. Noise is drawn by torch on the CPU as always, so seeds
give the same pictures.

Converted models are kept on disk (`leansd.backends.ir_cache.IRCache`) and reused by later
processes; the compiled models of the last few shapes are kept in memory.
"""

from __future__ import annotations

import functools
import gc
import logging
import time
import warnings
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import torch

    from leansd.backends.ir_cache import IRCache

logger = logging.getLogger(__name__)

PRECISION = "f32"
KEEP_COMPILED = {"unet": 1, "vae-decoder": 2, "vae-encoder": 2}
"""Compiled models kept in memory per part. One UNet: each compiled UNet holds its own repacked copy
of the weights (3.3 GiB for SD 1.5, 6.5 GiB when compiled from the cached file), while compiling a
cached one again takes seconds (6.7-8.1 s at 512x512); a hires fix runs all base steps before the
hires ones, so it compiles each size once per image. The VAE parts are small (0.2 GiB)."""
KEEP_CONVERTED = 4
"""Converted (not compiled) models kept for compiling again: a UNet at two sizes and its decoders."""


def _wrappers() -> dict[str, Any]:
    """The modules converted (`torch.export`): each returns one tensor from positional tensors."""
    import torch

    class UNetPart(torch.nn.Module):
        def __init__(self, unet: Any) -> None:
            super().__init__()
            self.unet = unet

        def forward(self, sample: "torch.Tensor", timestep: "torch.Tensor", context: "torch.Tensor",
                    *added: "torch.Tensor") -> "torch.Tensor":
            cond = {"text_embeds": added[0], "time_ids": added[1]} if added else None
            return self.unet(sample, timestep, encoder_hidden_states=context, added_cond_kwargs=cond,
                             return_dict=False)[0]

    class DecoderPart(torch.nn.Module):
        def __init__(self, vae: Any) -> None:
            super().__init__()
            self.vae = vae

        def forward(self, z: "torch.Tensor") -> "torch.Tensor":
            return self.vae.decode(z, return_dict=False)[0]

    class EncoderPart(torch.nn.Module):
        def __init__(self, vae: Any) -> None:
            super().__init__()
            self.vae = vae

        def forward(self, pixels: "torch.Tensor") -> "torch.Tensor":
            return self.vae.encode(pixels).latent_dist.parameters  # (B, 2C, h, w): mean and log-variance

    return {"unet": UNetPart, "vae-decoder": DecoderPart, "vae-encoder": EncoderPart}


def compute_threads() -> int:
    """Threads for OpenVINO: torch's count, which follows OMP_NUM_THREADS and the CPU affinity."""
    import torch

    return max(1, torch.get_num_threads())


def circular(module: Any) -> bool:
    """Whether the module's convolutions pad circularly (seamless tiling is on)."""
    import torch

    return any(isinstance(m, torch.nn.Conv2d) and m.padding_mode == "circular" for m in module.modules())


class OpenVinoBackend:
    """UNet and VAE on OpenVINO's CPU plugin; text encoders on torch (see the module docstring)."""

    name = "openvino"

    def __init__(self, *, cache: "IRCache | None" = None, threads: int | None = None, weights: str = "f32") -> None:
        """`weights`: how the IR stores them, "f32" (default: outputs as torch's) or "f16" (half the
        disk, computed in fp32 all the same; about 4e-4 mean difference on full-size SD 1.5)."""
        import openvino

        from leansd.backends.ir_cache import IRCache

        self._ov = openvino
        self.core = openvino.Core()
        self.cache = cache if cache is not None else IRCache()
        self.threads = threads or compute_threads()
        if weights not in ("f32", "f16"):
            raise ValueError(f"weights must be 'f32' or 'f16', got {weights!r}")
        self.weights = weights
        self._compiled: dict[str, OrderedDict[str, Any]] = {}
        self._converted: OrderedDict[str, Any] = OrderedDict()
        """The last few models this backend converted, by key: their weights are the torch tensors
        (no copy), so compiling one again costs no mapped IR file. Bounded: an entry keeps alive the
        tensors it was converted from (a LoRA's, a replaced VAE's)."""
        self.conversions = 0
        """Parts converted by this backend (0 when everything came from the disk cache)."""
        self.conversion_seconds = 0.0

    # -- the interface -----------------------------------------------------------------------------

    def unet(self, unet: Any, *, patches: str, check: Callable[[], None],
             timer: "Callable[[tuple[int, ...], float], None] | None" = None) -> "OpenVinoUNet":
        return OpenVinoUNet(self, unet, patches=patches, check=check, timer=timer)

    def vae_decode(self, vae: Any, z: "torch.Tensor", tile: int | None, *, scale: int,
                   efficient_attention: bool | None, check: Callable[[], None]) -> "torch.Tensor":
        if tile is not None:
            raise RuntimeError("the openvino backend decodes the whole image; the engine planned VAE tiles")
        check()
        return self.run("vae-decoder", vae, [z], patches="")

    def vae_encode(self, vae: Any, pixels: "torch.Tensor", tile: int | None, *, scale: int,
                   efficient_attention: bool | None, check: Callable[[], None]) -> Any:
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        if tile is not None:
            raise RuntimeError("the openvino backend encodes the whole image; the engine planned VAE tiles")
        check()
        return DiagonalGaussianDistribution(self.run("vae-encoder", vae, [pixels], patches=""))

    def text_encoder(self, encoder: Any) -> Any:
        return encoder

    def release(self) -> None:
        self._compiled.clear()
        self._converted.clear()
        gc.collect()

    # -- converting, caching, running ------------------------------------------------------------

    def key_fields(self, part: str, module: Any, inputs: list["torch.Tensor"], *, patches: str) -> dict[str, Any]:
        """What identifies a converted model: weights, part, shapes, precision, patches, padding, versions."""
        import diffusers

        from leansd.prompts.cache import text_encoder_fingerprint

        return {
            "weights": text_encoder_fingerprint(module),  # sha256 over the state dict, memoised per module
            "part": part,
            "inputs": [[list(t.shape), str(t.dtype).split(".")[-1]] for t in inputs],
            "precision": PRECISION,
            "stored": self.weights,
            "patches": patches,
            "padding": "circular" if circular(module) else "zeros",
            "openvino": self._ov.__version__,
            "diffusers": diffusers.__version__,
        }

    def run(self, part: str, module: Any, inputs: list["torch.Tensor"], *, patches: str,
            timer: "Callable[[tuple[int, ...], float], None] | None" = None) -> "torch.Tensor":
        """`part` of `module` on `inputs` (float32 CPU tensors): converted, cached and compiled on first use.

        `timer(shape of the first input, seconds)` gets the inference time (not the conversion's)."""
        import torch

        arrays = [t.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy() for t in inputs]
        compiled = self.compiled(part, module, inputs, patches=patches)
        started = time.perf_counter()
        output = compiled(arrays)[0]
        if timer is not None:
            timer(tuple(inputs[0].shape), time.perf_counter() - started)
        return torch.from_numpy(output)

    def compiled(self, part: str, module: Any, inputs: list["torch.Tensor"], *, patches: str) -> Any:
        """The compiled model for these input shapes: from memory, the disk cache, or a conversion now."""
        from leansd.backends.ir_cache import entry_key

        fields = self.key_fields(part, module, inputs, patches=patches)
        key = entry_key(fields)
        kept = self._compiled.setdefault(part, OrderedDict())
        if key in kept:
            kept.move_to_end(key)
            return kept[key]
        while len(kept) >= KEEP_COMPILED.get(part, 1):  # dropped first: never two UNets compiled at once
            kept.popitem(last=False)
            gc.collect()
        # A model this process converted (its weights shared with torch), else the cached model.xml.
        source: Any = self._converted.get(key)
        if source is not None:
            self._converted.move_to_end(key)
        else:
            source = self.cache.get(key)
        if source is None:
            source = self._convert(part, module, inputs, key=key, fields=fields)
        started = time.perf_counter()
        config = {"INFERENCE_PRECISION_HINT": PRECISION, "INFERENCE_NUM_THREADS": self.threads,
                  "PERFORMANCE_HINT": "LATENCY"}
        in_memory = isinstance(source, self._ov.Model)
        compiled = self.core.compile_model(source if in_memory else str(source), "CPU", config)
        logger.info("openvino: compiled the %s for %s from %s in %.1f s", part, _shapes(inputs),
                    "the converted model" if in_memory else "the disk cache", time.perf_counter() - started)
        kept[key] = compiled
        return compiled

    def _convert(self, part: str, module: Any, inputs: list["torch.Tensor"], *, key: str,
                 fields: dict[str, Any]) -> Any:
        """Trace `part` to an OpenVINO model at these static shapes, store it in the disk cache and
        return the in-memory model (its weights share the torch module's memory)."""
        import torch

        ov = self._ov
        wrapper = _wrappers()[part](module)
        # A conversion of a full-size UNet takes minutes: say what runs, never a silent stall.
        logger.warning("openvino: converting the %s for %s (once per shape; cached in %s)...",
                       part.replace("-", " "), _shapes(inputs), self.cache.directory)
        started = time.perf_counter()
        example = tuple(t.detach().to(device="cpu", dtype=torch.float32) for t in inputs)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # notes about Python branches on shapes: the shapes are static
            # torch.export (non-strict: the module's Python runs as usual, LoRA hooks included) keeps
            # the weights as references: on full-size SD 1.5 it converted in 46 s at 3.8 GiB peak RSS
            # where torch.jit.trace took 118 s at 6.3 GiB (bench/cpu_speed.py --convert-only).
            program = torch.export.export(wrapper, example, strict=False)
            model = ov.convert_model(program)
        del wrapper, program
        gc.collect()

        xml = self.cache.put(key, functools.partial(_save, ov, model, fp16=self.weights == "f16"), fields=fields)
        seconds = time.perf_counter() - started
        self.conversions += 1
        self.conversion_seconds += seconds
        logger.warning("openvino: converted the %s in %.1f s", part.replace("-", " "), seconds)
        if xml is None:
            logger.info("openvino: the converted %s is used without the disk cache", part)
        elif self.weights == "f16":
            return xml  # the stored fp16 weights, so this process computes what later ones will
        # Compiled from the converted model itself, not from the file just written: its weights are
        # the torch tensors (shared, not copied, and kept alive by the compiled model), where
        # compiling the file would map the whole model.bin as well (full-size SD 1.5, first 512x512
        # run: 9.4 GiB peak RSS instead of 12.8). Sharing needs the module's weights unchanged in
        # place, which the fingerprint in the key assumes already (`text_encoder_fingerprint`).
        self._converted[key] = model
        while len(self._converted) > KEEP_CONVERTED:
            self._converted.popitem(last=False)
        return model


def _save(ov: Any, model: Any, path: Any, *, fp16: bool) -> None:
    ov.save_model(model, str(path), compress_to_fp16=fp16)


def _shapes(inputs: list["torch.Tensor"]) -> str:
    return "x".join(str(s) for s in inputs[0].shape)


class OpenVinoUNet:
    """What the sampling loop calls in place of the torch UNet (same call, same ``config``).

    The engine's interrupt check runs before every call: a stop takes effect between steps.
    """

    def __init__(self, backend: OpenVinoBackend, unet: Any, *, patches: str, check: Callable[[], None],
                 timer: "Callable[[tuple[int, ...], float], None] | None" = None) -> None:
        self.backend = backend
        self.timer = timer
        self.module = unet
        self.config = unet.config
        self.patches = patches
        self.check = check

    def __call__(self, sample: "torch.Tensor", timestep: Any, encoder_hidden_states: "torch.Tensor",
                 *, return_dict: bool = False, added_cond_kwargs: dict | None = None,
                 **unused: Any) -> tuple["torch.Tensor"]:
        import torch

        if unused:
            raise TypeError(f"the openvino UNet takes no {', '.join(sorted(unused))}")
        self.check()
        batch = sample.shape[0]
        # (B,) float32 timesteps: the UNet broadcasts a scalar the same way and embeds them as floats.
        t = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1).expand(batch).contiguous()
        inputs = [sample, t, encoder_hidden_states]
        if added_cond_kwargs:
            inputs += [added_cond_kwargs["text_embeds"], added_cond_kwargs["time_ids"]]
        out = self.backend.run("unet", self.module, inputs, patches=self.patches, timer=self.timer)
        return (out.to(dtype=sample.dtype),)
