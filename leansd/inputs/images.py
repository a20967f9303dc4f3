"""Init images and masks: load and validate files, choose the output size, resize, prepare masks.

Conventions (AUTOMATIC1111's, so its users see the same behaviour):

- Images come back as RGB. Transparency is flattened on white, every other pixel mode
  (palette, grayscale, CMYK, 16-bit) is converted, and the EXIF orientation is applied.
- Masks come back as "L": white = regenerate, black = keep, grey = partly (a soft mask).
  A mask with transparency is read the way A1111 reads its sketched masks: the alpha is
  the mask (painted pixels = regenerate, transparent = keep, whatever their colour). An
  opaque mask is read by its brightness.
- Every bad file raises `InvalidRequestError` with one line that names the file.

Pillow is imported here; torch only inside the tensor converters.
"""

from __future__ import annotations

import io
import logging
import math
import numbers
import operator
import os
import warnings
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError

from leansd.errors import InvalidRequestError, brief, one_line
from leansd.request import MAX_SIZE, MIN_SIZE

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

MAX_SIDE = 16384
MAX_PIXELS = 4096 * 4096 * 4  # 8192x8192: about 200 MB as RGB
MIN_SIDE = 8
MAX_MASK_BLUR = 64

RESIZE_MODES = ("just-resize", "crop", "fill")
_RESIZE_ALIASES = {
    "just-resize": "just-resize",
    "just resize": "just-resize",
    "crop": "crop",
    "crop and resize": "crop",
    "fill": "fill",
    "resize and fill": "fill",
}
_RESIZE_INDEX = {0: "just-resize", 1: "crop", 2: "fill"}  # A1111's `resize_mode` numbers (HTTP API)

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


# ---------------------------------------------------------------------------------------------
# Loading


ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF")
"""Pillow decoders allowed for init images and masks. Every other format is refused before decoding:
some of Pillow's plugins hand the file to outside programs (EPS and PDF run Ghostscript)."""
_OPENED_FORMATS = ACCEPTED_FORMATS + ("MPO",)  # the JPEG decoder names many phones' JPEG files MPO
ACCEPTED_NAMES = "PNG, JPEG, WebP, BMP, TIFF, GIF (first frame)"


def load_image(path: str | os.PathLike[str], *, label: str = "image") -> Image.Image:
    """Read an init image as RGB: transparency on white, any mode converted, EXIF orientation applied.

    `label` names the file's role in error messages ("image photo.png: no such file").
    Only `ACCEPTED_FORMATS` are decoded.
    """
    name = _checked_path(path, label=label)
    return _decode(name, label=f"{label} {name}", mask=False)


def load_mask(path: str | os.PathLike[str], *, label: str = "mask") -> Image.Image:
    """Read a mask as "L" (white = regenerate, black = keep, grey = soft); see the module notes for alpha."""
    name = _checked_path(path, label=label)
    return _decode(name, label=f"{label} {name}", mask=True)


def load_image_bytes(data: bytes, *, label: str = "image", mask: bool = False) -> Image.Image:
    """`load_image` (or `load_mask` with `mask=True`) for an encoded image held in memory (an upload).

    Nothing is written to disk; messages start with `label` alone, so they never show a path.
    """
    if not data:
        raise InvalidRequestError(f"{label}: the image is empty (0 bytes)")
    return _decode(io.BytesIO(data), label=label, mask=mask)


def _decode(source: "str | io.BytesIO", *, label: str, mask: bool) -> Image.Image:
    with _open(source, label=label) as image:
        try:
            image = ImageOps.exif_transpose(image)
            out = _to_mask(image) if mask else _to_rgb(image)
        except InvalidRequestError:
            raise
        except Exception as exc:
            what = "grayscale" if mask else "RGB"
            raise InvalidRequestError(f"{label}: cannot convert it to {what} ({one_line(exc, limit=160)})") from exc
    logger.debug("loaded %s: %dx%d", label, *out.size)
    return out


