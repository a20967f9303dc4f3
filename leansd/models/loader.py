"""Load a model from whatever the user names: "tiny", a single file, a diffusers folder, a hub id.

Every path ends in a `ModelBundle` whose modules are on the CPU, in eval mode, with gradients
off. Single files keep the file's dtype (an fp16 file stays fp16, so nothing is copied);
placement on devices and the cast to the compute dtype are the engine's job.

Single files are loaded without doubling RAM: the modules are built with parameters on the meta
device, then the converted tensors (which still share memory with the file mapping) are assigned
to them, not copied in.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from leansd.errors import ModelLoadError, one_line
from leansd.models import hub
from leansd.models.bundle import ModelBundle
from leansd.models.configs import (
    LDM_CLIP_PREFIX,
    LDM_OPEN_CLIP_PREFIX,
    LDM_UNET_PREFIX,
    LDM_VAE_PREFIX,
    SD1_SCHEDULER_CONFIG,
    SD1_UNET_MODEL_CHANNELS,
    infer_open_clip_config,
    infer_text_config,
    infer_unet_config,
    infer_vae_config,
)
from leansd.models.families import OPEN_CLIP, FamilySpec, describe
from leansd.models.family import ModelFamily, detect_family, detect_family_diffusers, require_supported

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

TINY_SPEC = "tiny"
# Noise-schedule keys a diffusers folder's scheduler config may override.
SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type")
DIFFUSERS_PARTS = ("unet", "vae", "text_encoder")
"""Subfolders of a diffusers folder holding the weights of the three components."""
NARROW_DEFAULT_SIZE = 64
"""Native size of narrower-than-real test models (the tiny random ones): 64 px keeps them fast."""
_SHOWN_KEYS = 3
# Keys under the model prefixes that are not weights of the three modules (ignored on load).
_IGNORED_SUFFIXES = ("embeddings.position_ids",)
_IGNORED_PREFIXES = ("first_stage_model.loss.",)
_IGNORED_KEYS = (LDM_OPEN_CLIP_PREFIX + "logit_scale", LDM_OPEN_CLIP_PREFIX + "attn_mask")


def load_model(spec: str | os.PathLike[str], *, prediction_type: str | None = None, refiner: bool = False) -> ModelBundle:
    """Load ``spec``: "tiny", a ``.safetensors``/``.ckpt`` file, a diffusers folder or a hub id.

    ``refiner=True`` loads an SDXL refiner (and refuses anything else); without it a refiner is refused.

    ``prediction_type`` ("epsilon" or "v_prediction") overrides what the model says it predicts
    (see :mod:`leansd.models.prediction` for how that is told otherwise).
    Raises ``ModelLoadError`` (``UnsupportedModelError`` for a recognised but unsupported
    family, ``OfflineError`` for an unreachable hub id) with a one-line message.
    """
    from leansd.models.prediction import normalise_prediction_type

    explicit = normalise_prediction_type(prediction_type)
    text = os.fspath(spec)
    if text == TINY_SPEC:
        if refiner:
            from leansd.errors import UnsupportedModelError

            raise UnsupportedModelError("tiny: the tiny test model is SD 1.x, not an SDXL refiner")
        bundle = load_tiny()
        if explicit is not None:
            bundle.scheduler_config["prediction_type"] = explicit
        return bundle
    path = Path(text).expanduser()
    if path.is_file():
        return load_single_file(path, prediction_type=explicit, refiner=refiner)
    if path.is_dir():
        return load_diffusers_folder(path, prediction_type=explicit, refiner=refiner)
    if hub.is_hub_id(text):
        folder = hub.download_diffusers_model(text, token=hub.hf_token())
        return load_diffusers_folder(folder, name=text, source=text, prediction_type=explicit, refiner=refiner)
    raise ModelLoadError(
        f"{text}: no such file or folder (expected a .safetensors/.ckpt file, a diffusers folder, "
        "a hub id like owner/name, or 'tiny')"
    )


def load_tiny(*, seed: int = 0) -> ModelBundle:
    """The tiny RANDOM test model, built in process: every path works, the images are noise."""
    from leansd.models import tiny

    logger.warning(tiny.TINY_WARNING)
    parts = tiny.build_tiny_components(seed=seed)
    return ModelBundle(
        unet=_frozen(parts.unet),
        vae=_frozen(parts.vae),
        text_encoder=_frozen(parts.text_encoder),
        tokenizer=_bundled_tokenizer(),
        family=ModelFamily.SD1,
        name=tiny.TINY_NAME,
        source=tiny.TINY_NAME,
        hash=None,
        scheduler_config=dict(SD1_SCHEDULER_CONFIG),
        default_size=tiny.TINY_DEFAULT_SIZE,
        is_random=True,
    )


def load_single_file(
    path: str | os.PathLike[str], *, prediction_type: str | None = None, refiner: bool = False
) -> ModelBundle:
    """Load an original-layout SD 1.x/2.x/SDXL ``.safetensors``/``.ckpt`` (memory-mapped, not copied)."""
    from leansd.models.checkpoint import model_hash, read_state_dict

    p = Path(path)
    sd = read_state_dict(p)
    bundle = bundle_from_state_dict(sd, source=str(p), name=p.stem, path=p, prediction_type=prediction_type,
                                    refiner=refiner)
    bundle.hash = model_hash(p)
    return bundle


def bundle_from_state_dict(
    sd: Mapping[str, "torch.Tensor"],
    *,
    source: str,
    name: str,
    path: str | os.PathLike[str] | None = None,
    prediction_type: str | None = None,
    refiner: bool = False,
) -> ModelBundle:
    """Build the bundle from an original-layout state dict; its tensors are used in place.

    The modules' parameters ARE the tensors of ``sd`` (renamed; the VAE attention weights and
    OpenCLIP's fused attention projections are views of them): nothing is copied, except tensors
    whose dtype differs from the rest of their module (they are cast to the module's dominant
    dtype). ``path``: the file, to find a ``.yaml`` beside it; ``prediction_type``: an explicit
    choice (see :mod:`leansd.models.prediction`).
    """
    import accelerate
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from leansd.models.checkpoint import state_dict_summary
    from leansd.models.convert import diffusers_to_ldm, ldm_to_diffusers

    shapes = state_dict_summary(sd)
    family = detect_family(shapes, source=source)
    require_supported(family, source, refiner=refiner)
    spec = describe(family)
    if family is ModelFamily.SDXL_REFINER or len(spec.text_encoders) == 2:  # SDXL: refiner, base, 9-channel
        return _sdxl_from_state_dict(sd, shapes, spec=spec, source=source, name=name, path=path,
                                     prediction_type=prediction_type)
    text_spec = spec.text_encoders[0]
    open_clip = text_spec.layout == OPEN_CLIP

    try:
        unet_config = infer_unet_config(shapes, spec=spec)
        vae_config = infer_vae_config(shapes, scaling_factor=spec.vae_scaling_factor)
        if open_clip:
            text_config = infer_open_clip_config(shapes, prefix=text_spec.original_prefix,
                                                 activation=text_spec.activation)
        else:
            text_config = infer_text_config(shapes)
    except ModelLoadError as e:  # a truncated or partial file: say which file and what it should be
        raise ModelLoadError(f"{source}: not a complete {spec.label.split(' inpainting')[0]} checkpoint: {e}") from e
    with _model_errors(source, "the inferred architecture"):
        # Parameters on meta (no memory), buffers real: the CLIP position_ids buffer is not in
        # the file's weights and must exist.
        with accelerate.init_empty_weights(include_buffers=False):
            unet = UNet2DConditionModel(**unet_config)
            vae = AutoencoderKL(**vae_config)
            text_class = CLIPTextModelWithProjection if open_clip else CLIPTextModel
            text_encoder = text_class(CLIPTextConfig(**text_config))

    text_model_level = any(k.startswith(LDM_CLIP_PREFIX + "text_model.") for k in sd)
    expected = set(diffusers_to_ldm(unet, vae, text_encoder, text_model_level=text_model_level,
                                    text_layout=text_spec.layout))
    _check_keys(sd, expected, source, family=spec)

    unet_sd, vae_sd, text_sd = ldm_to_diffusers(sd, unet_config=unet_config, vae_config=vae_config,
                                                text_layout=text_spec.layout)
    _assign(unet, unet_sd, source=source, part="UNet")
    _assign(vae, vae_sd, source=source, part="VAE")
    _assign(text_encoder, text_sd, source=source, part="text encoder")
    unet, vae, text_encoder = _frozen(unet), _frozen(vae), _frozen(text_encoder)

    scheduler_config, default_size = _single_file_schedule(
        sd, spec=spec, unet=unet, path=path, explicit=prediction_type, source=source,
        full_size=int(unet_config["block_out_channels"][0]) >= SD1_UNET_MODEL_CHANNELS,
    )
    return ModelBundle(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=_bundled_tokenizer(pad_token=text_spec.pad_token),
        family=family,
        name=name,
        source=source,
        hash=None,
        scheduler_config=scheduler_config,
        default_size=default_size,
        text_layer=text_spec.layer,
    )


def _sdxl_from_state_dict(
    sd: Mapping[str, "torch.Tensor"],
    shapes: Mapping[str, tuple[int, ...]],
    *,
    spec: FamilySpec,
    source: str,
    name: str,
    path: str | os.PathLike[str] | None,
    prediction_type: str | None,
) -> ModelBundle:
    """An SDXL base, 9-channel inpainting or refiner single file in Stability's (sgm) layout; tensors used in
    place as for SD 1.x/2.x.

    A refiner's bundle holds its one text encoder (OpenCLIP-bigG) as ``text_encoder``."""
    import accelerate
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from leansd.models.convert import SGM_CLIP_L_PREFIX, diffusers_to_sgm, sgm_to_diffusers

    clip_l, big_g = (None, spec.text_encoders[0]) if spec.refiner else spec.text_encoders
    try:
        text_config_2 = infer_open_clip_config(shapes, prefix=big_g.original_prefix, activation=big_g.activation)
        text_config = None if clip_l is None else infer_text_config(shapes, prefix=clip_l.original_prefix)
        unet_config = infer_unet_config(shapes, spec=spec, pooled_width=int(text_config_2["projection_dim"]))
        vae_config = infer_vae_config(shapes, scaling_factor=spec.vae_scaling_factor)
    except ModelLoadError as e:
        raise ModelLoadError(f"{source}: not a complete {spec.label} checkpoint: {e}") from e
    with _model_errors(source, "the inferred architecture"):
        with accelerate.init_empty_weights(include_buffers=False):
            unet = UNet2DConditionModel(**unet_config)
            vae = AutoencoderKL(**vae_config)
            text_encoder = None if text_config is None else CLIPTextModel(CLIPTextConfig(**text_config))
            text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text_config_2))
    expected = set(diffusers_to_sgm(unet, vae, text_encoder, text_encoder_2))
    text_prefixes = (big_g.original_prefix,) if clip_l is None else (SGM_CLIP_L_PREFIX, big_g.original_prefix)
    _check_keys(sd, expected, source, family=spec, prefixes=(LDM_UNET_PREFIX, LDM_VAE_PREFIX, *text_prefixes))
    unet_sd, vae_sd, text_sd, text_sd_2 = sgm_to_diffusers(sd, unet_config=unet_config, vae_config=vae_config,
                                                           big_g_prefix=big_g.original_prefix)
    _assign(unet, unet_sd, source=source, part="UNet")
    _assign(vae, vae_sd, source=source, part="VAE")
    if text_encoder is not None:
        _assign(text_encoder, text_sd, source=source, part="text encoder")
    _assign(text_encoder_2, text_sd_2, source=source, part="second text encoder" if clip_l else "text encoder")
    unet = _frozen(unet)
    scheduler_config, default_size = _single_file_schedule(
        sd, spec=spec, unet=unet, path=path, explicit=prediction_type, source=source,
        full_size=int(unet_config["block_out_channels"][0]) >= SD1_UNET_MODEL_CHANNELS,
    )
    if clip_l is None:  # the refiner: bigG alone, as the bundle's text encoder
        return ModelBundle(
            unet=unet, vae=_frozen(vae), text_encoder=_frozen(text_encoder_2),
            tokenizer=_bundled_tokenizer(pad_token=big_g.pad_token), family=spec.family, name=name, source=source,
            hash=None, scheduler_config=scheduler_config, default_size=default_size, text_layer=big_g.layer,
        )
    return ModelBundle(
        unet=unet,
        vae=_frozen(vae),
        text_encoder=_frozen(text_encoder),
        tokenizer=_bundled_tokenizer(pad_token=clip_l.pad_token),
        family=spec.family,
        name=name,
        source=source,
        hash=None,
        scheduler_config=scheduler_config,
        default_size=default_size,
        text_encoder_2=_frozen(text_encoder_2),
        tokenizer_2=_bundled_tokenizer(pad_token=big_g.pad_token),
        text_layer=clip_l.layer,
    )


