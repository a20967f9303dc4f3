"""The denoiser: the model call of one loop step, guided (in the spirit of k-diffusion's ``CFGDenoiser``).

The loop and the samplers only ask ``denoiser(x, t, step)`` for the guided prediction (eps, v or
x0, as the model predicts) of the scaled latents ``x`` at timestep ``t`` on loop step ``step``. The
:class:`Denoiser` owns everything between that question and the UNet:
- the step's text conditioning from the :class:`~leansd.prompts.conditioning.ConditioningPlan`
  (prompt editing, alternation), with the negative prompt and every ``AND`` part batched into one
  UNet call;
- classifier-free guidance (Ho & Salimans 2022) summed over the ``AND`` parts (composable
  diffusion, Liu et al. 2022) and guidance rescale (Lin et al. 2023);
- the extra input channels of 9-channel inpainting UNets (mask and masked-image latents);
- the family's added conditioning (:class:`AddedConditioning`: SDXL's pooled text embedding with its
  size/crop ids, the refiner's aesthetic score).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    import torch

    from leansd.prompts.conditioning import ConditioningPlan, StepConditioning


def combine_guidance(
    noise_uncond: "torch.Tensor",
    noise_conds: Sequence["torch.Tensor"],
    weights: Sequence[float],
    guidance_scale: float,
) -> "torch.Tensor":
    """Composable diffusion guidance (Liu et al. 2022): eps_u + s * sum_i w_i (eps_c_i - eps_u).

    With one part of weight 1 this is exactly ``noise_uncond + guidance_scale * (noise_cond -
    noise_uncond)`` (classifier-free guidance, Ho & Salimans 2022), bit for bit.
    """
    if not noise_conds or len(noise_conds) != len(weights):
        raise ValueError(f"need one weight per conditional prediction, got {len(noise_conds)} and {len(weights)}")
    delta = None
    for noise_cond, weight in zip(noise_conds, weights, strict=True):
        term = noise_cond - noise_uncond
        if weight != 1.0:
            term = weight * term
        delta = term if delta is None else delta + term
    assert delta is not None  # noise_conds is not empty
    return noise_uncond + guidance_scale * delta


def rescale_guidance(guided: "torch.Tensor", conditional: "torch.Tensor", amount: float) -> "torch.Tensor":
    """Guidance rescale (Lin et al. 2023, eq. 15-16, as diffusers): match the guided prediction's
    per-image standard deviation to the conditional one's, mixed in by ``amount`` (0..1)."""
    dims = list(range(1, guided.ndim))
    rescaled = guided * (conditional.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return amount * rescaled + (1 - amount) * guided


def uses_guidance(guidance_scale: float, unet: Any) -> bool:
    """CFG runs the unconditional branch only when it changes the result (as diffusers decides)."""
    return guidance_scale > 1.0 and unet.config.time_cond_proj_dim is None


@dataclass(frozen=True)
class AddedConditioning:
    """SDXL's added UNet conditioning besides the text: ``time_ids`` sent with the pooled text embeddings.

    ``time_ids`` (1, N) go with the prompt's passes, ``negative_time_ids`` (1, N) with the negative
    prompt's (default: the same). SDXL base: (original H, W, crop top, left, target H, W); the
    refiner: (original H, W, crop top, left, aesthetic score), 6.0 for the prompt and 2.5 for the
    negative as diffusers and AUTOMATIC1111.
    """

    time_ids: "torch.Tensor"
    negative_time_ids: "torch.Tensor | None" = None

    def kwargs(self, pooled: "torch.Tensor", *, batch: int, with_uncond: bool) -> dict[str, Any]:
        """UNet ``added_cond_kwargs`` for ``pooled`` (k*B, P) in the context's order [uncond; cond_1; ...]."""
        import torch

        rows = pooled.shape[0]
        if with_uncond and self.negative_time_ids is not None:
            negative = self.negative_time_ids.expand(batch, -1)
            positive = self.time_ids.expand(rows - batch, -1)
            time_ids = torch.cat([negative, positive])  # (k*B, N)
        else:
            time_ids = self.time_ids.expand(rows, -1)
        return {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}


@dataclass
class Prediction:
    """One evaluation: the guided prediction and, when guided, the negative and first prompt's branches."""

    guided: "torch.Tensor"
    branches: dict[str, "torch.Tensor"]


class Denoiser:
    """The guided model of one sampling run: ``denoiser(x, t, step) -> prediction`` (see the module docstring).

    ``unet`` is what to call (the engine's placed UNet or its split-batch wrapper). ``plan`` covers the
    run's loop steps; ``step`` indexes it. ``extra_channels`` (B, C', h, w) are concatenated to the
    UNet input (9-channel inpainting). ``added``: the family's added conditioning, used on steps whose
    conditioning has pooled embeddings. ``guidance_rescale`` > 0 applies :func:`rescale_guidance`
    against the single conditional prediction (or the unscaled sum of the ``AND`` parts).
    """

    def __init__(
        self,
        *,
        unet: Any,
        plan: "ConditioningPlan",
        guidance_scale: float,
        guidance_rescale: float = 0.0,
        extra_channels: "torch.Tensor | None" = None,
        added: AddedConditioning | None = None,
    ) -> None:
        self.unet = unet
        self.plan = plan
        self.guidance_scale = guidance_scale
        self.guidance_rescale = guidance_rescale
        self.extra_channels = extra_channels
        self.added = added
        # The unconditional pass runs only when guidance changes the result, or for AND prompts.
        self.guided = uses_guidance(guidance_scale, unet) or plan.is_composable
        self._last: "StepConditioning | None" = None
        self._inputs: tuple[Any, ...] = ()

    @property
    def passes(self) -> int:
        """UNet passes per step at most: the negative plus every AND part when guided."""
        return 1 + self.plan.max_parts if self.guided else self.plan.max_parts

    def _step_inputs(self, step: "StepConditioning", batch: int) -> tuple[Any, ...]:
        """Context, pass count, added-conditioning kwargs and extra channels of a step's conditioning;
        steps that share a conditioning share them."""
        import torch

        if step is self._last:
            return self._inputs
        context = step.context(batch, include_uncond=self.guided)  # (k*B, 77c, D): [uncond; cond_1; ...]
        passes = context.shape[0] // batch
        pooled = step.pooled_context(batch, include_uncond=self.guided)  # (k*B, P) or None
        added = {} if pooled is None or self.added is None else self.added.kwargs(
            pooled, batch=batch, with_uncond=self.guided)
        extra = None if self.extra_channels is None else torch.cat([self.extra_channels] * passes)  # (k*B, C', h, w)
        self._last, self._inputs = step, (context, passes, added, extra)
        return self._inputs

    def predict(self, x: "torch.Tensor", t: "torch.Tensor", step: int) -> Prediction:
        """The guided prediction for the scaled latents ``x`` (B, 4, h, w), with its branches."""
        import torch

        conditioning = self.plan.at(step)
        context, passes, added, extra = self._step_inputs(conditioning, x.shape[0])
        model_input = torch.cat([x] * passes) if passes > 1 else x
        if extra is not None:
            model_input = torch.cat([model_input, extra], dim=1)  # (k*B, 4 + C', h, w)
        output = self.unet(model_input, t, encoder_hidden_states=context, return_dict=False, **added)[0]
        if not self.guided:
            return Prediction(output, {})
        uncond, *conds = output.chunk(passes)
        guided = combine_guidance(uncond, conds, conditioning.weights, self.guidance_scale)
        if self.guidance_rescale > 0:
            single = len(conds) == 1 and conditioning.weights == (1.0,)
            reference = conds[0] if single else combine_guidance(uncond, conds, conditioning.weights, 1.0)
            guided = rescale_guidance(guided, reference, self.guidance_rescale)
        return Prediction(guided, {"negative-prompt": uncond, "prompt": conds[0]})

    def __call__(self, x: "torch.Tensor", t: "torch.Tensor", step: int) -> "torch.Tensor":
        return self.predict(x, t, step).guided