def _checked_path(path: str | os.PathLike[str], *, label: str) -> str:
    """The file's name, after the checks that need no decoding (exists, not a folder, not empty)."""
    name = os.fspath(path)
    if isinstance(name, bytes):
        name = os.fsdecode(name)
    if not os.path.exists(name):
        raise InvalidRequestError(f"{label} {name}: no such file")
    if os.path.isdir(name):
        raise InvalidRequestError(f"{label} {name}: is a folder, not an image file")
    try:
        nbytes = os.path.getsize(name)
    except OSError as exc:
        raise InvalidRequestError(f"{label} {name}: cannot read it ({one_line(exc.strerror or exc)})") from exc
    if nbytes == 0:
        raise InvalidRequestError(f"{label} {name}: the file is empty (0 bytes)")
    return name


def _open(source: "str | io.BytesIO", *, label: str) -> Image.Image:
    """Open and fully decode an image, refusing other formats and oversized images before any pixel is decoded."""
    too_large = (
        f"{label}: the image is too large; the limit is {MAX_SIDE} pixels a side "
        f"and {MAX_PIXELS} pixels in all (8192x8192)"
    )
    refused = f"{label}: is not an image in an accepted format ({ACCEPTED_NAMES})"
    try:
        # Pillow's own decompression-bomb check runs in open(), from the header alone; make its
        # warning an error too, so a huge header never reaches the decoder. `formats` keeps every
        # other plugin (EPS -> Ghostscript, ...) from even looking at the file.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(source, formats=list(ACCEPTED_FORMATS))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidRequestError(too_large) from exc
    except UnidentifiedImageError as exc:
        raise InvalidRequestError(refused) from exc
    except PermissionError as exc:
        raise InvalidRequestError(f"{label}: cannot read it (permission denied)") from exc
    except Exception as exc:
        raise InvalidRequestError(f"{label}: cannot read it ({_safe_reason(exc, source)})") from exc

    try:
        if image.format not in _OPENED_FORMATS:  # belt and braces: open() honoured `formats`
            raise InvalidRequestError(refused)
        width, height = image.size
        if width > MAX_SIDE or height > MAX_SIDE or width * height > MAX_PIXELS:
            raise InvalidRequestError(f"{too_large}; this one is {width}x{height}")
        if width < MIN_SIDE or height < MIN_SIDE:
            raise InvalidRequestError(
                f"{label}: the image is {width}x{height} pixels, too small (at least {MIN_SIDE}x{MIN_SIDE})"
            )
        frames = getattr(image, "n_frames", 1)
        if frames > 1:
            logger.info("%s has %d frames; using the first", label, frames)
        image.load()  # decode every pixel now, so a truncated or corrupt file fails here
    except InvalidRequestError:
        image.close()
        raise
    except Exception as exc:
        image.close()
        raise InvalidRequestError(
            f"{label}: the image is truncated or corrupt ({_safe_reason(exc, source)})"
        ) from exc
    return image


def _safe_reason(exc: BaseException, source: "str | io.BytesIO") -> str:
    """A decoder's message in one short line, without the file's name (the label already says it)."""
    text = one_line(exc, limit=160)
    return text.replace(source, "the file") if isinstance(source, str) else text


def _has_alpha(image: Image.Image) -> bool:
    return "A" in image.getbands() or "a" in image.getbands() or "transparency" in image.info


def _sixteen_bit_to_l(image: Image.Image) -> Image.Image:
    """16-bit (or 32-bit integer / float) grayscale -> 8-bit "L", scaled rather than clipped."""
    values = np.asarray(image)
    if image.mode == "F":
        values = values.astype(np.float64)
        scale = 255.0 if values.size and np.nanmax(values) <= 1.0 else 1.0
        values = np.nan_to_num(values * scale)
    else:
        values = values.astype(np.float64) / 257.0  # 0..65535 -> 0..255
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L")


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in _SIXTEEN_BIT_MODES or image.mode == "F":
        return _sixteen_bit_to_l(image).convert("RGB")
    if _has_alpha(image):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _to_mask(image: Image.Image) -> Image.Image:
    if image.mode in _SIXTEEN_BIT_MODES or image.mode == "F":
        return _sixteen_bit_to_l(image)
    if _has_alpha(image):
        alpha = image.convert("RGBA").getchannel("A")
        if alpha.getextrema() != (255, 255):
            return alpha  # A1111's rule for masks with transparency: the alpha is the mask
        return image.convert("RGBA").convert("L")
    return image.convert("L")


