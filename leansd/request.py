"""The one contract every front end fills: a request in, a result (and progress events) out.

All validation of user values happens here, in one place; a bad value raises
`InvalidRequestError` with a one-line message that names the valid range or options.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from leansd.errors import InvalidRequestError

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

MIN_SIZE = 64
MAX_SIZE = 4096
MAX_STEPS = 1000
MAX_BATCH = 64
MAX_ITER = 10_000
MAX_SEED = 2**32 - 1
"""Seeds are 32-bit unsigned as in AUTOMATIC1111; -1 or None means "pick one at random"."""

DEFAULT_SAMPLER = "PLMS"
DEFAULT_STEPS = 50
DEFAULT_GUIDANCE = 7.5


@dataclass
class GenerationRequest:
    """What to generate. Field names follow diffusers' public vocabulary.

    `width`/`height` of None take the model's native size (512 for SD 1.x).
    Images are numbered `0 .. batch_size * n_iter - 1`; image `k` uses seed `seed + k`
    (or `seed` for every image with `fixed_code=True`).
    """

    prompt: str
    negative_prompt: str = ""
    width: int | None = None
    height: int | None = None
    num_inference_steps: int = DEFAULT_STEPS
    guidance_scale: float = DEFAULT_GUIDANCE
    sampler: str = DEFAULT_SAMPLER
    eta: float = 0.0
    """DDIM eta (0 = deterministic DDIM); ignored by other samplers."""
    seed: int | None = None
    batch_size: int = 1
    n_iter: int = 1
    fixed_code: bool = False

    def validated(self) -> "GenerationRequest":
        """Check every value; return a copy with the sampler name canonicalised and a concrete seed."""
        from leansd.sampling.samplers import canonical_sampler_name

        if not isinstance(self.prompt, str):
            raise InvalidRequestError(f"prompt must be a string, got {type(self.prompt).__name__}")
        if not isinstance(self.negative_prompt, str):
            raise InvalidRequestError("negative_prompt must be a string")
        for name in ("width", "height"):
            value = getattr(self, name)
            if value is None:
                continue
            _require_int(name, value)
            if value % 8 != 0:
                raise InvalidRequestError(f"{name} must be a multiple of 8, got {value}")
            if not MIN_SIZE <= value <= MAX_SIZE:
                raise InvalidRequestError(f"{name} must be between {MIN_SIZE} and {MAX_SIZE}, got {value}")
        _require_int("num_inference_steps", self.num_inference_steps)
        if not 1 <= self.num_inference_steps <= MAX_STEPS:
            raise InvalidRequestError(
                f"steps must be between 1 and {MAX_STEPS}, got {self.num_inference_steps}"
            )
        _require_int("batch_size", self.batch_size)
        if not 1 <= self.batch_size <= MAX_BATCH:
            raise InvalidRequestError(f"n_samples (batch size) must be between 1 and {MAX_BATCH}, got {self.batch_size}")
        _require_int("n_iter", self.n_iter)
        if not 1 <= self.n_iter <= MAX_ITER:
            raise InvalidRequestError(f"n_iter must be between 1 and {MAX_ITER}, got {self.n_iter}")
        _require_number("guidance_scale", self.guidance_scale)
        if self.guidance_scale < 0:
            raise InvalidRequestError(f"scale (CFG) must be >= 0, got {self.guidance_scale}")
        _require_number("eta", self.eta)
        if self.eta < 0:
            raise InvalidRequestError(f"ddim_eta must be >= 0, got {self.eta}")
        seed = self.seed
        if seed is None or seed == -1:
            seed = secrets.randbelow(MAX_SEED + 1)
        else:
            _require_int("seed", seed)
            last = seed + (0 if self.fixed_code else self.batch_size * self.n_iter - 1)
            if seed < 0 or last > MAX_SEED:
                raise InvalidRequestError(
                    f"seed must be between 0 and {MAX_SEED} (or -1 for random) for every image, got {seed}"
                )
        return replace(self, sampler=canonical_sampler_name(self.sampler), seed=seed)

    @property
    def num_images(self) -> int:
        return self.batch_size * self.n_iter

    def image_seeds(self) -> list[int]:
        """Seed of every image, in order (requires a concrete seed: call `validated()` first)."""
        if self.seed is None:
            raise InvalidRequestError("request has no seed yet; call validated() first")
        if self.fixed_code:
            return [self.seed] * self.num_images
        return [self.seed + k for k in range(self.num_images)]


@dataclass
class ProgressEvent:
    """One sampler step finished. `image_index` counts from 0 over the whole request."""

    step: int
    total_steps: int
    batch_index: int
    n_batches: int


@dataclass
class GenerationResult:
    """Images plus everything needed to reproduce them."""

    images: list["Image.Image"]
    seeds: list[int]
    infotexts: list[str]
    request: GenerationRequest
    pixels: "np.ndarray | None" = None
    """Float32 RGB in [0, 1], shape (N, H, W, 3): the images before 8-bit rounding."""
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds per stage: encode, sample, decode, total."""
    peak_memory_bytes: int | None = None
    """Peak bytes allocated on the compute device (CUDA only), else None."""
    info: dict[str, Any] = field(default_factory=dict)


def _require_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequestError(f"{name} must be an integer, got {value!r}")


def _require_number(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidRequestError(f"{name} must be a finite number, got {value!r}")
