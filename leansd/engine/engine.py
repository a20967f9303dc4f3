"""The Engine owns one loaded model, its device and its precision. Two engines can coexist."""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING, Callable, Iterator

from leansd.engine.device import Precision, resolve_device, resolve_precision

if TYPE_CHECKING:
    import torch

    from transformers import CLIPTextModel

    from leansd.models.bundle import ModelBundle
    from leansd.prompts.cache import PromptCache
    from leansd.request import GenerationRequest, GenerationResult, ProgressEvent

logger = logging.getLogger(__name__)


class Engine:
    """Load once, generate many.

    >>> engine = Engine.load("tiny")
    >>> result = engine.generate(GenerationRequest(prompt="a red fox", seed=1))
    """

    def __init__(
        self,
        bundle: "ModelBundle",
        *,
        device: str | None = "auto",
        precision: str = "auto",
        prompt_cache: "bool | PromptCache" = True,
    ) -> None:
        """`prompt_cache`: True for the on-disk embedding cache in the user cache folder, False for
        none, or a `PromptCache` (e.g. another folder or size bound)."""
        from leansd.prompts.cache import PromptCache

        self.bundle = bundle
        self.device: "torch.device" = resolve_device(device)
        self.precision: Precision = resolve_precision(precision, self.device)
        if self.precision.name == "fp16" and self.device.type == "cpu":
            logger.warning("fp16 on the CPU is emulated and very slow; bf16 or full is much faster here")
        self.prompt_cache: PromptCache | None = (
            PromptCache() if prompt_cache is True else (prompt_cache or None)
        )
        self._fingerprint: str | None = None
        self._text_encoder_placed = False
        # The text encoder is placed only when a prompt is not in the cache (see placed_text_encoder).
        for module in (bundle.unet, bundle.vae):
            self._place(module)
        logger.info(
            "model %s (%s) on %s, precision %s",
            bundle.name,
            bundle.family.label,
            self.device,
            self.precision.name,
        )

    @classmethod
    def load(
        cls, model: str, *, device: str | None = "auto", precision: str = "auto", prompt_cache: bool = True
    ) -> "Engine":
        """Load a .safetensors/.ckpt file, a diffusers folder, a hub id, or "tiny" (random test model)."""
        from leansd.models.loader import load_model

        # Validate device/precision before the (slow) load so a typo fails at once.
        resolve_precision(precision, resolve_device(device))
        return cls(load_model(model), device=device, precision=precision, prompt_cache=prompt_cache)

    def _place(self, module: "torch.nn.Module") -> None:
        if module.dtype == self.precision.weight_dtype:
            module.to(self.device)  # no dtype argument: avoids diffusers' cast warning
        else:
            module.to(device=self.device, dtype=self.precision.weight_dtype)

    def placed_text_encoder(self) -> "CLIPTextModel":
        """The text encoder on the compute device, moved there on first use (a cache miss)."""
        if not self._text_encoder_placed:
            self._place(self.bundle.text_encoder)
            self._text_encoder_placed = True
        return self.bundle.text_encoder

    def text_encoder_fingerprint(self) -> str:
        """Identity of the text encoder's output for the prompt cache: its weights and our dtype."""
        if self._fingerprint is None:
            from leansd.prompts.cache import text_encoder_fingerprint

            weights = text_encoder_fingerprint(self.bundle.text_encoder)
            self._fingerprint = f"{weights}-{self.precision.name}-{str(self.precision.weight_dtype).split('.')[-1]}"
        return self._fingerprint

    @property
    def dtype(self) -> "torch.dtype":
        return self.precision.weight_dtype

    @contextlib.contextmanager
    def compute(self) -> Iterator[None]:
        """Context for running the models: inference mode plus autocast when the precision asks for it."""
        import torch

        with torch.inference_mode():
            if self.precision.autocast_dtype is None:
                yield
            else:
                with torch.autocast(self.device.type, dtype=self.precision.autocast_dtype):
                    yield

    def synchronize(self) -> None:
        """Wait for queued device work (CUDA kernels run asynchronously); no-op on the CPU."""
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def reset_peak_memory(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_memory(self) -> int | None:
        """Peak bytes allocated on the compute device since the last reset (CUDA only)."""
        import torch

        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        return None

    def generate(
        self,
        request: "GenerationRequest",
        *,
        progress: Callable[["ProgressEvent"], None] | None = None,
        progress_bar: bool = True,
    ) -> "GenerationResult":
        """Run the request's task (txt2img, img2img, inpaint); returns PIL images, seeds and infotexts."""
        from leansd.pipelines import generate

        return generate(self, request, progress=progress, progress_bar=progress_bar)