# ---------------------------------------------------------------------------------------------
# Output size and resizing


def _size_value(name: str, value: object, multiple: int) -> int:
    if isinstance(value, bool):
        raise InvalidRequestError(f"{name} must be an integer, got {brief(value)}")
    try:
        number = operator.index(value)  # type: ignore[arg-type]  # a non-integer raises TypeError, handled below
    except TypeError:
        raise InvalidRequestError(f"{name} must be an integer, got {brief(value)}") from None
    if number % multiple:
        raise InvalidRequestError(f"{name} must be a multiple of {multiple}, got {number}")
    if not MIN_SIZE <= number <= MAX_SIZE:
        raise InvalidRequestError(f"{name} must be between {MIN_SIZE} and {MAX_SIZE}, got {number}")
    return number


def target_size(
    image_size: tuple[int, int],
    *,
    width: int | None = None,
    height: int | None = None,
    multiple: int = 8,
) -> tuple[int, int]:
    """The output size for an init image of `image_size` (width, height).

    Both `width` and `height` given: those. One given: the other follows the image's aspect
    ratio, rounded down to a multiple of `multiple`. Neither: the image's own size rounded
    down to a multiple of `multiple`. Every side must end up in 64..4096.
    """
    if isinstance(multiple, bool) or not isinstance(multiple, numbers.Integral) or multiple < 1:
        raise InvalidRequestError(f"multiple must be a positive integer, got {multiple!r}")
    image_w, image_h = (int(side) for side in image_size)
    if image_w < 1 or image_h < 1:
        raise InvalidRequestError(f"image size must be positive, got {image_w}x{image_h}")
    if width is not None and height is not None:
        return _size_value("width", width, multiple), _size_value("height", height, multiple)
    if width is not None:
        out_w = _size_value("width", width, multiple)
        out_h = out_w * image_h // image_w // multiple * multiple
        if not MIN_SIZE <= out_h <= MAX_SIZE:
            raise InvalidRequestError(
                f"width {out_w} with the init image's aspect ratio ({image_w}x{image_h}) gives height {out_h}, "
                f"outside {MIN_SIZE}..{MAX_SIZE}: give height too"
            )
        return out_w, out_h
    if height is not None:
        out_h = _size_value("height", height, multiple)
        out_w = out_h * image_w // image_h // multiple * multiple
        if not MIN_SIZE <= out_w <= MAX_SIZE:
            raise InvalidRequestError(
                f"height {out_h} with the init image's aspect ratio ({image_w}x{image_h}) gives width {out_w}, "
                f"outside {MIN_SIZE}..{MAX_SIZE}: give width too"
            )
        return out_w, out_h
    out_w, out_h = image_w // multiple * multiple, image_h // multiple * multiple
    if min(out_w, out_h) < MIN_SIZE:
        raise InvalidRequestError(
            f"the init image is {image_w}x{image_h} pixels; the output takes its size and needs at least "
            f"{MIN_SIZE} pixels a side: give width and height to resize it"
        )
    if max(out_w, out_h) > MAX_SIZE:
        raise InvalidRequestError(
            f"the init image is {image_w}x{image_h} pixels; the output takes its size and allows at most "
            f"{MAX_SIZE} pixels a side: give width and height to resize it"
        )
    return out_w, out_h


