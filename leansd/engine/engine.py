"""The Engine owns one loaded model, its device and its precision. Two engines can coexist."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from leansd.engine.device import Precision, resolve_device, resolve_precision
from leansd.engine.memory import MemoryMeter
from leansd.models.families import Component

if TYPE_CHECKING:
    import torch
    from diffusers import AutoencoderTiny
    from transformers import CLIPTextModel

    from leansd.backends.base import ComputeBackend
    from leansd.engine.estimate import FlopCounter, JobEstimate, SpeedMeter
    from leansd.engine.planner import MemoryPlan, ModelSizes
    from leansd.models.bundle import ModelBundle
    from leansd.models.embeddings import EmbeddingMatcher, EmbeddingStore
    from leansd.models.family import ModelFamily
    from leansd.models.library import ModelLibrary
    from leansd.models.lora import ActiveLora, LoraFile, LoraPatch
    from leansd.prompts.cache import PromptCache
    from leansd.request import GenerationRequest, GenerationResult, ProgressEvent

logger = logging.getLogger(__name__)


def cpu_has_fast_bf16() -> bool:
    """True when oneDNN has native bf16 kernels on this CPU (AVX512-BF16 or AMX); else bf16 is emulated."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


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
        vram: "str | int | None" = "auto",
        memory_policy: str = "auto",
        turbo: bool = False,
        vae_on_cpu: bool = False,
        virtual_device: bool = False,
        efficient_attention: bool | None = None,
        library: "ModelLibrary | None" = None,
        taesd: "AutoencoderTiny | None" = None,
        backend: "str | ComputeBackend" = "auto",
        convert: bool = False,
    ) -> None:
        """`prompt_cache`: True for the on-disk embedding cache in the user cache folder, False for
        none, or a `PromptCache` (e.g. another folder or size bound).

        Memory: `vram` is the device budget ("4G", "1500M", bytes, "auto" = CUDA free memory minus a
        reserve, None = no limit); `memory_policy` "auto", "medvram" or "lowvram" (see
        `leansd.engine.planner.POLICIES`); `turbo` plans against the whole budget; `vae_on_cpu` runs
        the VAE on the CPU. On the CPU a budget applies only with `virtual_device=True`: everything
        still runs in RAM, and `memory` accounts as if the CPU were the budgeted device (tests).
        `efficient_attention`: whether SDPA runs a kernel without a score matrix (None: detect; True
        on CUDA and the CPU). False makes the planner count scores and chunk attention, as on
        backends that only have the math path.
        `library`: where LoRAs, embeddings and VAEs are found by name (default: AUTOMATIC1111's
        folders under the current folder, scanned on first use).
        `taesd`: the tiny autoencoder (`leansd.models.taesd.load_taesd`) for TAESD previews and the
        TAESD final decoder; it stays on the CPU and visits the device per decode (see
        `leansd.engine.previews`).
        `backend`: what runs the UNet and the VAE: "torch", "openvino" (CPU only, fp32, no memory
        budget; `pip install leansd[openvino]`), "auto" (OpenVINO on a CPU where it is installed and
        this model was converted before or `convert` is True; else torch), or a `ComputeBackend`.
        """
        import torch

        from leansd.engine.planner import POLICIES
        from leansd.errors import InvalidRequestError
        from leansd.prompts.cache import PromptCache

        self.bundle = bundle
        self.device: "torch.device" = resolve_device(device)
        self.precision: Precision = resolve_precision(precision, self.device)
        if memory_policy not in POLICIES:
            raise InvalidRequestError(f"unknown memory policy {memory_policy!r}; valid: {', '.join(POLICIES)}")
        self.memory_policy = memory_policy
        self.turbo = turbo
        self.vae_on_cpu = vae_on_cpu
        self.virtual_device = virtual_device
        self.efficient_attention = efficient_attention
        self.taesd = taesd
        self.budget: int | None = resolve_budget(vram, self.device, virtual=virtual_device)
        self._vram_auto = self._is_auto(vram)
        self.memory = MemoryMeter(self.budget)
        self.plan: "MemoryPlan | None" = None
        """The last memory plan made (within a generation: the running batch's)."""
        self.plans_made = 0
        """How many memory plans this engine made: one per batch of a generation (again only when the
        model's sizes change within it, after an fp32 fallback); a stage run on its own plans for itself."""
        self._job: _BatchPlans | None = None
        self._sizes: "ModelSizes | None" = None
        self._on_device: set[str] = set()
        self._streaming = False
        self._streaming_layers = False
        self._attention_chunk: int | None = None
        self._default_processors: dict | None = None
        self._interrupt_check: Callable[[], None] | None = None  # set while `interruptible` is open
        self._vae_full_precision = False
        self._full_precision = False
        """Set after the UNet produced NaN/inf in a reduced precision: every model runs in fp32 from then on."""
        if self.precision.name == "fp16" and self.device.type == "cpu":
            logger.warning("fp16 on the CPU is emulated and very slow; full (or bf16 on CPUs with native bf16) is faster")
        if self.device.type == "cpu" and torch.bfloat16 in (self.precision.weight_dtype, self.precision.autocast_dtype):
            if not cpu_has_fast_bf16():
                logger.warning(
                    "this CPU has no native bf16 (%s): %s precision runs far slower than full here",
                    torch.backends.cpu.get_cpu_capability(), self.precision.name,
                )
        self.prompt_cache: PromptCache | None = (
            PromptCache() if prompt_cache is True else (prompt_cache or None)
        )
        self._fingerprint: str | None = None
        self._text_modules: "torch.nn.Module | None" = None
        self._text_pair: Any = None
        self._library = library
        self._loras: "LoraPatch | None" = None
        self._lora_key: tuple = ()
        self._lora_files: dict[str, tuple[tuple[int, int], "LoraFile"]] = {}
        self._embeddings: "EmbeddingStore | None" = None
        self._own_vae: Any = None
        self.vae_path: "Path | None" = None
        """The VAE file in use (None: the checkpoint's own VAE)."""
        self.vae_choice = "Automatic"
        """A1111's sd_vae setting: re-applied when another checkpoint is loaded."""
        self.prediction_choice = "auto"
        """How the loaded model's prediction type was chosen: "auto" (what the model says), or "epsilon" /
        "v_prediction" given explicitly; kept when another checkpoint is loaded."""
        self._flop_counter: "FlopCounter | None" = None
        self._speed: "SpeedMeter | None" = None
        self.refiner: "Engine | None" = None
        """The SDXL refiner that runs the last steps after this (base) model, when one is loaded."""
        self._vram_setting: "str | int | None" = vram
        self.backend: "ComputeBackend" = self._choose_backend(backend, convert=convert)
        # The text encoder is placed only when a prompt is not in the cache (see placed_text_encoder).
        if self.budget is None and memory_policy == "auto" and not vae_on_cpu:
            for part in (Component.UNET, Component.VAE):  # no budget: resident from the start, as always
                self._bring(part)
        else:  # components visit the device per stage: cast on the host now, move when planned
            for name, module in self._components().items():
                self._cast(module, self._dtype_of(name))
        logger.info(
            "model %s (%s) on %s, precision %s, memory budget %s%s, backend %s",
            bundle.name,
            bundle.family.label,
            self.device,
            self.precision.name,
            "none" if self.budget is None else f"{self.budget >> 20} MiB",
            " (virtual)" if virtual_device else "",
            self.backend.name,
        )

    def _choose_backend(self, backend: "str | ComputeBackend", *, convert: bool) -> "ComputeBackend":
        """The backend `backend` names ("auto": see `Engine`); InvalidRequestError where it cannot run."""
        from leansd.backends import check_backend_name, check_openvino_usable, openvino_installed
        from leansd.backends.base import TorchBackend

        if not isinstance(backend, str):
            return backend
        name = check_backend_name(backend)
        if name == "torch":
            return TorchBackend()
        settings: dict[str, Any] = dict(precision=self.precision.name, budget=self.budget,
                                        memory_policy=self.memory_policy)
        if name == "openvino":
            check_openvino_usable(self.device, **settings)
            from leansd.backends.openvino import OpenVinoBackend

            return OpenVinoBackend()
        # auto: OpenVINO only where it can run and the user will not wait for a surprise conversion.
        if self.device.type != "cpu" or not openvino_installed():
            return TorchBackend()
        try:
            check_openvino_usable(self.device, **settings)
        except ValueError:
            return TorchBackend()
        from leansd.backends.ir_cache import IRCache
        from leansd.prompts.cache import text_encoder_fingerprint

        cache = IRCache()
        if not convert and not (cache.entries() and cache.has_weights(text_encoder_fingerprint(self.bundle.unet), "unet")):
            logger.info("backend auto: torch (no OpenVINO conversion of this model in %s; --convert allows one)",
                        cache.directory)
            return TorchBackend()
        from leansd.backends.openvino import OpenVinoBackend

        return OpenVinoBackend(cache=cache)

    def set_backend(self, backend: str, *, convert: bool = False) -> str:
        """Use another compute backend from the next stage on ("auto", "torch", "openvino"; see
        `Engine`); returns the name of the one chosen. Raises InvalidRequestError where it cannot run."""
        chosen = self._choose_backend(backend, convert=convert)
        if chosen.name != self.backend.name:
            self.backend.release()
            self.backend = chosen
            logger.info("backend now %s", chosen.name)
        if self.refiner is not None:  # the refiner follows, as `set_refiner` gives it this engine's backend
            self.refiner.set_backend(self.backend.name)
        return self.backend.name

    def _check(self) -> None:
        """The running job's interrupt check, if any (see `interruptible`)."""
        if self._interrupt_check is not None:
            self._interrupt_check()

    def _unet_patches(self) -> str:
        """Identity of the LoRAs that change the UNet's output (empty: none)."""
        from leansd.models.lora import lora_identity

        return "" if self._loras is None else lora_identity(self._loras.active, "unet")

    @classmethod
    def load(
        cls,
        model: str,
        *,
        device: str | None = "auto",
        precision: str = "auto",
        prompt_cache: bool = True,
        prediction_type: str | None = None,
        taesd: str | None = None,
        backend: str = "auto",
        convert: bool = False,
        **memory: Any,
    ) -> "Engine":
        """Load a .safetensors/.ckpt file, a diffusers folder, a hub id, or "tiny" (random test model).

        `prediction_type`: "epsilon" or "v_prediction" overrides what the model says (None: its
        .yaml, scheduler config, marker keys or probe; see `leansd.models.prediction`).
        `taesd`: a diffusers AutoencoderTiny folder or hub id (madebyollin/taesd for SD 1.x/2.x,
        madebyollin/taesdxl for SDXL; the other family's known id is refused) for
        TAESD previews and `vae_decoder="taesd"`. `backend` ("auto", "torch", "openvino") and
        `convert` (let "auto" convert to OpenVINO): see `Engine`. `memory`: vram, memory_policy,
        turbo, vae_on_cpu, virtual_device (see `Engine`).
        """
        from leansd.backends import check_backend_name, check_openvino_usable
        from leansd.models.loader import load_model
        from leansd.models.prediction import normalise_prediction_type
        from leansd.models.taesd import load_taesd

        # Validate device/precision/budget/backend before the (slow) load so a typo fails at once.
        resolved = resolve_device(device)
        chosen_precision = resolve_precision(precision, resolved)
        if check_backend_name(backend) == "openvino":
            check_openvino_usable(
                resolved, precision=chosen_precision.name,
                budget=resolve_budget(memory.get("vram", "auto"), resolved, virtual=memory.get("virtual_device", False),
                                      probe=False),
                memory_policy=memory.get("memory_policy", "auto"),
            )
        resolve_budget(memory.get("vram", "auto"), resolved, virtual=memory.get("virtual_device", False), probe=False)
        prediction_type = normalise_prediction_type(prediction_type)
        tiny = None if taesd is None else load_taesd(taesd)  # small: a bad path fails before the model loads
        bundle = load_model(model, prediction_type=prediction_type)
        if tiny is not None and int(tiny.config.latent_channels) != bundle.latent_channels:
            from leansd.errors import ModelLoadError

            raise ModelLoadError(f"--taesd {taesd}: it decodes {tiny.config.latent_channels}-channel latents "
                                 f"but {bundle.name} makes {bundle.latent_channels}")
        if tiny is not None:
            _check_taesd_repo(str(taesd), bundle.family)
        engine = cls(bundle, device=device, precision=precision, prompt_cache=prompt_cache, taesd=tiny,
                     backend=backend, convert=convert, **memory)
        engine.prediction_choice = prediction_type or "auto"
        return engine

    def set_budget(self, vram: "str | int | None") -> int | None:
        """Change the device budget ("4G", "1500M", "auto", "none"); the next stage plans with it.

        Raises InvalidRequestError for a size it cannot read. Returns the budget in bytes (None: no limit).
        """
        budget = resolve_budget(vram, self.device, virtual=self.virtual_device)
        self.budget = budget
        self._vram_auto = self._is_auto(vram)
        self._vram_setting = vram
        if self.refiner is not None:  # one budget for both models
            self.refiner.set_budget(vram)
        self.memory.budget = budget
        self.plan = None
        logger.info("memory budget now %s", "none" if budget is None else f"{budget >> 20} MiB")
        return budget

    def _is_auto(self, vram: "str | int | None") -> bool:
        from leansd.engine.planner import parse_size

        return self.device.type == "cuda" and parse_size(vram) == "auto"

    def _refresh_budget(self) -> None:
        """--vram auto follows the device's free memory: read again before each plan."""
        if not self._vram_auto:
            return
        budget = auto_budget(self.device, own=sum(self.memory.placed.values()))
        if budget != self.budget:
            logger.debug("--vram auto: budget now %d MiB", budget >> 20)
            self.budget = budget
            self.memory.budget = budget

    # -- placement -------------------------------------------------------------------------------

    def _components(self) -> dict[str, "torch.nn.Module"]:
        return {Component.TEXT: self._text_module(), Component.UNET: self.bundle.unet,
                Component.VAE: self.bundle.vae}

    def _text_module(self) -> "torch.nn.Module":
        """The text stage's weights as one module: the text encoder, or SDXL's two in a ModuleList."""
        import torch

        if self.bundle.text_encoder_2 is None:
            return self.bundle.text_encoder
        if self._text_modules is None:
            self._text_modules = torch.nn.ModuleList(self.bundle.text_encoders)
        return self._text_modules

    def _dtype_of(self, name: str) -> "torch.dtype":
        import torch

        if self._full_precision or (name == Component.VAE and (self._vae_full_precision or self.vae_on_cpu)):
            return torch.float32
        return self.precision.weight_dtype

    @staticmethod
    def _cast(module: "torch.nn.Module", dtype: "torch.dtype", device: "torch.device | None" = None) -> None:
        current = getattr(module, "dtype", None) or next(module.parameters()).dtype  # a ModuleList has no .dtype
        if current == dtype:
            if device is not None:
                module.to(device)  # no dtype argument: avoids diffusers' cast warning
        else:
            module.to(device=device, dtype=dtype)

    def _bring(self, name: str, plan: "MemoryPlan | None" = None) -> None:
        """Put component `name` where `plan` runs it, and account for its bytes on the device."""
        import torch

        from leansd.engine.memory import module_bytes

        module = self._components()[name]
        if name == Component.VAE and plan is not None and plan.vae_on_cpu:
            self._evict(Component.VAE)
            self._cast(module, torch.float32, torch.device("cpu"))
            return
        if name == Component.UNET and plan is not None and plan.stream_unet:
            layers = plan.placement == "stream-layers"
            if self._streaming and self._streaming_layers != layers:
                self._stop_streaming()
            if not self._streaming:
                self._start_streaming(layers=layers)
            self.memory.place(Component.UNET, self.sizes.unet_layer_peak if layers else self.sizes.stream_weights)
            self._on_device.add(Component.UNET)
            return
        if name == Component.UNET and self._streaming:
            self._stop_streaming()
        # Mark it placed before moving: if the move fails halfway (out of memory), _evict still
        # brings back the part that reached the device.
        self._on_device.add(name)
        self._cast(module, self._dtype_of(name), self.device)
        self.memory.place(name, module_bytes(module))

    def _evict(self, name: str) -> None:
        """Move component `name` back to host memory (a no-op move on the CPU) and stop counting it."""
        import torch

        if name == Component.UNET and self._streaming:
            self._stop_streaming()
        elif name in self._on_device and self.device.type != "cpu":
            self._components()[name].to(torch.device("cpu"))
        self._on_device.discard(name)
        self.memory.release(name)

    def _start_streaming(self, *, layers: bool = False) -> None:
        """Stream the UNet block by block (or layer by layer) with diffusers' group offloading."""
        import torch
        from diffusers.hooks import apply_group_offloading

        unet = self.bundle.unet
        self._cast(unet, self._dtype_of(Component.UNET), torch.device("cpu"))
        # On CUDA the copies run on a side stream from pinned memory and prefetch the next block;
        # diffusers' hook makes the compute stream wait for each block's copy before it runs.
        # Layer by layer, the hook learns the execution order on the first call and prefetches the
        # next layer from then on.
        options = dict(offload_type="leaf_level") if layers else dict(offload_type="block_level", num_blocks_per_group=1)
        apply_group_offloading(
            unet, onload_device=self.device, offload_device=torch.device("cpu"), use_stream=self.device.type == "cuda",
            **options,
        )
        self._streaming = True
        self._streaming_layers = layers

    def _stop_streaming(self) -> None:
        import torch
        from diffusers.hooks import HookRegistry

        registry = HookRegistry.check_if_exists_or_initialize(self.bundle.unet)
        for hook in ("group_offloading", "layer_execution_tracker", "lazy_prefetch_group_offloading"):
            registry.remove_hook(hook, recurse=True)
        self.bundle.unet.to(torch.device("cpu"))
        self._streaming = False

    def _enter_stage(self, name: str, plan: "MemoryPlan") -> None:
        """Stage `name` ("text", "unet", "vae") starts: evict what the plan does not keep, bring `name`."""
        self.memory.enter_stage(name, 0)  # the previous stage's activations are freed by now
        for other in list(self._on_device):
            if other != name and not plan.resident(other):
                self._evict(other)
        self._bring(name, plan)
        activation = plan.activations.get(name, 0)
        if self.budget is not None:  # a plan made for another request may have left too much behind
            for other in list(self._on_device):
                if other != name and self.memory.current + activation > self.budget:
                    self._evict(other)
        self.memory.enter_stage(name, activation)

    @property
    def sizes(self) -> "ModelSizes":
        """The planner's view of the model at the compute dtype."""
        from leansd.engine.memory import model_sizes

        if self._sizes is None:
            dtype_bytes = self.dtype.itemsize
            self._sizes = model_sizes(
                self.bundle, dtype_bytes=dtype_bytes, vae_dtype_bytes=self._dtype_of(Component.VAE).itemsize
            )
        return self._sizes

    def plan_for(self, *, width: int, height: int, batch: int = 1, passes: int = 2,
                 hires: tuple[int, int] | None = None) -> "MemoryPlan":
        """The memory plan for a UNet/VAE run at this size (and a hires pass at `hires`); logged when it changes."""
        from leansd.engine.planner import PlanRequest, candidate_plans, plan_memory
        from leansd.errors import InvalidRequestError

        self._refresh_budget()
        request = PlanRequest(width=width, height=height, batch=batch, passes=passes,
                              efficient_attention=self._efficient_attention(self.device), vae_on_cpu=self.vae_on_cpu,
                              hires_width=None if hires is None else hires[0],
                              hires_height=None if hires is None else hires[1])
        self.plans_made += 1
        try:
            plan = plan_memory(self.sizes, request, self.budget, prefer_speed=self.turbo, policy=self.memory_policy)
        except InvalidRequestError:
            if not self._vram_auto:
                raise
            # --vram auto: the user set no limit; less is free than this request needs at the
            # least (another program holds the rest). Try the smallest plan rather than refuse.
            minimum = min(p.peak for _, p in candidate_plans(self.sizes, request, None, policy=self.memory_policy))
            logger.warning("--vram auto: %d MiB usable on %s, below this request's minimum of %d MiB; trying that",
                           (self.budget or 0) >> 20, self.device, minimum >> 20)
            plan = plan_memory(self.sizes, request, minimum, prefer_speed=True, policy=self.memory_policy)
        if plan != self.plan:
            logger.info("%s", plan.describe())
        self.plan = plan
        return plan

    @contextlib.contextmanager
    def planned_batches(self) -> Iterator[None]:
        """While open (one generation), every stage runs by the plan `plan_batch` made for its batch.

        A stage inside that runs before the batch's plan, or needs more than it was made for (a larger
        size, batch or UNet passes), is an error, not a silent second plan. Closing it forgets the
        plan's request: no stage of a later generation reads it.
        """
        outer = self._job
        self._job = _BatchPlans()
        try:
            yield
        finally:
            self._job = outer

    def plan_batch(self, *, width: int, height: int, batch: int, passes: int,
                   hires: tuple[int, int] | None = None) -> "MemoryPlan":
        """Make the one memory plan of a batch: the text encoders, the UNet (both passes of a hires fix),
        VAE decode/encode and previews all run by it. Call it at the start of every batch, within
        `planned_batches`; the budget (--vram auto) is read again each time."""
        if self._job is None:
            raise RuntimeError("plan_batch is for a generation: open Engine.planned_batches first")
        self._job.shape = dict(width=width, height=height, batch=batch, passes=passes, hires=hires)
        self._job.plan = self.plan_for(**self._job.shape)
        return self._job.plan

    def plan_next_batch(self) -> "MemoryPlan":
        """The next batch of the generation: its one plan, made for the same request as the first's."""
        if self._job is None or self._job.shape is None:
            raise RuntimeError("plan_next_batch follows plan_batch within Engine.planned_batches")
        return self.plan_batch(**self._job.shape)

    def _stage_plan(self, stage: str, *, width: int, height: int, batch: int, passes: int | None = None) -> "MemoryPlan":
        """The plan stage `stage` runs by: its batch's plan within a generation; else (a stage run on
        its own, e.g. speed calibration) a plan made for this one call."""
        job = self._job
        if job is None:
            return self.plan_for(width=width, height=height, batch=batch, passes=2 if passes is None else passes)
        if job.shape is None:
            raise RuntimeError(f"the {stage} stage ran before its batch's memory plan (Engine.plan_batch)")
        if job.plan is None:  # the model's sizes changed within the batch (fp32 fallback): plan it again
            job.plan = self.plan_for(**job.shape)
        planned = job.plan.request
        if planned is not None and not planned.covers(width=width, height=height, batch=batch, passes=passes):
            raise RuntimeError(
                f"the {stage} stage at {width}x{height} (batch {batch}, {passes or '-'} UNet passes) needs more than "
                f"its batch's memory plan, made for {planned.label()} (batch {planned.batch}, {planned.passes} passes)"
            )
        return job.plan

    def placed_text_encoder(self) -> "CLIPTextModel":
        """The text encoder on the compute device, moved there on first use (a cache miss); for SDXL a
        `leansd.prompts.encode.TextEncoderPair` over both encoders."""
        from leansd.request import MIN_SIZE

        if self._job is not None:
            plan = self._stage_plan(Component.TEXT, width=MIN_SIZE, height=MIN_SIZE, batch=1)
        else:
            # On its own (no generation): plan at the smallest size, since the text stage does not
            # depend on the image size and a larger guess could refuse a budget a request fits.
            plan = self.plan_for(width=MIN_SIZE, height=MIN_SIZE)
        self._enter_stage(Component.TEXT, plan)
        if self.bundle.description.refiner:  # bigG alone, with its pooled output
            if self._text_pair is None:
                from leansd.prompts.encode import PooledTextEncoder

                spec = self.bundle.description.text_encoders[0]
                self._text_pair = PooledTextEncoder(self.bundle.text_encoder, layer=self.bundle.text_layer,
                                                    final_norm=spec.final_norm)
            return self._text_pair
        if self.bundle.text_encoder_2 is None:
            return self.backend.text_encoder(self.bundle.text_encoder)
        if self._text_pair is None:  # SDXL: both encoders read as one (see TextEncoderPair)
            from leansd.prompts.encode import TextEncoderPair

            first, second = self.bundle.description.text_encoders
            self._text_pair = TextEncoderPair(
                self.bundle.text_encoder, self.bundle.text_encoder_2, layers=(first.layer, second.layer),
                final_norms=(first.final_norm, second.final_norm), pad_id_2=int(self.bundle.tokenizer_2.pad_token_id),
            )
        return self.backend.text_encoder(self._text_pair)

    @contextlib.contextmanager
    def unet_stage(self, *, width: int, height: int, batch: int, passes: int) -> Iterator[Any]:
        """The UNet placed, attention set and CFG batching chosen per plan; yields what to call."""
        from leansd.engine.attention import ChunkedAttnProcessor
        from leansd.engine.memory import SplitBatchUNet

        plan = self._stage_plan(Component.UNET, width=width, height=height, batch=batch, passes=passes)
        self._enter_stage(Component.UNET, plan)
        unet = self.bundle.unet
        if plan.attention_chunk != self._attention_chunk:
            if self._default_processors is None:  # saved without a running job's in-step check
                self._default_processors = {name: _unwrapped(p) for name, p in unet.attn_processors.items()}
            if plan.attention_chunk is None:
                unet.set_attn_processor(dict(self._default_processors))
            else:
                unet.set_attn_processor(ChunkedAttnProcessor(plan.attention_chunk))
            self._attention_chunk = plan.attention_chunk
            if self._interrupt_check is not None:  # the new processors stay stoppable within a call
                _wrap_attention(unet, self._interrupt_check)
        timer = None if self._speed is None else self._speed.record
        runner = self.backend.unet(unet, patches=self._unet_patches(), check=self._check, timer=timer)
        yield runner if plan.cfg_batched or passes == 1 else SplitBatchUNet(runner, batch)

    @contextlib.contextmanager
    def vae_stage(self, *, width: int, height: int, batch: int) -> Iterator[tuple["torch.device", "torch.dtype", "MemoryPlan"]]:
        """The VAE placed (or on the CPU) per plan; yields the device and dtype to run it at, and the
        plan (its `vae_tile` says whether `vae_decode`/`vae_encode` run in tiles)."""
        import torch

        from leansd.engine.tiled_vae import supports

        plan = self._stage_plan(Component.VAE, width=width, height=height, batch=batch)
        vae = self.bundle.vae
        if plan.vae_tile is not None and not supports(vae) and any(
            getattr(m, "padding_mode", "zeros") == "circular" for m in vae.modules()
        ):
            from leansd.errors import InvalidRequestError

            # diffusers' tiles would each wrap onto themselves instead of onto the opposite edge.
            raise InvalidRequestError(
                "seamless tiling needs the whole image in one VAE pass, but this budget tiles the VAE; "
                "use --vae-on-cpu or a larger --vram"
            )
        self._enter_stage(Component.VAE, plan)
        device = torch.device("cpu") if plan.vae_on_cpu else self.device
        dtype = torch.float32 if plan.vae_on_cpu else self._dtype_of(Component.VAE)  # _bring keeps a CPU VAE in fp32
        yield device, dtype, plan

    def vae_decode(self, latents: "torch.Tensor") -> "torch.Tensor":
        """Scaled latents (B, 4, h, w) -> images (B, 3, H, W) in [-1, 1], float32.

        fp16 safety: a decode with NaN/inf in half precision is redone in fp32 (logged once), and
        the VAE stays in fp32 for the rest of this engine's life.
        """
        import torch

        from leansd.engine.vae import is_finite

        vae = self.bundle.vae
        batch, _, h, w = latents.shape
        factor = self.bundle.vae_scale_factor
        with self.vae_stage(width=w * factor, height=h * factor, batch=batch) as (device, dtype, plan):
            z = latents.to(device=device, dtype=dtype) / vae.config.scaling_factor
            tile = plan.vae_tile
            with self._vae_compute(device):
                image = self.backend.vae_decode(vae, z, tile, scale=factor, check=self._check,
                                                efficient_attention=self._efficient_attention(device))
            autocast = self.precision.autocast_dtype is not None and not (self._vae_full_precision or self._full_precision)
            half = dtype != torch.float32 or (autocast and device == self.device)
            if half and not is_finite(image):
                logger.warning(
                    "the VAE produced NaN/inf in %s; decoding again in fp32 (kept for this session)",
                    self.precision.name,
                )
                self._vae_full_precision = True
                self._sizes = None
                if self._job is not None:
                    self._job.plan = None  # made for the smaller weights
                # fp32 doubles the VAE's weights and activations: plan again (a smaller tile, or the
                # CPU) and place it per that plan before the retry.
                retry = self._stage_plan(Component.VAE, width=w * factor, height=h * factor, batch=batch)
                self._enter_stage(Component.VAE, retry)
                device = torch.device("cpu") if retry.vae_on_cpu else self.device
                with torch.inference_mode(), torch.autocast(device.type, enabled=False):
                    image = self.backend.vae_decode(vae, z.float().to(device), retry.vae_tile, scale=factor,
                                                    check=self._check, efficient_attention=self._efficient_attention(device))
        return image.float()

    def _efficient_attention(self, device: "torch.device") -> bool:
        """Whether SDPA on `device` needs no score matrix, as the plans assume."""
        from leansd.engine.tiled_vae import efficient_sdpa

        if self.efficient_attention is not None and device == self.device:
            return self.efficient_attention
        return efficient_sdpa(device)

    def vae_encode(self, pixels: "torch.Tensor") -> Any:
        """Images (B, 3, H, W) in [-1, 1] -> the VAE's latent distribution (on the VAE's device)."""
        batch, _, height, width = pixels.shape
        with self.vae_stage(width=width, height=height, batch=batch) as (device, dtype, plan):
            tile = plan.vae_tile
            with self._vae_compute(device):
                return self.backend.vae_encode(self.bundle.vae, pixels.to(device=device, dtype=dtype), tile,
                                               scale=self.bundle.vae_scale_factor, check=self._check,
                                               efficient_attention=self._efficient_attention(device))

    @contextlib.contextmanager
    def _vae_compute(self, device: "torch.device") -> Iterator[None]:
        import torch

        if device == self.device and not self._vae_full_precision:
            with self.compute():
                yield
        else:  # on the CPU (--vae-on-cpu) or after the fp16 fallback: plain fp32
            with torch.inference_mode(), torch.autocast(device.type, enabled=False):
                yield

    def text_encoder_fingerprint(self) -> str:
        """Identity of the text encoder's output for the prompt cache: its weights, our dtype and its LoRAs.

        The weights' hash is memoised: LoRAs never write the weights (they run as hooks), and the
        active text-encoder LoRAs (file hashes and multipliers) are added to the key on every call.
        """
        if self._fingerprint is None:
            from leansd.prompts.cache import text_encoder_fingerprint

            weights = "+".join(text_encoder_fingerprint(e) for e in self.bundle.text_encoders)
            name = "full" if self._full_precision else self.precision.name
            self._fingerprint = f"{weights}-{name}-{str(self.dtype).split('.')[-1]}"
            layer, final_norm = self.bundle.text_layer, self.bundle.description.text_encoders[0].final_norm
            if (layer, final_norm) != (-1, True):  # another hidden layer is another embedding
                self._fingerprint += f"-layer{layer}{'' if final_norm else '-nonorm'}"
        if self._loras is not None:
            from leansd.models.lora import lora_identity

            applied = lora_identity(self._loras.active, "te")
            if applied:
                return f"{self._fingerprint}-lora:{applied}"
        return self._fingerprint

    # -- LoRAs and the model library --------------------------------------------------------------

    @property
    def library(self) -> "ModelLibrary":
        """Where names in prompts and options are looked up (created on first use)."""
        if self._library is None:
            from leansd.models.library import ModelLibrary

            self._library = ModelLibrary()
        return self._library

    @library.setter
    def library(self, library: "ModelLibrary") -> None:
        self._library = library
        self._embeddings = None

    @property
    def embeddings(self) -> "EmbeddingStore":
        """The library's textual-inversion embeddings for this model's text encoder."""
        if self._embeddings is None:
            from leansd.models.embeddings import EmbeddingStore

            def width(encoder: Any) -> int:
                return int(encoder.get_input_embeddings().weight.shape[-1])

            if self.bundle.text_encoder_2 is None:
                self._embeddings = EmbeddingStore(self.library, width=width(self.bundle.text_encoder))
            else:  # SDXL: clip_l and clip_g vectors, one set per encoder
                self._embeddings = EmbeddingStore(
                    self.library, width=width(self.bundle.text_encoder), encoder="clip_l",
                    also=(("clip_g", width(self.bundle.text_encoder_2)),),
                )
        return self._embeddings

    def embedding_matcher(self) -> "EmbeddingMatcher | None":
        """Finds this library's embedding names in prompts (None when the folder has none)."""
        return self.embeddings.matcher()

    def set_vae(self, path: "Path | str | None") -> None:
        """Use the VAE file `path` (None: the checkpoint's own VAE again); see `leansd.models.vae_override`.

        The checkpoint's VAE is kept aside (on the host) while an override is in use, so going
        back needs no reload. Raises ModelLoadError for a file that does not fit the model.
        """
        from leansd.models.vae_override import load_vae_file

        target = None if path is None else Path(path)
        if target == self.vae_path and (target is None or target.is_file()):
            return
        own = self._own_vae if self._own_vae is not None else self.bundle.vae
        new = own if target is None else load_vae_file(target, like=own)
        self._evict("vae")
        self.bundle.vae = new  # a previous override is dropped
        self._own_vae = None if new is own else own
        self.vae_path = target
        self._sizes = None
        self._vae_full_precision = False
        if self.budget is None and self.memory_policy == "auto" and not self.vae_on_cpu:
            self._bring("vae")  # no budget: resident, as at load
        else:
            self._cast(new, self._dtype_of("vae"))
        logger.info("VAE: %s", target or "the checkpoint's own")

    def set_vae_choice(self, choice: str) -> None:
        """Apply an A1111 `sd_vae` choice ("Automatic", "None", a file or a VAE-folder name) and keep it."""
        from leansd.models.vae_override import resolve_vae

        source = Path(self.bundle.source) if self.bundle.source else None
        checkpoint = source if source is not None and source.is_file() else None
        self.set_vae(resolve_vae(choice, library=self.library, checkpoint=checkpoint))
        self.vae_choice = choice

    def _checkpoint_file(self, spec: str, *, what: str) -> Path:
        """`spec` as a file or folder that exists, else a checkpoint of the model library by name or title;
        InvalidRequestError naming the library folder (and some of its names) when neither."""
        from leansd.errors import InvalidRequestError

        if Path(spec).expanduser().exists():
            return Path(spec).expanduser()
        entry = self.library.find_checkpoint(spec)
        if entry is None:
            names = self.library.names("checkpoint")
            raise InvalidRequestError(
                f"no {what} named {spec!r} in {self.library.folder('checkpoint')} (--ckpt-dir)"
                + (f"; available: {', '.join(names[:10])}" if names else "")
            )
        return Path(entry.path)

    def switch_model(self, spec: str | None = None, *, prediction_type: str | None = None) -> bool:
        """Load checkpoint `spec` (a library name, A1111 title or path; None: the loaded one again) in
        place of the current model.

        `prediction_type`: "auto" (what the model says), "epsilon" or "v_prediction" (forced); None keeps
        the current choice (`prediction_choice`), which also applies to the next checkpoints loaded.
        One model in memory at a time: the current one is released first; if the new one fails to
        load, the previous one is loaded again and the error is raised. LoRAs, the VAE override and
        every cached plan are reset; the `sd_vae` choice is applied to the new model. Returns False
        when `spec` is the loaded model already, with the same prediction type choice. Raises
        InvalidRequestError for an unknown name.
        """
        import gc

        from leansd.models.loader import TINY_SPEC, load_model
        from leansd.request import prediction_choice

        choice = self.prediction_choice if prediction_type is None else prediction_choice(prediction_type)
        if spec is None:
            target = self.bundle.source
        elif spec == TINY_SPEC:
            target = spec
        else:
            target = str(self._checkpoint_file(spec, what="checkpoint"))

        def same(a: str, b: str) -> bool:
            return a == b or (a != TINY_SPEC and b != TINY_SPEC and Path(a).resolve() == Path(b).resolve())

        if same(target, self.bundle.source) and choice == self.prediction_choice:
            return False

        def explicit(value: str) -> str | None:
            return None if value == "auto" else value

        previous, previous_choice = self.bundle.source, self.prediction_choice
        self.set_loras([])
        for name in list(self._on_device):
            self._evict(name)
        self._lora_files.clear()
        self.bundle = None  # type: ignore[assignment]  # released before the next one loads
        self._own_vae = None
        gc.collect()
        try:
            bundle = load_model(target, prediction_type=explicit(choice))
        except Exception:
            logger.warning("loading %s failed; loading %s again", target, previous)
            self._adopt(load_model(previous, prediction_type=explicit(previous_choice)))
            raise
        self._adopt(bundle)
        self.prediction_choice = choice
        logger.info("switched model to %s (%s prediction)", bundle.name, bundle.prediction_type)
        self.set_vae_choice(self.vae_choice)
        return True

    def _adopt(self, bundle: "ModelBundle") -> None:
        """Make `bundle` this engine's model: fresh plans and memos, placed as at construction."""
        self.backend.release()  # the previous model's compiled parts
        self.bundle = bundle
        self.vae_path = None
        self._own_vae = None
        self._sizes = None
        self.plan = None
        self._fingerprint = None
        self._embeddings = None
        self._text_modules = None
        self._text_pair = None
        self._default_processors = None
        self._attention_chunk = None
        self._vae_full_precision = False
        self._full_precision = False
        self._loras = None
        self._lora_key = ()
        if self.budget is None and self.memory_policy == "auto" and not self.vae_on_cpu:
            for name in ("unet", "vae"):
                self._bring(name)
        else:
            for name, module in self._components().items():
                self._cast(module, self._dtype_of(name))

    def set_refiner(self, spec: str | None) -> "Engine | None":
        """Load the SDXL refiner `spec` (a path, or a library checkpoint name / A1111 title) to run the last
        steps after this SDXL base model; None unloads it. Returns the refiner's engine.

        The refiner gets this engine's device, precision, prompt cache and memory settings, and shares
        its budget: whichever of the two models is not running is moved off the device (see
        `release_device`). Raises ModelLoadError for a file that is not an SDXL refiner, and
        InvalidRequestError for an unknown name or a base model that is not SDXL.
        """
        import gc

        from leansd.errors import InvalidRequestError
        from leansd.models.family import ModelFamily
        from leansd.models.loader import load_model

        if spec is None:
            self.refiner = None
            gc.collect()
            return None
        if self.bundle.family is not ModelFamily.SDXL:
            raise InvalidRequestError(f"a refiner runs after an SDXL base model; {self.bundle.name} is "
                                      f"{self.bundle.family.label}")
        target = str(self._checkpoint_file(spec, what="refiner checkpoint").resolve())
        if self.refiner is not None and self.refiner.bundle.source == target:
            return self.refiner
        self.refiner = None  # released before the next one loads
        gc.collect()
        bundle = load_model(target, refiner=True)
        self.refiner = Engine(
            bundle, device=str(self.device), precision=self.precision.name, prompt_cache=self.prompt_cache or False,
            vram=self._vram_setting if self._vram_auto else self.budget, memory_policy=self.memory_policy,
            turbo=self.turbo, vae_on_cpu=self.vae_on_cpu, virtual_device=self.virtual_device,
            efficient_attention=self.efficient_attention, library=self._library, backend=self.backend.name,
        )
        if self._full_precision:
            self.refiner.use_full_precision("the base model runs in fp32")
        logger.info("refiner %s loaded", bundle.name)
        return self.refiner

    def release_device(self) -> None:
        """Move every component off the compute device (the other model of a base + refiner pair runs next)."""
        for name in list(self._on_device):
            self._evict(name)

    def vae_infotext(self) -> dict[str, str]:
        """AUTOMATIC1111's `VAE hash` and `VAE` entries when a VAE file is in use."""
        from leansd.models.hashes import vae_short_hash

        if self.vae_path is None:
            return {}
        return {"VAE hash": vae_short_hash(self.vae_path), "VAE": self.vae_path.name}

    def embedding_infotext(self, *texts: str) -> dict[str, str]:
        """AUTOMATIC1111's `TI hashes: "NAME: HASH, ..."` for the embeddings these prompts use."""
        from leansd.models.embeddings import Embedding
        from leansd.models.hashes import embedding_short_hash
        from leansd.prompts.extra_networks import strip_networks

        matcher = self.embedding_matcher()
        if matcher is None:
            return {}
        used: dict[str, Path] = {}
        for text in texts:
            for part in matcher.split(strip_networks(text)):
                if isinstance(part, Embedding) and part.path is not None:
                    used.setdefault(part.name, part.path)
        if not used:
            return {}
        return {"TI hashes": ", ".join(f"{name}: {embedding_short_hash(path)}" for name, path in used.items())}

    @property
    def active_loras(self) -> tuple["ActiveLora", ...]:
        return () if self._loras is None else self._loras.active

    def load_lora(self, name: str) -> "LoraFile":
        """The LoRA called `name` in the library, read once and kept while the file is unchanged."""
        from leansd.models.lora import read_lora

        entry = self.library.require("lora", name)
        st = entry.path.stat()
        stamp = (st.st_size, st.st_mtime_ns)
        cached = self._lora_files.get(str(entry.path))
        if cached is None or cached[0] != stamp:
            if len(self._lora_files) >= 8:  # keep recent files only; the active ones stay referenced
                self._lora_files.pop(next(iter(self._lora_files)))
            cached = (stamp, read_lora(entry.path, name=entry.name))
            self._lora_files[str(entry.path)] = cached
        return cached[1]

    def set_loras(self, active: "Sequence[ActiveLora]") -> None:
        """Make `active` the applied LoRA set (replacing the previous one; empty: none).

        The weights are never written (the LoRAs run as forward hooks), so the previous set is
        gone exactly and at once, under every memory plan. Raises ModelLoadError for a LoRA of
        another model family.
        """
        from leansd.models.lora import apply_loras

        key = tuple((str(a.lora.path), id(a.lora), a.te, a.unet) for a in active)
        if key == self._lora_key:
            return
        if self._loras is not None:
            self._loras.remove()
            self._loras = None
        self._lora_key = ()
        if active:
            components: dict[str, Any] = {"unet": self.bundle.unet}
            if self.bundle.text_encoder_2 is None:
                components["te"] = self.bundle.text_encoder
            else:  # SDXL: kohya's lora_te1_ / lora_te2_ (a plain lora_te_ goes to the first)
                components.update(te1=self.bundle.text_encoder, te2=self.bundle.text_encoder_2)
            self._loras = apply_loras(components, active, family=self.bundle.family.label)
            logger.info("LoRAs: %s", ", ".join(f"{a.lora.name} (te {a.te:g}, unet {a.unet:g})" for a in active))
        self._lora_key = key

    def apply_prompt_networks(self, prompt: str) -> None:
        """Apply the LoRAs a positive prompt asks for (`<lora:NAME:MULT>`), and only those."""
        from leansd.models.lora import ActiveLora
        from leansd.prompts.extra_networks import lora_tags

        active = [ActiveLora(self.load_lora(tag.name), te=tag.te, unet=tag.unet) for tag in lora_tags(prompt)]
        self.set_loras(active)

    def lora_infotext(self) -> dict[str, str]:
        """AUTOMATIC1111's `Lora hashes: "NAME: HASH, ..."` entry for the applied LoRAs (empty if none)."""
        from leansd.models.hashes import addnet_short_hash

        if not self.active_loras:
            return {}
        seen: dict[str, "LoraFile"] = {}
        for item in self.active_loras:
            seen.setdefault(item.lora.name.replace(":", "").replace(",", ""), item.lora)  # as A1111 writes names
        return {"Lora hashes": ", ".join(f"{name}: {addnet_short_hash(lora.path)}" for name, lora in seen.items())}

    @property
    def dtype(self) -> "torch.dtype":
        """The dtype the UNet runs at (and latents and conditioning are kept in)."""
        import torch

        return torch.float32 if self._full_precision else self.precision.weight_dtype

    @property
    def reduced_precision(self) -> bool:
        """Whether the models run below fp32 (fp16/bf16 weights, or autocast), so fp32 may avoid NaN/inf."""
        return not self._full_precision and self.precision.name != "full"

    def use_full_precision(self, reason: str) -> None:
        """Run every model in fp32 from now on (after NaN/inf in a reduced precision; logged once).

        The plan is made again for the larger weights; the next stage places each model in fp32.
        """
        if self._full_precision:
            return
        logger.warning("%s in %s precision; running in fp32 from now on (kept for this session)",
                       reason, self.precision.name)
        self._full_precision = True
        if self._streaming:  # the streamed UNet's groups hold the reduced-precision weights
            self._stop_streaming()
            self._on_device.discard(Component.UNET)
            self.memory.release(Component.UNET)
        self._sizes = None
        self._fingerprint = None
        self.plan = None
        if self._job is not None:
            self._job.plan = None  # the running batch plans again for the fp32 weights

    @contextlib.contextmanager
    def compute(self) -> Iterator[None]:
        """Context for running the models: inference mode plus autocast when the precision asks for it."""
        import torch

        with torch.inference_mode():
            if self.precision.autocast_dtype is None or self._full_precision:
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

        self.memory.reset_peak()
        if self.refiner is not None:
            self.refiner.memory.reset_peak()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_memory(self) -> int | None:
        """Peak bytes allocated on the compute device since the last reset (CUDA only)."""
        import torch

        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        return None

    def memory_summary(self) -> dict[str, Any]:
        """What a result reports about memory: the accounted peak (of the base or the refiner, never both
        on the device at once) and the plan."""
        refiner_peak = 0 if self.refiner is None else self.refiner.memory.peak
        return {
            "memory_peak_bytes": max(self.memory.peak, refiner_peak),
            "memory_plan": None if self.plan is None else self.plan.describe(),
        }

    # -- stopping within a step, and job time -----------------------------------------------------

    @contextlib.contextmanager
    def interruptible(self, check: Callable[[], None]) -> Iterator[None]:
        """While open, `check()` runs before every layer of the UNet and the VAE (forward pre-hooks on
        their leaf modules) and between query chunks of large attention calls; whatever it raises stops
        the job there, within one layer's time instead of one step's. The pipelines turn
        `StopGeneration` / `SkipBatch` into an interrupted result. Outputs are unchanged: attention
        below 8192 tokens runs as before, larger attention in exact query chunks.
        """
        def hook(module: object, args: object) -> None:
            check()

        handles = []
        self._interrupt_check = check
        try:
            for model in (self.bundle.unet, self.bundle.vae):
                for module in model.modules():
                    if next(module.children(), None) is None:  # a leaf: conv, linear, norm, activation
                        handles.append(module.register_forward_pre_hook(hook))
                # One attention call over many tokens takes seconds: check between query chunks.
                _wrap_attention(model, check)
            yield
        finally:
            self._interrupt_check = None
            for handle in handles:
                handle.remove()
            for model in (self.bundle.unet, self.bundle.vae):  # no job's check outlives its job
                for module in model.modules():
                    processor = getattr(module, "processor", None)
                    if processor is not None and hasattr(module, "set_processor"):
                        module.processor = _unwrapped(processor)

    @property
    def flop_counter(self) -> "FlopCounter":
        """FLOPs of this model's UNet and VAE at any size (counted on a weightless copy)."""
        from leansd.engine.estimate import FlopCounter

        if self._flop_counter is None:
            self._flop_counter = FlopCounter(self.bundle.unet, self.bundle.vae)
        return self._flop_counter

    @property
    def speed(self) -> "SpeedMeter":
        """The UNet's measured FLOP/s on this device; measuring starts at the first access."""
        from leansd.engine.estimate import SpeedMeter

        if self._speed is None:
            self._speed = SpeedMeter(self.bundle.unet, self.flop_counter, self.device)
        return self._speed

    def calibrate_speed(self) -> float:
        """Time one UNet forward at half the native size (a quarter of a real step); returns FLOP/s.

        With OpenVINO: one CFG step at the native size, the shape most jobs use, so the conversion
        this may need is not wasted (and its time is not counted)."""

        from leansd.engine.estimate import calibration_size, unet_inputs

        speed = self.speed
        native = self.backend.name == "openvino"
        size = self.bundle.default_size if native else calibration_size(self)
        passes = 2 if native else 1
        side = size // self.bundle.vae_scale_factor
        with self.unet_stage(width=size, height=size, batch=1, passes=passes) as unet, self.compute():
            inputs = unet_inputs(self.bundle.unet.config, passes, side, side, device=self.device, dtype=self.dtype)
            unet(**inputs)
        logger.info("measured speed: %.1f GFLOP/s (UNet at %dx%d)", (speed.flops_per_second or 0) / 1e9, size, size)
        return speed.flops_per_second or 0.0

    def estimate(self, request: "GenerationRequest") -> "JobEstimate":
        """The request's work in FLOPs and, once the speed was measured, its predicted seconds."""
        from leansd.engine.estimate import estimate

        return estimate(self, request)

    def generate(
        self,
        request: "GenerationRequest",
        *,
        progress: Callable[["ProgressEvent"], None] | None = None,
        progress_bar: bool = True,
    ) -> "GenerationResult":
        """Run the request's task (txt2img, img2img, inpaint); returns PIL images, seeds and infotexts.

        The request is validated here, once (`GenerationRequest.validated`; a request a front end
        validated already passes through unchanged); the pipelines take it as it is.
        """
        from leansd.engine.device import translate_cuda_error
        from leansd.pipelines import generate

        request = request.validated()
        try:
            return generate(self, request, progress=progress, progress_bar=progress_bar)
        except RuntimeError as exc:  # "no kernel image is available": say which torch build to install
            translated = translate_cuda_error(exc, self.device)
            if translated is exc:
                raise
            raise translated from exc


