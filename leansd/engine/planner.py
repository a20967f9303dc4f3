"""The memory planner: component sizes + request + budget in, placement out. Pure integer arithmetic.

No torch here: every input is a plain integer, so the planner is unit-tested with tables.

What it decides, in order of preference (cheapest first, see `_cost`):
- placement: "resident" (text encoder, UNet and VAE stay on the device), "text-visits" (the text
  encoder comes only to encode a prompt, a cache miss), "stages" (each model is on the device
  only for its stage: text encoder -> UNet -> VAE), "stream" (the UNet's blocks are streamed
  from host memory one by one, the next one prefetched while the current one computes),
  "stream-layers" (the same, one layer at a time: the lowest peak, more and smaller copies);
- the UNet's activations: cond/uncond in one batch or two, attention query chunk (None = full);
- the VAE: whole, tiled (tile side in pixels), or on the CPU.
Among the plans whose accounted peak fits the budget (minus a 10 % margin against estimate
error, unless `prefer_speed`), it takes the cheapest; below the smallest possible peak it raises
`InvalidRequestError` naming that minimum.

Activation estimates (bytes; b = images per UNet call, d = bytes per element, N = h*w latent
tokens, C = the UNet's first block width, heads = its attention heads there). Calibrated with
`leansd.engine.measure` (live tensor bytes per op on the meta device, CUDA's 512-byte blocks) on the
full-size SD 1.5 architecture at 512-2048 px, fp16 and fp32 (bench/activations.py); each is 5-15 %
above the measured peak. Kernel workspaces (cuDNN, cuBLAS) are not visible there: the 10 % margin
and the --vram auto reserve cover them until bench/memory.py measures on a GPU.
- UNet with flash / memory-efficient SDPA: 28 * b * N * C * d (measured 26.0 at every size and
  dtype: the GEGLU product in the top up block, its projection, skips and residuals);
- UNet with materialised scores (the math path; a query chunk of q tokens, q = N unchunked):
  max(the above, (14 d + 16) * b * N * C + 8.5 * b * heads * q * N): the math path keeps fp32
  scores and their fp32 softmax (8 bytes per score at any dtype) besides the other live tensors;
- VAE decode/encode, whole: 7 * C_vae * d per pixel (measured 6.0 decode, 5.0 encode: three
  2*C_vae full-resolution tensors at the first full-resolution resnet), or with materialised
  attention the mid block's 8.5 * tokens^2 + 128 * C_vae * tokens if larger, plus the decoded image;
- VAE tiled (leansd.engine.tiled_vae: layer by layer, maps in host memory): one tile's working set,
  (1 + 6 d) bytes per element of C_vae * tile^2 and its halo (measured with the crops copied to the
  device: 10.8 at fp16, 21.5 at fp32; tests/engine/test_vae_attention.py holds the SD VAE layout to it), plus the mid block's keys and
  values of every latent token, 2 * C_mid * tokens * d (on the math path copied to fp32, and 9 bytes
  per element of scores), plus the decoded image brought back to the device; diffusers' fallback
  tiles (unknown VAE layouts) as a whole decode of one tile plus the decoded tiles;
- text encoder: 24 * 77 * hidden * d per prompt pass (measured 16, 22.5 on the math path).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace

from leansd.errors import InvalidRequestError
from leansd.models.families import FAMILIES, Component
from leansd.models.family import ModelFamily

TEXT, UNET, VAE = Component.TEXT, Component.UNET, Component.VAE

MiB = 2**20
GiB = 2**30

PLACEMENTS = ("resident", "text-visits", "stages", "stream", "stream-layers")
POLICIES = ("auto", "medvram", "lowvram")
"""auto: cheapest plan that fits. medvram (A1111's --medvram): each model on the device only for
its stage, never all three at once. lowvram (A1111's --lowvram): the UNet always streamed (block by
block, or layer by layer where blocks do not fit)."""

MARGIN = 0.10
"""Share of the budget left unplanned against estimate error (not with prefer_speed / --turbo)."""
VAE_TILES = (1024, 768, 512, 384, 256, 192, 128, 96, 64)
"""Candidate VAE tile sides in pixels, largest (fewest seams, fastest) first."""
ATTENTION_CHUNKS = (4096, 2048, 1024, 512, 256, 128, 64, 32, 16)
"""Candidate attention query chunks in tokens, largest first."""
TEXT_ACTIVATION_FACTOR = 24
"""Text encoder activations ~ 24 * 77 tokens * hidden * d per pass (tiny next to its weights)."""


@dataclass(frozen=True)
class ModelSizes:
    """Bytes of each part on the compute device at the compute dtype, and the shapes activations need."""

    text_encoder: int
    unet_blocks: tuple[int, ...]
    """The streamable groups (each child of the UNet's down_blocks/up_blocks)."""
    unet_rest: int
    """The UNet outside those blocks (conv_in, time embedding, mid block, conv_out): one group."""
    vae: int
    unet_channels: int
    unet_heads: int
    vae_channels: int
    text_hidden: int = FAMILIES[ModelFamily.SD1].text_hidden
    """Width of the text conditioning (engine: read from the loaded encoder; else the family's description)."""
    vae_scale: int = 8
    dtype_bytes: int = 2
    vae_dtype_bytes: int | None = None
    """The VAE's own dtype size when it differs (fp32 after the fp16 NaN fallback); None: dtype_bytes."""
    unet_layer_peak: int = 0
    """UNet bytes on the device while streaming layer by layer: the two largest layers (running and
    prefetched) plus parameters held by non-layer modules; 0: layer streaming not offered."""
    vae_exact_tiles: bool = True
    """The VAE runs leansd's exact layer-by-layer tiles; False: diffusers' fallback tiles, each a
    whole decode of an overlapping tile, all kept for blending."""
    vae_mid_channels: int | None = None
    """Channels of the VAE's mid block (its widest level); None: 4 * vae_channels, as in SD's VAEs."""
    attention_level: int = 0
    """The UNet's first level with attention (0 for SD 1.x/2.x; 1 for SDXL, whose full-resolution level
    has none): its tokens are N / 4**level."""
    attention_channels: int | None = None
    """Channels at that level; None: unet_channels."""
    attention_heads: int | None = None
    """Attention heads at that level; None: unet_heads."""

    @property
    def unet(self) -> int:
        return self.unet_rest + sum(self.unet_blocks)

    @property
    def stream_weights(self) -> int:
        """UNet bytes on the device while streaming: the rest, the running block and the prefetched one."""
        largest = sorted(self.unet_blocks, reverse=True)[:2]
        return self.unet_rest + sum(largest)


@dataclass(frozen=True)
class PlanRequest:
    width: int
    height: int
    batch: int = 1
    passes: int = 2
    """UNet evaluations per image and step: 2 with classifier-free guidance, 1 without, more for AND."""
    efficient_attention: bool = False
    """Flash / memory-efficient SDPA runs here (CUDA, half precision): scores are never materialised."""
    vae_on_cpu: bool = False
    """--vae-on-cpu: the VAE always runs on the CPU."""
    hires_width: int | None = None
    hires_height: int | None = None
    """The hires fix's second pass: the UNet and the VAE also run at this size (None: one pass)."""

    @property
    def image_sizes(self) -> tuple[tuple[int, int], ...]:
        """(width, height) of every pass the UNet and VAE run: the first, and the hires pass if any."""
        first = (self.width, self.height)
        if self.hires_width is None or self.hires_height is None:
            return (first,)
        return (first, (self.hires_width, self.hires_height))

    def at_size(self, width: int, height: int) -> "PlanRequest":
        """The same request for one pass at `width` x `height`."""
        return replace(self, width=width, height=height, hires_width=None, hires_height=None)

    def covers(self, *, width: int, height: int, batch: int, passes: int | None = None) -> bool:
        """Whether a stage run at this size, batch and UNet passes needs no more than this request planned."""
        fits = any(width <= w and height <= h for w, h in self.image_sizes)
        return fits and batch <= self.batch and (passes is None or passes <= self.passes)

    def label(self) -> str:
        """"512x512" or "512x512 (hires pass 1024x1024)", as errors and plan descriptions name the request."""
        hires = "" if len(self.image_sizes) == 1 else f" (hires pass {self.hires_width}x{self.hires_height})"
        return f"{self.width}x{self.height}{hires}"


@dataclass(frozen=True)
class MemoryPlan:
    budget: int | None
    placement: str
    cfg_batched: bool
    attention_chunk: int | None
    vae_tile: int | None
    vae_on_cpu: bool
    stage_peaks: dict[str, int] = field(default_factory=dict)
    """Accounted peak bytes of each stage: text, unet, vae."""
    activations: dict[str, int] = field(default_factory=dict)
    """The activation estimate of each stage (included in stage_peaks)."""
    minimum: int = 0
    """The smallest accounted peak any plan reaches for this model and request."""
    streamed_bytes_per_step: int = 0
    """Bytes copied host -> device per UNet evaluation when streaming (0 otherwise)."""
    request: PlanRequest | None = field(default=None, compare=False)
    """What the plan was made for: sizes (both passes of a hires fix), batch, UNet passes."""

    @property
    def peak(self) -> int:
        return max(self.stage_peaks.values())

    @property
    def stream_unet(self) -> bool:
        return self.placement in ("stream", "stream-layers")

    def resident(self, component: str) -> bool:
        """Whether `component` ("text", "unet", "vae") stays on the device between its stages."""
        if component == VAE and self.vae_on_cpu:
            return False
        return {
            "resident": True,
            "text-visits": component != TEXT,
            "stages": False,
            "stream": False,
            "stream-layers": False,
        }[self.placement]

    def describe(self) -> str:
        budget = "none" if self.budget is None else format_size(self.budget)
        vae = "cpu" if self.vae_on_cpu else (f"tiled {self.vae_tile}px" if self.vae_tile else "whole")
        attention = f"chunks of {self.attention_chunk} queries" if self.attention_chunk else "full"
        stream = f" ({format_size(self.streamed_bytes_per_step)}/step streamed)" if self.stream_unet else ""
        made_for = "" if self.request is None else f" for {self.request.label()}, batch {self.request.batch}"
        return (
            f"memory plan{made_for}: budget {budget}, peak {format_size(self.peak)} (minimum {format_size(self.minimum)}); "
            f"placement {self.placement}{stream}; cond/uncond {'one batch' if self.cfg_batched else 'two batches'}; "
            f"attention {attention}; VAE {vae}"
        )


def format_size(n: int) -> str:
    """Bytes as the CLI spells them: 1.5G, 412M (rounded up, so a minimum stays a minimum)."""
    if n >= GiB and n % (GiB // 4) == 0:
        return f"{n / GiB:g}G"
    return f"{math.ceil(n / MiB)}M"


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)


def parse_size(text: str | int | None) -> int | str | None:
    """"4G", "1500M", "750MiB", "2.5GB" -> bytes (binary units); "auto" -> "auto"; "none"/None -> None."""
    if text is None:
        return None
    if isinstance(text, int) and not isinstance(text, bool):
        if text <= 0:
            raise InvalidRequestError(f"a memory size must be positive, got {text}")
        return text
    key = str(text).strip().lower()
    if key == "auto":
        return "auto"
    if key in ("none", "off", ""):
        return None
    match = _SIZE.match(key)
    if not match:
        raise InvalidRequestError(f"unknown memory size {text!r}; use e.g. 4G, 1500M, 750M, auto or none")
    value = float(match.group(1)) * 1024 ** "bkmgt".index(match.group(2) or "b")
    if value < 1:
        raise InvalidRequestError(f"a memory size must be positive, got {text!r}")
    return int(value)


def unet_activation(sizes: ModelSizes, request: PlanRequest, *, cfg_batched: bool, chunk: int | None) -> int:
    """The UNet's activation estimate: the largest over the request's passes (see the module docstring)."""
    return max(_unet_activation(sizes, request.at_size(w, h), cfg_batched=cfg_batched, chunk=chunk)
               for w, h in request.image_sizes)


def _unet_activation(sizes: ModelSizes, request: PlanRequest, *, cfg_batched: bool, chunk: int | None) -> int:
    d = sizes.dtype_bytes
    n = (request.width // sizes.vae_scale) * (request.height // sizes.vae_scale)
    b = request.batch * (request.passes if cfg_batched else 1)
    # The terms below are taken at the first level with attention (SD: the full resolution).
    n_att = n // 4**sizes.attention_level
    channels = sizes.attention_channels or sizes.unet_channels
    heads = sizes.attention_heads or sizes.unet_heads
    features = 28 * b * n_att * channels * d
    if sizes.attention_level:
        # Without attention at full resolution (SDXL) the top level's resnets and skip concatenations
        # set the floor: measured 15.75 * b * N * C * d (SDXL base, 1024 px, fp16).
        features = max(features, 18 * b * n * sizes.unet_channels * d)
    if request.efficient_attention:
        return features
    q = n_att if chunk is None else min(chunk, n_att)
    attention = (14 * d + 16) * b * n_att * channels + int(8.5 * b * heads * q * n_att)
    return max(features, attention)


def vae_activation(sizes: ModelSizes, request: PlanRequest, *, tile: int | None) -> int:
    """The VAE's activation estimate (decode or encode): the largest over the request's passes."""
    return max(_vae_activation(sizes, request.at_size(w, h), tile=tile) for w, h in request.image_sizes)


def _vae_activation(sizes: ModelSizes, request: PlanRequest, *, tile: int | None) -> int:
    d = sizes.vae_dtype_bytes or sizes.dtype_bytes
    width, height, b = request.width, request.height, request.batch
    tokens = (width // sizes.vae_scale) * (height // sizes.vae_scale)
    image = 3 * width * height * (d + 4) * b  # the decoded image and its float32 copy
    if tile is None:
        work = 7 * sizes.vae_channels * d * width * height * b
        if not request.efficient_attention:
            work = max(work, int(8.5 * tokens * tokens * b) + 128 * sizes.vae_channels * tokens * b)
        return work + image
    side = min(tile, max(width, height))
    if not sizes.vae_exact_tiles:  # a whole decode per tile, plus every decoded tile kept for blending
        work = 16 * sizes.vae_channels * d * side * side * b
        tile_tokens = (side // sizes.vae_scale) ** 2
        scores = 0 if request.efficient_attention else int(8.5 * tile_tokens * tile_tokens * b)
        return work + scores + 2 * image
    elements = sizes.vae_channels * side * side * b
    mid = sizes.vae_mid_channels or 4 * sizes.vae_channels
    if request.efficient_attention:
        keys_values = 2 * mid * tokens * b * d
        scores = 0
    else:  # the math path copies K and V to fp32 (and a scaled K); scores of >= 16 queries per call
        keys_values = 2 * mid * tokens * b * (d + 6)
        scores = 9 * max(elements, 16 * tokens * b)
    # Tiles carry a one-pixel halo each side; the deepest levels' tiles have half the side.
    halo = ((side / 2 + 2) / (side / 2)) ** 2
    return int((1 + 6 * d) * elements * halo) + keys_values + scores + image


def text_activation(sizes: ModelSizes, request: PlanRequest) -> int:
    return TEXT_ACTIVATION_FACTOR * 77 * sizes.text_hidden * sizes.dtype_bytes * max(2, request.passes)


def _stage_peaks(
    sizes: ModelSizes, request: PlanRequest, placement: str, unet_act: int, vae_act: int, vae_cpu: bool
) -> dict[str, int]:
    te, unet, vae = sizes.text_encoder, sizes.unet, (0 if vae_cpu else sizes.vae)
    te_act = text_activation(sizes, request)
    vae_act = 0 if vae_cpu else vae_act
    if placement == "resident":
        base = te + unet + vae
        return {TEXT: base + te_act, UNET: base + unet_act, VAE: base + vae_act}
    if placement == "text-visits":
        base = unet + vae
        return {TEXT: base + te + te_act, UNET: base + unet_act, VAE: base + vae_act}
    unet_weights = {"stages": unet, "stream": sizes.stream_weights, "stream-layers": sizes.unet_layer_peak}[placement]
    return {TEXT: te + te_act, UNET: unet_weights + unet_act, VAE: vae + vae_act}


def _cost(placement: str, cfg_batched: bool, passes: int, chunk: int | None, n: int, tiles: int, vae_cpu: bool) -> float:
    """Rough relative time over an all-resident image (ranking only; bench/memory.py measures)."""
    cost = {"resident": 0.0, "text-visits": 0.01, "stages": 0.05, "stream": 1.0, "stream-layers": 1.3}[placement]
    if not cfg_batched and passes > 1:
        cost += 0.15
    if chunk is not None:
        cost += 0.02 * math.log2(max(2, n / chunk))
    if tiles > 1:
        cost += 0.05 + 0.01 * tiles
    if vae_cpu:
        cost += 3.0
    return cost


def _tiles(request: PlanRequest, tile: int | None) -> int:
    """Tiles of the VAE's full-resolution layers (each layer's map is cut edge to edge, no overlap),
    at the request's largest pass."""
    if tile is None:
        return 1
    return max(math.ceil(w / tile) * math.ceil(h / tile) for w, h in request.image_sizes)


def candidate_plans(sizes: ModelSizes, request: PlanRequest, budget: int | None, *, policy: str = "auto") -> list[tuple[float, MemoryPlan]]:
    """Every plan the planner considers, with its cost."""
    if policy not in POLICIES:
        raise InvalidRequestError(f"unknown memory policy {policy!r}; valid: {', '.join(POLICIES)}")
    placements = {"auto": PLACEMENTS, "medvram": PLACEMENTS[2:], "lowvram": PLACEMENTS[3:]}[policy]
    if not sizes.unet_layer_peak:
        placements = tuple(p for p in placements if p != "stream-layers")
    n = max((w // sizes.vae_scale) * (h // sizes.vae_scale) for w, h in request.image_sizes)
    chunks: list[int | None] = [None]
    if not request.efficient_attention:
        chunks += [c for c in ATTENTION_CHUNKS if c < n]
    side = max(max(size) for size in request.image_sizes)
    tiles: list[int | None] = [None] + [t for t in VAE_TILES if t < side]
    vae_modes = [(t, False) for t in tiles] if not request.vae_on_cpu else []
    vae_modes.append((None, True))
    batched = (True, False) if request.passes > 1 else (True,)
    out = []
    for placement in placements:
        for cfg_batched in batched:
            for chunk in chunks:
                unet_act = unet_activation(sizes, request, cfg_batched=cfg_batched, chunk=chunk)
                for tile, vae_cpu in vae_modes:
                    vae_act = vae_activation(sizes, request, tile=tile)
                    peaks = _stage_peaks(sizes, request, placement, unet_act, vae_act, vae_cpu)
                    plan = MemoryPlan(
                        budget=budget, placement=placement, cfg_batched=cfg_batched, attention_chunk=chunk,
                        vae_tile=tile, vae_on_cpu=vae_cpu, stage_peaks=peaks,
                        activations={TEXT: text_activation(sizes, request), UNET: unet_act,
                                     VAE: 0 if vae_cpu else vae_act},
                        streamed_bytes_per_step=sizes.unet if placement.startswith("stream") else 0,
                        request=request,
                    )
                    out.append((_cost(placement, cfg_batched, request.passes, chunk, n, _tiles(request, tile), vae_cpu), plan))
    return out


def plan_memory(
    sizes: ModelSizes,
    request: PlanRequest,
    budget_bytes: int | None,
    *,
    prefer_speed: bool = False,
    policy: str = "auto",
) -> MemoryPlan:
    """The cheapest plan whose accounted peak fits `budget_bytes` (None: no limit, all resident).

    `prefer_speed` (--turbo) plans against the whole budget; otherwise 10 % stays unplanned.
    Raises InvalidRequestError naming the minimum when nothing fits.
    """
    candidates = candidate_plans(sizes, request, budget_bytes, policy=policy)
    minimum = min(plan.peak for _, plan in candidates)
    if budget_bytes is None:
        fitting = candidates
    else:
        usable = budget_bytes if prefer_speed else int(budget_bytes * (1 - MARGIN))
        fitting = [(c, p) for c, p in candidates if p.peak <= usable]
        if not fitting:
            need = minimum if prefer_speed else math.ceil(minimum / (1 - MARGIN))
            raise InvalidRequestError(
                f"--vram {format_size(budget_bytes)} is below the minimum of {format_size(need)} for this model at "
                f"{request.label()} (batch {request.batch}); give at least {format_size(need)}, "
                "a smaller image or batch, or --vram auto"
            )
    _, best = min(fitting, key=lambda cp: (cp[0], cp[1].peak))
    return MemoryPlan(**{**best.__dict__, "minimum": minimum})