def resize_mode_name(mode: str | int) -> str:
    """Canonical resize mode (`just-resize`, `crop`, `fill`) from ours, A1111's display name or its number."""
    if isinstance(mode, numbers.Integral) and not isinstance(mode, bool) and int(mode) in _RESIZE_INDEX:
        return _RESIZE_INDEX[int(mode)]
    if isinstance(mode, str):
        key = " ".join(mode.strip().lower().split())
        if key in _RESIZE_ALIASES:
            return _RESIZE_ALIASES[key]
    raise InvalidRequestError(
        f"unknown resize mode {brief(mode)}; valid: {', '.join(RESIZE_MODES)} "
        f"(or A1111's 'Just resize', 'Crop and resize', 'Resize and fill')"
    )


def resize_image(
    image: Image.Image,
    width: int,
    height: int,
    *,
    mode: str | int,
    resample: Image.Resampling = Image.Resampling.LANCZOS,
) -> Image.Image:
    """Resize to exactly `width` x `height` with one of A1111's resize modes.

    - `just-resize`: stretch to the size (the aspect ratio may change).
    - `crop` ("Crop and resize"): scale to cover the size, keep the centre, crop the overflow.
    - `fill` ("Resize and fill"): scale to fit inside, centre it, and fill the two empty bands
      by stretching the image's outermost row (or column) across them.
    The same integer arithmetic as A1111's `modules/images.resize_image` places the image.
    """
    key = resize_mode_name(mode)
    if width < 1 or height < 1:
        raise InvalidRequestError(f"resize size must be positive, got {width}x{height}")
    if image.size == (width, height):
        return image.copy()
    if key == "just-resize":
        return image.resize((width, height), resample=resample)

    image_w, image_h = image.size
    ratio, src_ratio = width / height, image_w / image_h
    if key == "crop":
        scaled_w = width if ratio > src_ratio else image_w * height // image_h
        scaled_h = height if ratio <= src_ratio else image_h * width // image_w
        scaled = image.resize((scaled_w, scaled_h), resample=resample)
        left, top = scaled_w // 2 - width // 2, scaled_h // 2 - height // 2
        return scaled.crop((left, top, left + width, top + height))

    scaled_w = width if ratio < src_ratio else max(1, image_w * height // image_h)
    scaled_h = height if ratio >= src_ratio else max(1, image_h * width // image_w)
    scaled = image.resize((scaled_w, scaled_h), resample=resample)
    canvas = Image.new(image.mode, (width, height))
    left, top = width // 2 - scaled_w // 2, height // 2 - scaled_h // 2
    canvas.paste(scaled, (left, top))
    nearest = Image.Resampling.NEAREST
    if ratio < src_ratio:  # bands above and below
        bottom = height - top - scaled_h
        if top > 0:
            canvas.paste(scaled.crop((0, 0, width, 1)).resize((width, top), nearest), (0, 0))
        if bottom > 0:
            edge = scaled.crop((0, scaled_h - 1, width, scaled_h))
            canvas.paste(edge.resize((width, bottom), nearest), (0, top + scaled_h))
    elif ratio > src_ratio:  # bands left and right
        right = width - left - scaled_w
        if left > 0:
            canvas.paste(scaled.crop((0, 0, 1, height)).resize((left, height), nearest), (0, 0))
        if right > 0:
            edge = scaled.crop((scaled_w - 1, 0, scaled_w, height))
            canvas.paste(edge.resize((right, height), nearest), (left + scaled_w, 0))
    return canvas


# ---------------------------------------------------------------------------------------------
# Masks


def _aspect_matches(mask_size: tuple[int, int], image_size: tuple[int, int]) -> bool:
    """Same aspect ratio within 1%, or within one pixel once the mask is scaled to the image."""
    (mask_w, mask_h), (image_w, image_h) = mask_size, image_size
    mask_ratio, image_ratio = mask_w / mask_h, image_w / image_h
    if abs(mask_ratio - image_ratio) <= 0.01 * image_ratio:
        return True
    return abs(round(mask_h * image_w / mask_w) - image_h) <= 1 and abs(round(mask_w * image_h / mask_h) - image_w) <= 1


def prepare_mask(
    mask: Image.Image,
    size: tuple[int, int],
    *,
    invert: bool = False,
    blur: int = 4,
    image_size: tuple[int, int] | None = None,
    resize_mode: str | int = "just-resize",
    name: str | None = None,
) -> Image.Image:
    """The mask the sampler and the final composite use: "L", `size`, inverted if asked, blurred.

    Steps: read the mask's pixels as `load_mask` does; check its aspect ratio against the init
    image's (`image_size`) and scale it to that size; place it on `size` with the same
    `resize_mode` as the image, so the two stay aligned; invert; refuse an all-black result
    (nothing to regenerate); Gaussian blur with standard deviation `blur` output pixels.
    Scaling uses BILINEAR, which never overshoots, so a hard mask gains no faint halo far
    from its edge. `name` (the mask's file) is used in error messages.
    """
    label = f"mask {name}" if name else "mask"
    if isinstance(blur, bool) or not isinstance(blur, numbers.Integral) or not 0 <= blur <= MAX_MASK_BLUR:
        raise InvalidRequestError(f"mask blur must be an integer from 0 to {MAX_MASK_BLUR} pixels, got {brief(blur)}")
    out_w, out_h = size
    pixels = mask if mask.mode == "L" else _to_mask(mask)
    bilinear = Image.Resampling.BILINEAR
    if image_size is not None and pixels.size != tuple(image_size):
        if not _aspect_matches(pixels.size, image_size):
            raise InvalidRequestError(
                f"{label} is {pixels.width}x{pixels.height} but the image is "
                f"{image_size[0]}x{image_size[1]}: aspect ratios differ"
            )
        pixels = pixels.resize(tuple(image_size), resample=bilinear)
    pixels = resize_image(pixels, out_w, out_h, mode=resize_mode, resample=bilinear)
    if invert:
        pixels = ImageOps.invert(pixels)
    if pixels.getextrema()[1] == 0:
        if invert:
            raise InvalidRequestError(
                f"the {label} is all white, so inverted it marks nothing to inpaint "
                "(white marks the area to regenerate)"
            )
        raise InvalidRequestError(f"the {label} is all black: nothing to inpaint (white marks the area to regenerate)")
    if blur > 0:
        # Pillow's radius is the Gaussian's standard deviation, as A1111's mask blur (cv2 sigma).
        pixels = pixels.filter(ImageFilter.GaussianBlur(radius=int(blur)))
    return pixels


# ---------------------------------------------------------------------------------------------
# Tensors and strength


def image_to_tensor(image: Image.Image) -> "torch.Tensor":
    """RGB image -> (1, 3, H, W) float32 in [-1, 1], exactly as diffusers' VaeImageProcessor.preprocess."""
    import torch

    if image.mode != "RGB":
        raise InvalidRequestError(f"image_to_tensor needs an RGB image, got mode {image.mode} (use load_image)")
    array = np.array(image).astype(np.float32) / 255.0  # (H, W, 3)
    tensor = torch.from_numpy(array[None].transpose(0, 3, 1, 2))  # (1, 3, H, W)
    return 2.0 * tensor - 1.0


def mask_to_tensor(mask: Image.Image) -> "torch.Tensor":
    """"L" mask -> (1, 1, H, W) float32 in [0, 1] (1 = regenerate); soft values are kept."""
    import torch

    if mask.mode != "L":
        raise InvalidRequestError(f"mask_to_tensor needs an 'L' mask, got mode {mask.mode} (use prepare_mask)")
    array = np.array(mask).astype(np.float32) / 255.0  # (H, W)
    return torch.from_numpy(array[None, None].copy())  # (1, 1, H, W)


def validate_strength(strength: float) -> float:
    """Denoising strength as a float in 0..1 (inclusive); anything else raises."""
    if isinstance(strength, bool) or not isinstance(strength, numbers.Real):
        raise InvalidRequestError(f"strength must be a number between 0 and 1, got {brief(strength)}")
    value = float(strength)
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise InvalidRequestError(f"strength must be between 0 and 1, got {strength}")
    return value