class _BatchPlans:
    """The running generation's batch: what its plan was made for, and the plan (None: make it again)."""

    def __init__(self) -> None:
        self.shape: dict[str, Any] | None = None
        self.plan: "MemoryPlan | None" = None


AUTO_RESERVE = 512 * 2**20
"""--vram auto on CUDA: free memory minus this (CUDA context growth, allocator fragmentation)."""


def resolve_budget(vram: "str | int | None", device: "torch.device", *, virtual: bool = False,
                   probe: bool = True) -> int | None:
    """The device budget in bytes, or None for no limit.

    "auto": on CUDA the free memory minus `AUTO_RESERVE`; elsewhere no limit. A size on the CPU
    counts only with `virtual` (the CPU then stands in for the budgeted device); else it is ignored
    with a warning, since the CPU simply runs in RAM.
    """
    from leansd.engine.planner import parse_size

    size = parse_size(vram)
    if size == "auto":
        if device.type == "cuda" and probe:
            return auto_budget(device)
        return None
    if size is not None and device.type != "cuda" and not virtual:
        if probe:
            logger.warning("--vram applies to a CUDA device; on %s the engine simply runs in RAM", device.type)
        return None
    return size  # type: ignore[return-value]


def auto_budget(device: "torch.device", *, own: int = 0) -> int:
    """--vram auto on CUDA, now: free device memory, plus what this process's allocator holds unused,
    plus `own` (the bytes of the engine's own placements, which it may move), minus `AUTO_RESERVE`;
    rounded down to 64 MiB so that small fluctuations do not change the plan. Other tensors of this
    process (another model, an upscaler) stay counted as used. The engine reads it again before
    every plan, so memory another process takes or frees is seen."""
    import torch

    free, _ = torch.cuda.mem_get_info(device)
    unused = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    budget = max(0, free + unused + own - AUTO_RESERVE)
    return budget // AUTO_GRAIN * AUTO_GRAIN