def _single_file_schedule(
    sd: Mapping[str, Any],
    *,
    spec: FamilySpec,
    unet: Any,
    path: str | os.PathLike[str] | None,
    explicit: str | None,
    source: str,
    full_size: bool,
) -> tuple[dict[str, Any], int]:
    """The noise-schedule config (prediction type, zero terminal SNR) and native size of a single file."""
    from leansd.models.prediction import resolve_single_file

    probe = None
    if spec.family is ModelFamily.SD2:  # 512-base or 768-v: the weights alone tell (A1111's probe)
        from leansd.models.prediction import probe_v_prediction

        def probe() -> tuple[bool, float]:
            return probe_v_prediction(unet, context_width=int(unet.config.cross_attention_dim))

    prediction, ztsnr, why = resolve_single_file(
        path=path, sd=sd, explicit=explicit, default=spec.prediction_type, probe=probe, source=source
    )
    if why.startswith("no .yaml"):  # an assumption: say it where the user sees it
        logger.warning("%s: assuming %s prediction for this %s model (%s); give --prediction-type or a .yaml "
                       "beside the file to choose", Path(source).name, prediction, spec.label, why)
    elif spec.family is not ModelFamily.SD1 or prediction != "epsilon":
        logger.info("%s: %s model, %s prediction (%s)", Path(source).name, spec.label, prediction, why)
    config = dict(SD1_SCHEDULER_CONFIG, prediction_type=prediction)
    if ztsnr:
        config["rescale_betas_zero_snr"] = True
        logger.warning("%s: zero terminal SNR (the 'ztsnr' marker key): the noise schedule is rescaled", Path(source).name)
    size = spec.native_size_for(prediction) if full_size else NARROW_DEFAULT_SIZE
    return config, size


