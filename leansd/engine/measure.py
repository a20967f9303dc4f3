"""Measured activation memory: the peak of live tensor bytes a forward pass allocates, on any device.

This is the CPU-side proxy for `torch.cuda.max_memory_allocated()` minus the weights, used to
calibrate the planner's estimates (bench/activations.py) without a GPU. On the `meta` device a
full-size model runs in milliseconds and costs no memory, and the byte counts are the same as on
a real device, because a meta kernel gives every output the shape, dtype and strides the real
kernel gives it.

What is counted: every tensor storage an op creates while the tracker is active (outputs of
aten ops as `__torch_dispatch__` sees them, including the pieces of composite ops such as
`linear`, `group_norm` or the math attention path), each rounded up to the 512-byte blocks of
the CUDA caching allocator. A storage is counted once however many views share it, and is
released when the last tensor on it dies. Tensors that existed before (inputs, weights) and views
of them are not counted. The peak is over the start, i.e. "max_memory_allocated minus what was
allocated before the call".

What it cannot see (the real CUDA peak is higher by these):
- allocations inside one kernel that never become an op output: cuDNN convolution workspaces
  (transient, tens of MiB, more with `cudnn.benchmark`), the cuBLAS workspace (a few MiB up to
  32 MiB, persistent after the first matmul), `.contiguous()` copies a CUDA kernel makes of its
  inputs, the CPU flash-attention kernel's per-thread buffers;
- the caching allocator's block rounding beyond 512 bytes: a large-pool block is split only when
  more than 1 MiB would remain, so a live tensor can hold up to 1 MiB more than its size;
- fragmentation and reserved-but-unallocated memory (`memory_reserved`), the CUDA context.

Attention (`attention=` of `ActivationTracker` / `activation_peak`), because the kernel that
runs decides whether the score matrix exists:
- "native": `F.scaled_dot_product_attention` as torch dispatches it here. On `meta` that is the
  math path (checked with torch 2.13): q, k, v are upcast from fp16/bf16 to fp32 copies, the
  fp32 scores (B, heads, Lq, Lk) and their fp32 softmax are materialised, then cast back. On the
  CPU it is `_scaled_dot_product_flash_attention_for_cpu` (fp32, bf16 and fp16): only the output
  and the logsumexp are visible, its blocks are per-thread workspace. On CUDA in half precision
  it is flash / memory-efficient attention.
- "efficient": what flash / memory-efficient SDPA allocates on CUDA: the output, in the
  (B, Lq, heads, Ev) layout those kernels write (so diffusers' reshape after it is a view), and
  flash's fp32 logsumexp (B, heads, Lq), freed at once; head dims over 256 take the
  memory-efficient kernel, which needs no logsumexp at inference. Off `meta` the values are
  computed by torch's SDPA outside the tracker, so outputs are still correct.
- "math": torch's math backend forced (`sdpa_kernel(SDPBackend.MATH)`): materialised scores on
  every device, with the same fp16/bf16 -> fp32 upcast as above (torch's default
  `allow_fp16_bf16_reduction_math_sdp(False)`; the same code runs on CUDA).
leansd's `ChunkedAttnProcessor` calls SDPA once per query chunk, so it combines with any of these
("math": scores of one chunk at a time).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

T = TypeVar("T")

CUDA_BLOCK = 512
"""The CUDA caching allocator rounds every allocation up to a multiple of 512 bytes."""
ATTENTION_MODES = ("native", "efficient", "math")
FLASH_MAX_HEAD_DIM = 256
"""Flash attention's largest head dim; beyond it CUDA SDPA takes the memory-efficient kernel."""


