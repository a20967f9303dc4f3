"""Init images and masks: loading every pixel mode, EXIF orientation, resize modes, masks, bad files."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from leansd.errors import InvalidRequestError
from leansd.inputs import (
    image_to_tensor,
    load_image,
    load_mask,
    mask_to_tensor,
    prepare_mask,
    resize_image,
    resize_mode_name,
    target_size,
    validate_strength,
)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(int)


def halves(size=(64, 64), *, left=(255, 0, 0), right=(0, 0, 255)) -> Image.Image:
    array = np.zeros((size[1], size[0], 3), np.uint8)
    array[:, : size[0] // 2] = left
    array[:, size[0] // 2 :] = right
    return Image.fromarray(array)


def png_header(path: Path, width: int, height: int) -> Path:
    """A PNG that declares `width` x `height` in its IHDR but carries no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


# ---------------------------------------------------------------------------------------------
# Pixel modes


def test_rgba_is_flattened_on_white(tmp_path):
    array = np.zeros((16, 16, 4), np.uint8)
    array[0, 0] = (255, 0, 0, 0)  # fully transparent red
    array[0, 1] = (0, 0, 255, 255)  # opaque blue
    array[0, 2] = (0, 0, 0, 128)  # half-transparent black
    path = tmp_path / "rgba.png"
    Image.fromarray(array, "RGBA").save(path)
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (16, 16)
    assert image.getpixel((0, 0)) == (255, 255, 255)
    assert image.getpixel((1, 0)) == (0, 0, 255)
    assert all(abs(v - 127) <= 1 for v in image.getpixel((2, 0)))


def test_la_is_flattened_on_white(tmp_path):
    path = tmp_path / "la.png"
    image = Image.new("LA", (8, 8), (0, 255))
    image.putpixel((3, 3), (0, 0))
    image.save(path)
    loaded = load_image(path)
    assert loaded.getpixel((3, 3)) == (255, 255, 255)
    assert loaded.getpixel((0, 0)) == (0, 0, 0)


def test_palette_with_and_without_transparency(tmp_path):
    palette = [10, 20, 30, 200, 100, 50] + [0] * (256 * 3 - 6)
    array = np.zeros((8, 8), np.uint8)
    array[:, 4:] = 1
    plain = Image.fromarray(array, "P")
    plain.putpalette(palette)
    plain.save(tmp_path / "p.png")
    loaded = load_image(tmp_path / "p.png")
    assert loaded.getpixel((0, 0)) == (10, 20, 30) and loaded.getpixel((7, 7)) == (200, 100, 50)

    plain.save(tmp_path / "p_transparent.png", transparency=0)
    loaded = load_image(tmp_path / "p_transparent.png")
    assert loaded.getpixel((0, 0)) == (255, 255, 255) and loaded.getpixel((7, 7)) == (200, 100, 50)


def test_grayscale_and_1bit(tmp_path):
    Image.new("L", (8, 8), 77).save(tmp_path / "gray.png")
    assert load_image(tmp_path / "gray.png").getpixel((4, 4)) == (77, 77, 77)
    Image.new("1", (8, 8), 1).save(tmp_path / "bw.png")
    assert load_image(tmp_path / "bw.png").getpixel((4, 4)) == (255, 255, 255)


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path):
    array = np.zeros((8, 8), np.uint16)
    array[0, 0], array[0, 1], array[0, 2] = 257 * 100, 65535, 1000
    path = tmp_path / "gray16.png"
    Image.fromarray(array).save(path)
    assert Image.open(path).mode.startswith("I")
    image = load_image(path)
    assert image.getpixel((0, 0)) == (100, 100, 100)
    assert image.getpixel((1, 0)) == (255, 255, 255)
    assert image.getpixel((2, 0)) == (4, 4, 4)  # 1000 / 257, where a plain convert would clip to 255
    assert image.getpixel((3, 0)) == (0, 0, 0)
    mask = load_mask(path)
    assert mask.mode == "L" and mask.getpixel((0, 0)) == 100