def load_diffusers_folder(
    folder: str | os.PathLike[str],
    *,
    name: str | None = None,
    source: str | None = None,
    prediction_type: str | None = None,
    refiner: bool = False,
) -> ModelBundle:
    """Load a diffusers ``StableDiffusionPipeline`` folder (safetensors preferred, no network).

    ``prediction_type`` overrides the one in ``scheduler/scheduler_config.json``. ``refiner``: load an
    SDXL refiner folder (``text_encoder_2`` only; the bundle holds it as its text encoder)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    root = Path(folder)
    label = source or str(root)
    if not (root / "model_index.json").is_file():
        raise ModelLoadError(
            f"{label}: a folder without model_index.json is not a diffusers model "
            "(expected a .safetensors/.ckpt file, a diffusers folder, a hub id like owner/name, or 'tiny')"
        )
    refiner_folder = (root / "text_encoder_2" / "config.json").is_file() and not (root / "text_encoder").exists()
    parts = [p for p in DIFFUSERS_PARTS if not (refiner_folder and p == "text_encoder")]
    missing = [part for part in parts if not (root / part / "config.json").is_file()]
    if missing:
        raise ModelLoadError(
            f"{label}: incomplete diffusers model folder: missing {', '.join(p + '/' for p in missing)}"
        )
    family = detect_family_diffusers(root)
    require_supported(family, label, refiner=refiner)
    spec = describe(family)
    text_spec = spec.text_encoders[0]
    if spec.refiner:
        return _refiner_folder(root, label=label, name=name, spec=spec, prediction_type=prediction_type)

    common: dict[str, Any] = dict(local_files_only=True)
    with _model_errors(label, "unet/"):
        unet = UNet2DConditionModel.from_pretrained(root, subfolder="unet", torch_dtype=torch.float32, **common)
    with _model_errors(label, "vae/"):
        vae = AutoencoderKL.from_pretrained(root, subfolder="vae", torch_dtype=torch.float32, **common)
    with _model_errors(label, "text_encoder/"):
        text_encoder = CLIPTextModel.from_pretrained(root, subfolder="text_encoder", dtype=torch.float32, **common)
    text_encoder_2 = tokenizer_2 = None
    if len(spec.text_encoders) > 1:
        second = spec.text_encoders[1]
        if not (root / second.subfolder / "config.json").is_file():
            raise ModelLoadError(f"{label}: incomplete {spec.label} diffusers folder: missing {second.subfolder}/")
        with _model_errors(label, f"{second.subfolder}/"):
            text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(
                root, subfolder=second.subfolder, dtype=torch.float32, **common)
        tokenizer_2 = _folder_tokenizer(root / "tokenizer_2", pad_token=second.pad_token)
    tokenizer = _folder_tokenizer(root / "tokenizer", pad_token=text_spec.pad_token)

    for module in (unet, vae, text_encoder, text_encoder_2):
        if module is not None:
            _check_materialised(module, source=label)
    scheduler_config = _folder_schedule(root)
    if prediction_type is not None:
        scheduler_config["prediction_type"] = prediction_type
    if family is not ModelFamily.SD1 or prediction_type is not None:
        logger.info("%s: %s model, %s prediction (%s)", label, spec.label, scheduler_config["prediction_type"],
                    "given explicitly" if prediction_type is not None else "scheduler config")
    return ModelBundle(
        unet=_frozen(unet),
        vae=_frozen(vae),
        text_encoder=_frozen(text_encoder),
        tokenizer=tokenizer,
        family=family,
        name=name or root.name,
        source=label,
        hash=None,
        scheduler_config=scheduler_config,
        default_size=int(unet.config.sample_size) * 2 ** (len(vae.config.block_out_channels) - 1),
        text_encoder_2=None if text_encoder_2 is None else _frozen(text_encoder_2),
        tokenizer_2=tokenizer_2,
        text_layer=text_spec.folder_layer,
    )


def _refiner_folder(
    root: Path, *, label: str, name: str | None, spec: FamilySpec, prediction_type: str | None
) -> ModelBundle:
    """An SDXL refiner diffusers folder: unet/, vae/, text_encoder_2/ (OpenCLIP-bigG) and tokenizer_2/."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModelWithProjection

    big_g = spec.text_encoders[0]
    if not (root / big_g.subfolder / "config.json").is_file():
        raise ModelLoadError(f"{label}: incomplete {spec.label} diffusers folder: missing {big_g.subfolder}/")
    common: dict[str, Any] = dict(local_files_only=True)
    with _model_errors(label, "unet/"):
        unet = UNet2DConditionModel.from_pretrained(root, subfolder="unet", torch_dtype=torch.float32, **common)
    with _model_errors(label, "vae/"):
        vae = AutoencoderKL.from_pretrained(root, subfolder="vae", torch_dtype=torch.float32, **common)
    with _model_errors(label, f"{big_g.subfolder}/"):
        text_encoder = CLIPTextModelWithProjection.from_pretrained(
            root, subfolder=big_g.subfolder, dtype=torch.float32, **common)
    for module in (unet, vae, text_encoder):
        _check_materialised(module, source=label)
    if int(unet.config.in_channels) != 4:
        from leansd.errors import UnsupportedModelError

        raise UnsupportedModelError(f"{label}: a {unet.config.in_channels}-channel SDXL refiner is not supported")
    scheduler_config = _folder_schedule(root)
    if prediction_type is not None:
        scheduler_config["prediction_type"] = prediction_type
    return ModelBundle(
        unet=_frozen(unet), vae=_frozen(vae), text_encoder=_frozen(text_encoder),
        tokenizer=_folder_tokenizer(root / "tokenizer_2", pad_token=big_g.pad_token), family=spec.family,
        name=name or root.name, source=label, hash=None, scheduler_config=scheduler_config,
        default_size=int(unet.config.sample_size) * 2 ** (len(vae.config.block_out_channels) - 1),
        text_layer=big_g.folder_layer,
    )