def round_block(nbytes: int, block: int = CUDA_BLOCK) -> int:
    """Bytes the CUDA caching allocator books for an allocation of `nbytes` (0 stays 0: no block)."""
    return -(-nbytes // block) * block if nbytes > 0 else 0


def _storage_key(t: torch.Tensor) -> int | None:
    try:
        return t.untyped_storage()._cdata
    except (RuntimeError, NotImplementedError):  # sparse and other storage-less layouts
        return None


def _query_value(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *_: Any, **__: Any) -> tuple[torch.Tensor, torch.Tensor]:
    return query, value


class _SDPAMode(TorchFunctionMode):
    """Runs `F.scaled_dot_product_attention` calls in the chosen attention mode (see the module doc)."""

    def __init__(self, mode: str, tracker: "ActivationTracker") -> None:
        super().__init__()
        self.mode = mode
        self.tracker = tracker

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        if func is not torch.nn.functional.scaled_dot_product_attention:
            return func(*args, **kwargs)
        if self.mode == "math":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel([SDPBackend.MATH]):
                return func(*args, **kwargs)
        return self._efficient(func, *_query_value(*args, **kwargs), args, kwargs)

    def _efficient(self, func, query: torch.Tensor, value: torch.Tensor, args, kwargs) -> torch.Tensor:  # noqa: ANN001
        shape = (*query.shape[:-1], value.shape[-1])
        if query.dim() == 4:  # flash / memory-efficient write (B, Lq, heads, Ev) and return it transposed
            out = torch.empty((shape[0], shape[2], shape[1], shape[3]), dtype=query.dtype,
                              device=query.device).transpose(1, 2)
        else:
            out = torch.empty(shape, dtype=query.dtype, device=query.device)
        if query.shape[-1] <= FLASH_MAX_HEAD_DIM:
            # flash's logsumexp: the kernel returns it, SDPA drops it at inference (allocated, freed at once)
            torch.empty(query.shape[:-1], dtype=torch.float32, device=query.device)
        if query.device.type != "meta":
            with self.tracker.paused():
                out.copy_(func(*args, **kwargs))
        return out


class ActivationTracker(TorchDispatchMode):
    """Live and peak bytes of the tensor storages created while active (a context manager).

    `current` and `peak` are in CUDA-allocator bytes (each storage rounded up to `block`);
    `allocations` counts the storages created. See the module docstring for what is counted.
    """

    def __init__(self, *, attention: str = "native", block: int = CUDA_BLOCK) -> None:
        if attention not in ATTENTION_MODES:
            raise ValueError(f"unknown attention mode {attention!r}; valid: {', '.join(ATTENTION_MODES)}")
        super().__init__()
        self.attention = attention
        self.block = block
        self.current = 0
        self.peak = 0
        self.allocations = 0
        self._live: dict[int, tuple[int, weakref.ref]] = {}
        self._paused = False
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> "ActivationTracker":
        if self.attention != "native":
            self._stack.enter_context(_SDPAMode(self.attention, self))
        try:
            super().__enter__()
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            super().__exit__(*exc)
        finally:
            self._stack.close()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Ops run here are not counted (used to compute real values next to a modelled allocation)."""
        before, self._paused = self._paused, True
        try:
            yield
        finally:
            self._paused = before

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self._paused:
            return out
        inputs = None
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            key = _storage_key(t)
            if key is None:
                continue
            if key in self._live:  # a view of a tracked storage, or an in-place op that resized it
                self._resize(key, t)
                continue
            if inputs is None:
                inputs = {_storage_key(a) for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)}
            if key in inputs:  # a view of (or in-place op on) a tensor from before: not new memory
                continue
            self._add(key, t)
        return out

    def _add(self, key: int, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        nbytes = round_block(storage.nbytes(), self.block)
        # The Python storage object lives exactly as long as the storage (torch preserves it while
        # any tensor refers to it), so its weakref callback is the moment the memory is freed.
        ref = weakref.ref(storage, lambda _: self._free(key))
        self._live[key] = (nbytes, ref)
        self.allocations += 1
        self.current += nbytes
        self.peak = max(self.peak, self.current)

    def _resize(self, key: int, t: torch.Tensor) -> None:
        nbytes, ref = self._live[key]
        now = round_block(t.untyped_storage().nbytes(), self.block)
        if now != nbytes:
            self._live[key] = (now, ref)
            self.current += now - nbytes
            self.peak = max(self.peak, self.current)

    def _free(self, key: int) -> None:
        entry = self._live.pop(key, None)
        if entry is not None:
            self.current -= entry[0]


def activation_peak(fn: Callable[..., T], *args: Any, attention: str = "native", **kwargs: Any) -> tuple[T, int]:
    """`fn(*args, **kwargs)` and the peak bytes of the tensors it allocated (live at any one time).

    `attention` ("native", "efficient", "math") is consumed here, not passed to `fn`; see the
    module docstring. Run it under `torch.no_grad()` to measure inference (autograd would keep
    the activations alive for backward). The result's own storages count while they are live.
    """
    with ActivationTracker(attention=attention) as tracker:
        result = fn(*args, **kwargs)
    return result, tracker.peak


def host_store_runner(tracker: ActivationTracker) -> type:
    """A `TiledRunner` subclass that counts a tiled VAE as it runs on a GPU: each crop is copied to
    the compute device (counted), the layer maps wait in host memory (not counted)."""
    from leansd.engine.tiled_vae import TiledRunner

    class HostStoreRunner(TiledRunner):
        def load(self, crop: torch.Tensor) -> torch.Tensor:
            return crop.clone()  # the device copy of the crop

        def new_map(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
            with tracker.paused():
                return super().new_map(shape, dtype)

        def save(self, out: torch.Tensor, region: tuple[int, int, int, int], tile: torch.Tensor) -> None:
            with tracker.paused():
                super().save(out, region, tile)

    return HostStoreRunner