def test_cmyk_jpeg(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(path, quality=100)
    assert Image.open(path).mode == "CMYK"
    image = load_image(path)
    assert image.mode == "RGB"
    assert np.abs(pixels(image) - [255, 0, 0]).max() <= 8


def test_webp_lossless(tmp_path):
    path = tmp_path / "halves.webp"
    halves((16, 16)).save(path, lossless=True)
    image = load_image(path)
    assert image.getpixel((0, 0)) == (255, 0, 0) and image.getpixel((15, 15)) == (0, 0, 255)


def test_exif_orientation_is_honoured(tmp_path):
    array = np.zeros((32, 64, 3), np.uint8)  # 64 wide, 32 high
    array[:16, :16] = (255, 0, 0)  # a red block at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation 6: display rotated 90 degrees clockwise
    path = tmp_path / "rotated.jpg"
    Image.fromarray(array).save(path, exif=exif, quality=100)
    image = load_image(path)
    assert image.size == (32, 64)
    assert np.abs(pixels(image)[8, 24] - [255, 0, 0]).max() <= 10  # top-left went to top-right
    assert np.abs(pixels(image)[8, 8]).max() <= 10
    assert np.abs(pixels(image)[56, 24]).max() <= 10


# ---------------------------------------------------------------------------------------------
# Output size


def test_target_size():
    assert target_size((1000, 667), width=None, height=None) == (1000, 664)
    assert target_size((517, 70), width=None, height=None) == (512, 64)
    assert target_size((1000, 667), width=512, height=768) == (512, 768)
    assert target_size((1000, 667), width=768, height=None) == (768, 512)
    assert target_size((1000, 500), width=None, height=256) == (512, 256)
    assert target_size((130, 130), width=None, height=None, multiple=64) == (128, 128)


@pytest.mark.parametrize(
    "image_size, kwargs, words",
    [
        ((1000, 60), {}, "at least 64"),
        ((5000, 4000), {}, "at most 4096"),
        ((512, 512), {"width": 100, "height": 512}, "multiple of 8"),
        ((512, 512), {"width": 8192, "height": 512}, "between 64 and 4096"),
        ((4000, 100), {"width": 512}, "give height too"),
    ],
)
def test_target_size_errors(image_size, kwargs, words):
    with pytest.raises(InvalidRequestError, match=words):
        target_size(image_size, width=kwargs.get("width"), height=kwargs.get("height"))


# ---------------------------------------------------------------------------------------------
# Resize modes


def three_stripes(size=(200, 100)) -> Image.Image:
    """Red left quarter, green middle half, blue right quarter."""
    width, height = size
    array = np.zeros((height, width, 3), np.uint8)
    array[:, : width // 4] = (255, 0, 0)
    array[:, width // 4 : 3 * width // 4] = (0, 255, 0)
    array[:, 3 * width // 4 :] = (0, 0, 255)
    return Image.fromarray(array)


@pytest.mark.parametrize("mode", ["just-resize", "crop", "fill"])
@pytest.mark.parametrize("size", [(64, 64), (96, 40), (40, 96), (200, 100)])
def test_every_mode_gives_the_requested_size(mode, size):
    out = resize_image(three_stripes(), *size, mode=mode)
    assert out.size == size and out.mode == "RGB"


def test_just_resize_stretches():
    out = pixels(resize_image(halves((100, 50)), 64, 64, mode="just-resize"))
    assert (out[:, 5] == [255, 0, 0]).all() and (out[:, 58] == [0, 0, 255]).all()


def test_crop_keeps_the_centre():
    image = three_stripes()
    out = resize_image(image, 64, 64, mode="crop")
    # A1111: scale to cover (128x64), paste centred: the middle 64 columns survive.
    expected = image.resize((128, 64), Image.Resampling.LANCZOS).crop((32, 0, 96, 64))
    assert (pixels(out) == pixels(expected)).all()
    assert (np.abs(pixels(out)[:, 4:60] - [0, 255, 0]) <= 2).all()  # only the green middle is left


def test_fill_stretches_edge_rows_into_the_bands():
    array = np.zeros((100, 200, 3), np.uint8)
    array[:, :, 1] = 128
    array[:50, :, 0] = np.linspace(0, 255, 200)  # top half: a red ramp
    array[50:, :, 2] = np.linspace(255, 0, 200)  # bottom half: a blue ramp
    out = pixels(resize_image(Image.fromarray(array), 64, 64, mode="fill"))
    scaled = pixels(Image.fromarray(array).resize((64, 32), Image.Resampling.LANCZOS))
    assert (out[16:48] == scaled).all()  # centred, aspect ratio kept
    assert (out[:16] == scaled[0]).all()  # top band: the first row repeated
    assert (out[48:] == scaled[-1]).all()  # bottom band: the last row repeated
    assert out[0, 60, 0] > 200 and out[63, 3, 2] > 200


def test_fill_side_bands_and_odd_remainders():
    image = Image.fromarray(np.rot90(np.asarray(three_stripes((300, 100)))).copy())  # 100 wide, 300 high
    out = pixels(resize_image(image, 64, 64, mode="fill"))
    scaled_w = 100 * 64 // 300  # 21, so the bands are 22 and 21 columns wide
    left = 64 // 2 - scaled_w // 2
    assert left == 22
    assert (out[:, :left] == out[:, left : left + 1]).all()
    assert (out[:, left + scaled_w :] == out[:, left + scaled_w - 1 : left + scaled_w]).all()
    assert not (out.sum(axis=2) == 0).all(axis=0).any()  # no black column anywhere


def test_same_aspect_modes_agree():
    image = three_stripes()
    outs = [pixels(resize_image(image, 128, 64, mode=m)) for m in ("just-resize", "crop", "fill")]
    assert (outs[0] == outs[1]).all() and (outs[0] == outs[2]).all()


def test_resize_mode_names():
    assert resize_mode_name("Just resize") == "just-resize"
    assert resize_mode_name("crop AND resize") == "crop"
    assert resize_mode_name(" Resize and fill ") == "fill"
    assert [resize_mode_name(i) for i in (0, 1, 2)] == ["just-resize", "crop", "fill"]
    with pytest.raises(InvalidRequestError, match="just-resize, crop, fill") as info:
        resize_image(three_stripes(), 64, 64, mode="stretch")
    assert "\n" not in str(info.value)
    with pytest.raises(InvalidRequestError, match="unknown resize mode"):
        resize_mode_name(3)


# ---------------------------------------------------------------------------------------------
# Masks


def mask_left_white(size=(64, 64), white_columns=32) -> Image.Image:
    array = np.zeros((size[1], size[0]), np.uint8)
    array[:, :white_columns] = 255
    return Image.fromarray(array, "L")


def test_load_mask_modes(tmp_path):
    halves((16, 16), left=(255, 255, 255), right=(0, 0, 0)).save(tmp_path / "rgb.png")
    mask = load_mask(tmp_path / "rgb.png")
    assert mask.mode == "L" and mask.getpixel((0, 0)) == 255 and mask.getpixel((15, 0)) == 0

    Image.new("L", (16, 16), 100).save(tmp_path / "soft.png")
    assert load_mask(tmp_path / "soft.png").getpixel((3, 3)) == 100  # grey stays grey: a soft mask

    sketch = np.zeros((16, 16, 4), np.uint8)
    sketch[:, :8] = (0, 0, 0, 255)  # black strokes, opaque: painted = regenerate
    sketch[:, 8:] = (255, 255, 255, 0)  # white but transparent: keep
    Image.fromarray(sketch, "RGBA").save(tmp_path / "sketch.png")
    mask = load_mask(tmp_path / "sketch.png")
    assert mask.getpixel((0, 0)) == 255 and mask.getpixel((15, 0)) == 0

    opaque = np.full((16, 16, 4), 255, np.uint8)
    opaque[:, 8:, :3] = 0
    Image.fromarray(opaque, "RGBA").save(tmp_path / "opaque.png")
    mask = load_mask(tmp_path / "opaque.png")
    assert mask.getpixel((0, 0)) == 255 and mask.getpixel((15, 0)) == 0


def test_prepare_mask_resizes_and_keeps_hard_edges():
    out = prepare_mask(mask_left_white((32, 32), 16), (64, 64), blur=0, image_size=(128, 128))
    assert out.mode == "L" and out.size == (64, 64)
    values = pixels(out)
    assert (values[:, :30] == 255).all() and (values[:, 34:] == 0).all()


def test_prepare_mask_follows_the_image_resize_mode():
    # A half-size mask, white over the middle half (the green of three_stripes): crop keeps
    # exactly that middle, so the prepared mask is white nearly everywhere, as the image is green.
    mask = np.zeros((50, 100), np.uint8)
    mask[:, 25:75] = 255
    out = pixels(prepare_mask(Image.fromarray(mask, "L"), (64, 64), blur=0, image_size=(200, 100), resize_mode="crop"))
    assert (out[:, 2:62] == 255).all()
    image = pixels(resize_image(three_stripes(), 64, 64, mode="crop"))
    assert (image[:, 2:62, 1] >= 250).all()

    out = pixels(prepare_mask(Image.fromarray(mask, "L"), (64, 64), blur=0, image_size=(200, 100), resize_mode="fill"))
    assert (out[:, 4:12] == 0).all() and (out[:, 20:44] == 255).all() and (out[:, 52:60] == 0).all()
    assert (out[:16] == out[16]).all() and (out[48:] == out[47]).all()  # bands: edge rows repeated


def test_mask_aspect_mismatch():
    with pytest.raises(InvalidRequestError) as info:
        prepare_mask(mask_left_white((512, 256)), (512, 512), image_size=(512, 512))
    assert str(info.value) == "mask is 512x256 but the image is 512x512: aspect ratios differ"
    with pytest.raises(InvalidRequestError, match=r"mask m\.png is 512x256"):
        prepare_mask(mask_left_white((512, 256)), (512, 512), image_size=(512, 512), name="m.png")
    # Within 1% or one pixel: accepted.
    assert prepare_mask(mask_left_white((256, 257)), (64, 64), image_size=(512, 512)).size == (64, 64)
    assert prepare_mask(mask_left_white((100, 67)), (64, 64), image_size=(1000, 667)).size == (64, 64)


def test_all_black_mask_is_refused_all_white_is_fine():
    black = Image.new("L", (64, 64), 0)
    with pytest.raises(InvalidRequestError) as info:
        prepare_mask(black, (64, 64))
    assert str(info.value) == "the mask is all black: nothing to inpaint (white marks the area to regenerate)"
    white = Image.new("L", (64, 64), 255)
    assert pixels(prepare_mask(white, (64, 64))).min() == 255
    with pytest.raises(InvalidRequestError, match="all white, so inverted it marks nothing"):
        prepare_mask(white, (64, 64), invert=True)
    assert pixels(prepare_mask(black, (64, 64), invert=True)).min() == 255


def test_invert():
    out = pixels(prepare_mask(mask_left_white(), (64, 64), invert=True, blur=0))
    assert (out[:, :32] == 0).all() and (out[:, 32:] == 255).all()


@pytest.mark.parametrize("blur", [1, 4, 8])
def test_blur_widens_the_transition_band(blur):
    sharp = pixels(prepare_mask(mask_left_white(), (64, 64), blur=0))
    assert set(np.unique(sharp)) == {0, 255}
    row = pixels(prepare_mask(mask_left_white(), (64, 64), blur=blur))[32]
    assert 0 < row[31] < 255 and 0 < row[32] < 255  # both sides of the edge are now soft
    assert (np.diff(row) <= 0).all()  # still a monotone ramp
    far = 3 * blur + 2
    assert (row[: 32 - far] == 255).all() and (row[32 + far :] == 0).all()  # far pixels unchanged
    if blur > 1:
        assert np.count_nonzero((row > 0) & (row < 255)) >= 2 * blur


@pytest.mark.parametrize("blur", [-1, 65, 2.5, True])
def test_blur_out_of_range(blur):
    with pytest.raises(InvalidRequestError, match="mask blur must be an integer from 0 to 64"):
        prepare_mask(mask_left_white(), (64, 64), blur=blur)


# ---------------------------------------------------------------------------------------------
# Bad files


@pytest.fixture
def bad_files(tmp_path):
    files = {}
    files["missing"] = (tmp_path / "missing.png", "no such file")
    (tmp_path / "folder.png").mkdir()
    files["folder"] = (tmp_path / "folder.png", "is a folder")
    (tmp_path / "empty.png").write_bytes(b"")
    files["zero-byte"] = (tmp_path / "empty.png", "empty (0 bytes)")
    (tmp_path / "notes.txt").write_text("a red fox in the snow\n")
    files["text"] = (tmp_path / "notes.txt", "is not an image in an accepted format (PNG, JPEG, WebP, BMP, TIFF, GIF")
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    files["truncated png"] = (tmp_path / "truncated.png", "truncated or corrupt")
    Image.fromarray(noise).save(tmp_path / "full.jpg")
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    files["truncated jpeg"] = (tmp_path / "truncated.jpg", "truncated or corrupt")
    files["bomb header"] = (png_header(tmp_path / "bomb.png", 100000, 100000), "too large")
    files["long side"] = (png_header(tmp_path / "long.png", 20000, 8), "this one is 20000x8")
    files["many pixels"] = (png_header(tmp_path / "many.png", 8193, 8193), "this one is 8193x8193")
    Image.new("RGB", (4, 4)).save(tmp_path / "tiny.png")
    files["tiny"] = (tmp_path / "tiny.png", "4x4 pixels, too small (at least 8x8)")
    return files


@pytest.mark.parametrize(
    "case",
    ["missing", "folder", "zero-byte", "text", "truncated png", "truncated jpeg", "bomb header",
     "long side", "many pixels", "tiny"],
)
@pytest.mark.parametrize("loader, label", [(load_image, "image"), (load_mask, "mask")])
def test_bad_files(bad_files, case, loader, label):
    path, words = bad_files[case]
    with pytest.raises(InvalidRequestError) as info:
        loader(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{label} {path}: ")
    assert words in message


def test_label_names_the_role(tmp_path):
    with pytest.raises(InvalidRequestError, match=r"^--init-img .*missing\.png: no such file$"):
        load_image(tmp_path / "missing.png", label="--init-img")


# ---------------------------------------------------------------------------------------------
# Tensors and strength


def test_image_to_tensor_matches_diffusers():
    from diffusers.image_processor import VaeImageProcessor

    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (48, 64, 3), dtype=np.uint8))
    ours = image_to_tensor(image)
    theirs = VaeImageProcessor().preprocess(image)
    assert ours.shape == (1, 3, 48, 64) and ours.dtype == torch.float32
    assert torch.equal(ours, theirs)
    assert ours.min() >= -1 and ours.max() <= 1
    with pytest.raises(InvalidRequestError, match="RGB"):
        image_to_tensor(image.convert("L"))


def test_mask_to_tensor():
    mask = Image.fromarray(np.array([[0, 51, 255]] * 8, np.uint8), "L")
    tensor = mask_to_tensor(mask)
    assert tensor.shape == (1, 1, 8, 3) and tensor.dtype == torch.float32
    assert torch.allclose(tensor[0, 0, 0], torch.tensor([0.0, 0.2, 1.0]))


def test_validate_strength():
    assert validate_strength(0) == 0.0 and validate_strength(1) == 1.0 and validate_strength(0.75) == 0.75
    assert validate_strength(np.float32(0.5)) == 0.5
    with pytest.raises(InvalidRequestError) as info:
        validate_strength(1.5)
    assert str(info.value) == "strength must be between 0 and 1, got 1.5"
    for bad in (-0.1, float("nan"), float("inf"), "0.5", None, True):
        with pytest.raises(InvalidRequestError, match="strength must be"):
            validate_strength(bad)