def _folder_tokenizer(folder: Path, *, pad_token: str) -> Any:
    """A folder's tokenizer if it has one, else the bundled BPE with the family's padding."""
    if folder.is_dir():
        from leansd.models.tokenizer import load_tokenizer

        return load_tokenizer(folder)
    return _bundled_tokenizer(pad_token=pad_token)


def _folder_schedule(root: Path) -> dict[str, Any]:
    """SD1_SCHEDULER_CONFIG with the folder's noise-schedule keys (if it has a scheduler config)."""
    config = dict(SD1_SCHEDULER_CONFIG)
    path = root / "scheduler" / "scheduler_config.json"
    if path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"{path}: cannot read the scheduler config ({type(e).__name__}: {e})") from e
        if isinstance(data, dict):
            config.update({k: data[k] for k in SCHEDULE_KEYS if k in data})
    return config


def _check_keys(
    sd: Mapping[str, Any],
    expected: set[str],
    source: str,
    *,
    family: FamilySpec,
    prefixes: tuple[str, ...] = (LDM_UNET_PREFIX, LDM_VAE_PREFIX, LDM_CLIP_PREFIX, LDM_OPEN_CLIP_PREFIX),
) -> None:
    """Raise ModelLoadError naming a few missing / unexpected model tensors (original names)."""
    ignored = set(_IGNORED_KEYS) | {p + name for p in prefixes for name in ("logit_scale", "attn_mask")}

    def relevant(key: str) -> bool:
        return (
            key.startswith(prefixes)
            and not key.endswith(_IGNORED_SUFFIXES)
            and not key.startswith(_IGNORED_PREFIXES)
            and key not in ignored
        )

    present = {k for k in sd if relevant(k)}
    wanted = {k for k in expected if relevant(k)}
    missing = sorted(wanted - present)
    unexpected = sorted(present - wanted)
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensors ({_few(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensors ({_few(unexpected)})")
    if problems:
        raise ModelLoadError(
            f"{source}: not a complete {family.label.split(' inpainting')[0]} checkpoint: {'; '.join(problems)}"
        )


def _few(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOWN_KEYS])
    return shown + (", ..." if len(keys) > _SHOWN_KEYS else "")


def _assign(module: "torch.nn.Module", weights: dict[str, "torch.Tensor"], *, source: str, part: str) -> None:
    """Make ``weights`` the module's parameters (assign, not copy) in one floating dtype.

    The dtype holding most elements wins; `.to` returns the very same tensor when it already
    has that dtype, so a uniform fp32 or fp16 file is not copied at all.
    """
    from collections import Counter

    sizes: Counter = Counter()
    for v in weights.values():
        if v.is_floating_point():
            sizes[v.dtype] += v.numel()
    if sizes:
        dtype = sizes.most_common(1)[0][0]
        weights = {k: v.to(dtype) if v.is_floating_point() else v for k, v in weights.items()}
    try:
        module.load_state_dict(weights, strict=True, assign=True)
    except RuntimeError as e:
        # torch lists every key over many lines; keep the first one (it names the problem).
        raise ModelLoadError(f"{source}: the {part} weights do not fit the architecture ({one_line(e, limit=200)})") from e
    _check_materialised(module, source=source)


def _check_materialised(module: "torch.nn.Module", *, source: str) -> None:
    left = [n for n, p in module.named_parameters() if p.is_meta]
    left += [n for n, b in module.named_buffers() if b.is_meta]
    if left:
        raise ModelLoadError(
            f"{source}: {len(left)} {type(module).__name__} tensors were not loaded ({_few(sorted(left))})"
        )


def _frozen(module: Any) -> Any:
    module.eval()
    module.requires_grad_(False)
    return module


def _bundled_tokenizer(*, pad_token: str | None = None) -> Any:
    from leansd.models.tokenizer import bundled_tokenizer, load_tokenizer

    return load_tokenizer(None) if pad_token is None else bundled_tokenizer(pad_token=pad_token)


@contextmanager
def _model_errors(source: str, part: str) -> Iterator[None]:
    """Turn library errors (OSError, ValueError, ...) while loading ``part`` into one-line ModelLoadErrors."""
    try:
        yield
    except ModelLoadError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
        raise ModelLoadError(f"{source}: cannot load {part} ({type(e).__name__}: {one_line(e, limit=200)})") from e
