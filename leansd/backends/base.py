"""The compute-backend interface, and torch's implementation of it (eager PyTorch, as always)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Protocol

if TYPE_CHECKING:
    import torch


class ComputeBackend(Protocol):
    """Runs the model parts the engine placed. The engine owns placement, plans and precision.

    `unet` returns what the sampling loop calls: ``unet(sample, t, encoder_hidden_states=...,
    added_cond_kwargs=..., return_dict=False) -> (noise_pred,)`` with the UNet's ``config``.
    `vae_decode` maps unscaled latents to images in [-1, 1]; `vae_encode` images to the latent
    distribution (``mean``, ``std``, ``mode()``). `text_encoder` returns the encoder the prompt
    code calls. `check` (when given) runs before every model call: the engine's interrupt check.
    """

    name: str
    """"torch" or "openvino": what the infotext's `Backend` entry and the result's info record."""

    def unet(self, unet: Any, *, patches: str, check: Callable[[], None]) -> Any: ...

    def vae_decode(self, vae: Any, z: "torch.Tensor", tile: int | None, *, scale: int,
                   efficient_attention: bool | None, check: Callable[[], None]) -> "torch.Tensor": ...

    def vae_encode(self, vae: Any, pixels: "torch.Tensor", tile: int | None, *, scale: int,
                   efficient_attention: bool | None, check: Callable[[], None]) -> Any: ...

    def text_encoder(self, encoder: Any) -> Any: ...

    def release(self) -> None:
        """Forget what was built for the current model (the engine switches models)."""


class TorchBackend:
    """Eager PyTorch on the engine's device: the modules themselves run (hooks, streaming, tiles)."""

    name = "torch"

    def unet(self, unet: Any, *, patches: str, check: Callable[[], None]) -> Any:
        return unet  # the engine's in-layer interrupt hooks are on its modules already

    def vae_decode(self, vae: Any, z: "torch.Tensor", tile: int | None, *, scale: int,
                   efficient_attention: bool | None, check: Callable[[], None]) -> "torch.Tensor":
        from leansd.engine.vae import decode

        return decode(vae, z, tile, scale=scale, efficient_attention=efficient_attention)

    def vae_encode(self, vae: Any, pixels: "torch.Tensor", tile: int | None, *, scale: int,
                   efficient_attention: bool | None, check: Callable[[], None]) -> Any:
        from leansd.engine.vae import encode

        return encode(vae, pixels, tile, scale=scale, efficient_attention=efficient_attention)

    def text_encoder(self, encoder: Any) -> Any:
        return encoder

    def release(self) -> None:
        pass