AUTO_GRAIN = 64 * 2**20


def _check_taesd_repo(taesd: str, family: "ModelFamily") -> None:
    """A known TAESD hub id trained on another family's latent space is refused (SD 1.x/2.x and SDXL
    latents have the same shape, so only the name tells: the wrong one decodes to wrong colours)."""
    from leansd.errors import ModelLoadError
    from leansd.models.family import ModelFamily

    known = {f.latent_preview.taesd_repo.lower() for f in ModelFamily}
    wanted = family.latent_preview.taesd_repo
    name = taesd.strip("/").lower()
    if name in known and name != wanted.lower():
        raise ModelLoadError(f"--taesd {taesd} decodes another family's latents; this {family.label} model needs {wanted}")


def _unwrapped(processor: Any) -> Any:
    """An attention processor without the in-step check wrappers `Engine.interruptible` put around it."""
    from leansd.engine.attention import InterruptibleAttnProcessor

    while isinstance(processor, InterruptibleAttnProcessor):
        processor = processor.inner
    return processor


def _wrap_attention(model: Any, check: Callable[[], None]) -> None:
    """Wrap every attention processor of `model` so `check()` runs before and within its calls."""
    from leansd.engine.attention import InterruptibleAttnProcessor

    for module in model.modules():
        processor = getattr(module, "processor", None)
        if processor is not None and hasattr(module, "set_processor"):
            module.processor = InterruptibleAttnProcessor(_unwrapped(processor), check)
