"""Outputs: A1111 infotext text, atomic PNG/JPEG writing with metadata, naming, grids."""

from __future__ import annotations

import errno
import io
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from PIL import Image, TiffImagePlugin

from leansd.errors import InvalidRequestError, OutputError
from leansd.outputs import (
    ImageWriter,
    build_infotext,
    check_outdir,
    count_grids,
    count_images,
    grid_filename,
    image_filename,
    make_grid,
    parse_infotext,
    read_infotext,
    save_image,
)

BASE = dict(
    prompt="a red fox, snow",
    negative_prompt="blurry",
    steps=20,
    sampler="Euler a",
    cfg_scale=7.5,
    seed=123,
    width=512,
    height=512,
    model_hash="abcdef1234",
    model_name="name",
)


def noise_image(seed: int, size: tuple[int, int] = (24, 16), mode: str = "RGB") -> Image.Image:
    shape = (size[1], size[0], len(mode)) if len(mode) > 1 else (size[1], size[0])
    pixels = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    return Image.fromarray(pixels, mode)


def leftovers(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


# ---------------------------------------------------------------- infotext: exact text


def test_infotext_with_negative_prompt():
    assert build_infotext(**BASE) == (
        "a red fox, snow\n"
        "Negative prompt: blurry\n"
        "Steps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 123, Size: 512x512, "
        "Model hash: abcdef1234, Model: name"
    )


def test_infotext_without_negative_prompt_or_model():
    text = build_infotext(
        **{**BASE, "negative_prompt": "", "model_hash": None, "model_name": None, "width": 640}
    )
    assert text == "a red fox, snow\nSteps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 123, Size: 640x512"


@pytest.mark.parametrize(
    ("cfg_scale", "expected"),
    [(7, "7"), (7.0, "7"), (7.5, "7.5"), (0.75, "0.75"), (np.float64(12.0), "12"), (-0.0, "0")],
)
def test_infotext_number_format(cfg_scale, expected):
    text = build_infotext(**{**BASE, "cfg_scale": cfg_scale})
    assert f", CFG scale: {expected}, Seed: 123," in text


def test_infotext_extra_entries_in_order():
    text = build_infotext(
        **BASE,
        extra={"Denoising strength": 0.75, "Eta": 0.0, "Clip skip": None, "Version": "leansd 0.1.0"},
    )
    assert text.splitlines()[-1] == (
        "Steps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 123, Size: 512x512, "
        "Model hash: abcdef1234, Model: name, Denoising strength: 0.75, Eta: 0, Version: leansd 0.1.0"
    )


def test_infotext_quotes_values_like_a1111():
    text = build_infotext(
        **{**BASE, "model_name": "my, model", "sampler": 'say "hi"'},
        extra={"Lora hashes": "fox: 1234abcd", "Note": "two\nlines", "Empty": "", "Pad": " x"},
    )
    assert text.splitlines()[-1] == (
        'Steps: 20, Sampler: "say \\"hi\\"", CFG scale: 7.5, Seed: 123, Size: 512x512, '
        'Model hash: abcdef1234, Model: "my, model", Lora hashes: "fox: 1234abcd", '
        'Note: "two\\nlines", Empty: "", Pad: " x"'
    )
    parsed = parse_infotext(text)
    assert parsed["Sampler"] == 'say "hi"'
    assert parsed["Model"] == "my, model"
    assert parsed["Lora hashes"] == "fox: 1234abcd"
    assert parsed["Note"] == "two\nlines"
    assert parsed["Empty"] == ""
    assert parsed["Pad"] == " x"


def test_infotext_non_ascii_is_not_escaped():
    text = build_infotext(**{**BASE, "model_name": "café: ☕"})
    assert 'Model: "café: ☕"' in text


@pytest.mark.parametrize("key", ["Seed", "Prompt", "Negative prompt", "x", "bad:key", "bad,key", "trail "])
def test_infotext_rejects_bad_extra_keys(key):
    with pytest.raises(InvalidRequestError, match="infotext key"):
        build_infotext(**BASE, extra={key: 1})


# ---------------------------------------------------------------- infotext: parsing


def test_parse_a1111_text():
    text = (
        "girl with a beret, blue eyes\n"
        "Negative prompt: ugly, (((deformed)))\n"
        "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 965400086, Size: 512x768, Model hash: 45dee52b"
    )
    assert parse_infotext(text) == {
        "Prompt": "girl with a beret, blue eyes",
        "Negative prompt": "ugly, (((deformed)))",
        "Steps": "20",
        "Sampler": "Euler a",
        "CFG scale": "7",
        "Seed": "965400086",
        "Size": "512x768",
        "Model hash": "45dee52b",
    }


def test_parse_multiline_prompts_and_missing_negative():
    text = build_infotext(**{**BASE, "prompt": "line one\nline two\n\nline four", "negative_prompt": ""})
    parsed = parse_infotext(text)
    assert parsed["Prompt"] == "line one\nline two\n\nline four"
    assert parsed["Negative prompt"] == ""
    assert parsed["Steps"] == "20"

    text = build_infotext(**{**BASE, "prompt": "a\nb", "negative_prompt": "c\nd"})
    parsed = parse_infotext(text)
    assert (parsed["Prompt"], parsed["Negative prompt"]) == ("a\nb", "c\nd")


def test_parse_text_without_settings_line():
    assert parse_infotext("just a prompt, with: colon") == {
        "Prompt": "just a prompt, with: colon",
        "Negative prompt": "",
    }


def test_parse_empty_prompt_with_negative():
    parsed = parse_infotext(build_infotext(**{**BASE, "prompt": ""}))
    assert (parsed["Prompt"], parsed["Negative prompt"]) == ("", "blurry")


# Any character but lone surrogates (not encodable), with the format's special ones made common.
_text = st.text(st.characters(blacklist_categories=("Cs",)) | st.sampled_from('\n,:" '), max_size=40)
_prompt = _text.filter(
    lambda p: not any(line.startswith("Negative prompt:") for line in p.lstrip().split("\n"))
)
_finite = st.floats(allow_nan=False, allow_infinity=False)
_extra_keys = st.sampled_from(["Denoising strength", "Eta", "Clip skip", "Version", "Hires upscaler", "TI hashes"])


@settings(max_examples=200)
@given(
    prompt=_prompt,
    negative_prompt=_text,
    steps=st.integers(1, 1000),
    sampler=_text,
    cfg_scale=_finite,
    seed=st.integers(0, 2**64),
    width=st.integers(8, 4096),
    height=st.integers(8, 4096),
    model_hash=st.none() | _text,
    model_name=st.none() | _text,
    extra=st.dictionaries(_extra_keys, st.none() | _text | st.integers() | _finite, max_size=4),
)
def test_parse_inverts_build(prompt, negative_prompt, steps, sampler, cfg_scale, seed, width, height,
                             model_hash, model_name, extra):
    text = build_infotext(
        prompt=prompt, negative_prompt=negative_prompt, steps=steps, sampler=sampler,
        cfg_scale=cfg_scale, seed=seed, width=width, height=height,
        model_hash=model_hash, model_name=model_name, extra=extra,
    )
    parsed = parse_infotext(text)
    # A1111 strips the whole text, so leading whitespace of the prompt does not survive.
    assert parsed.pop("Prompt") == prompt.lstrip()
    assert parsed.pop("Negative prompt") == negative_prompt
    assert parsed.pop("Steps") == str(steps)
    assert parsed.pop("Sampler") == sampler
    assert float(parsed.pop("CFG scale")) == cfg_scale
    assert parsed.pop("Seed") == str(seed)
    assert parsed.pop("Size") == f"{width}x{height}"
    if model_hash is not None:
        assert parsed.pop("Model hash") == model_hash
    if model_name is not None:
        assert parsed.pop("Model") == model_name
    for key, value in extra.items():
        if value is None:
            continue
        got = parsed.pop(key)
        if isinstance(value, float):
            assert float(got) == value
        else:
            assert got == str(value)
    assert parsed == {}


# ---------------------------------------------------------------- names and counting


def test_filenames():
    assert image_filename(seed=1234, index=54, fmt="png") == "seed_1234_00054.png"
    assert image_filename(seed=7, index=123456, fmt="jpeg") == "seed_7_123456.jpg"
    assert grid_filename(3, "jpg") == "grid-0003.jpg"
    with pytest.raises(InvalidRequestError):
        image_filename(seed=1, index=-1, fmt="png")


@pytest.mark.parametrize("fmt", ["gif", "PNG", "webp", ""])
def test_invalid_format_names_valid_options(fmt, tmp_path):
    for call in (
        lambda: image_filename(seed=1, index=0, fmt=fmt),
        lambda: grid_filename(0, fmt),
        lambda: save_image(noise_image(0), tmp_path / "a.png", infotext=None, fmt=fmt),
        lambda: ImageWriter(tmp_path, fmt=fmt),
    ):
        with pytest.raises(InvalidRequestError, match="png, jpg, jpeg"):
            call()
    assert leftovers(tmp_path) == []


def test_count_images_and_grids(tmp_path):
    for name in ["seed_1_00000.png", "b.JPG", "c.jpeg", "d.webp", "grid-0000.png", "grid-0001.jpg",
                 "notes.txt", ".seed_1_00001.png.abc.tmp", ".hidden.png"]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "folder.png").mkdir()
    assert count_images(tmp_path) == 4
    assert count_grids(tmp_path) == 2
    assert count_images(tmp_path / "missing") == 0


# ---------------------------------------------------------------- writing and reading back


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L"])
def test_png_round_trip_pixels_and_infotext(tmp_path, mode):
    image = noise_image(1, mode=mode)
    text = build_infotext(**BASE)
    path = save_image(image, tmp_path / "a.png", infotext=text)
    assert path == tmp_path / "a.png"
    with Image.open(path) as back:
        assert back.mode == mode
        assert np.array_equal(np.asarray(back), np.asarray(image))
    assert read_infotext(path) == text
    assert b"tEXtparameters\x00" in path.read_bytes()
    assert leftovers(tmp_path) == ["a.png"]


def test_png_non_latin1_infotext_uses_itxt(tmp_path):
    text = build_infotext(**{**BASE, "prompt": "café ☕ 狐"})
    path = save_image(noise_image(2), tmp_path / "a.png", infotext=text)
    assert read_infotext(path) == text
    assert b"iTXtparameters\x00" in path.read_bytes()


def test_png_without_infotext(tmp_path):
    path = save_image(noise_image(3), tmp_path / "a.png", infotext=None)
    assert read_infotext(path) is None


def _user_comment_entry(path: Path) -> tuple[int, bytes, str]:
    """(TIFF type, raw value, byte order) of EXIF UserComment, read from the raw APP1 block."""
    with Image.open(path) as image:
        raw = image.info["exif"]
    assert raw.startswith(b"Exif\x00\x00")
    tiff = io.BytesIO(raw[6:])
    ifd0 = TiffImagePlugin.ImageFileDirectory_v2(tiff.read(8))
    tiff.seek(ifd0.next)
    ifd0.load(tiff)
    exif_ifd = TiffImagePlugin.ImageFileDirectory_v2(raw[6:14])
    tiff.seek(ifd0[0x8769])
    exif_ifd.load(tiff)
    return exif_ifd.tagtype[0x9286], exif_ifd[0x9286], raw[6:8].decode()


@pytest.mark.parametrize("fmt", ["jpg", "jpeg"])
def test_jpeg_infotext_round_trip_non_ascii(tmp_path, fmt):
    text = build_infotext(**{**BASE, "prompt": "café ☕\nsecond line", "negative_prompt": "狐, ugly"})
    path = save_image(noise_image(4), tmp_path / f"a.{fmt}", infotext=text, fmt=fmt, quality=90)
    assert read_infotext(path) == text
    # Encoded as piexif's UserComment.dump(text, encoding="unicode"), which A1111 reads back.
    tag_type, value, byte_order = _user_comment_entry(path)
    assert tag_type == 7  # UNDEFINED, as piexif writes it
    assert value == b"UNICODE\x00" + text.encode("utf-16-be")
    assert byte_order == "MM"
    with Image.open(path) as back:
        assert back.format == "JPEG" and back.size == (24, 16)


def test_jpeg_from_rgba_and_without_infotext(tmp_path):
    path = save_image(noise_image(5, mode="RGBA"), tmp_path / "a.jpg", infotext=None, fmt="jpg")
    with Image.open(path) as back:
        assert back.mode == "RGB"
    assert read_infotext(path) is None


def test_jpeg_infotext_too_long(tmp_path):
    with pytest.raises(OutputError, match="too long for JPEG EXIF.*save as png"):
        save_image(noise_image(5), tmp_path / "a.jpg", infotext="x" * 40000, fmt="jpg")
    assert leftovers(tmp_path) == []


def test_read_infotext_of_non_image_is_output_error(tmp_path):
    (tmp_path / "x.png").write_text("not an image")
    with pytest.raises(OutputError) as info:
        read_infotext(tmp_path / "x.png")
    assert "\n" not in str(info.value)


def test_save_refuses_to_overwrite(tmp_path):
    target = tmp_path / "a.png"
    target.write_bytes(b"keep me")
    with pytest.raises(OutputError, match="refusing to overwrite"):
        save_image(noise_image(6), target, infotext=None)
    assert target.read_bytes() == b"keep me"
    assert leftovers(tmp_path) == ["a.png"]


def test_save_rejects_mismatched_suffix_and_quality(tmp_path):
    with pytest.raises(InvalidRequestError, match=r"\.jpg or \.jpeg"):
        save_image(noise_image(7), tmp_path / "a.png", infotext=None, fmt="jpg")
    with pytest.raises(InvalidRequestError, match="quality"):
        save_image(noise_image(7), tmp_path / "a.jpg", infotext=None, fmt="jpg", quality=0)
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------------- atomic writes


@pytest.mark.parametrize("fmt", ["png", "jpg"])
def test_failure_mid_save_leaves_nothing(tmp_path, monkeypatch, fmt):
    image = noise_image(8)

    def half_save(fp, *args, **kwargs):
        fp.write(b"\x89PNG partial bytes")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(image, "save", half_save)
    with pytest.raises(OutputError) as info:
        save_image(image, tmp_path / f"a.{fmt}", infotext="x", fmt=fmt)
    assert str(info.value) == f"cannot write {tmp_path / f'a.{fmt}'}: No space left on device"
    assert leftovers(tmp_path) == []


def test_failing_replace_leaves_nothing(tmp_path, monkeypatch):
    # A filesystem without hard links takes the os.replace path; make that fail too.
    def no_link(src, dst):
        raise PermissionError(errno.EPERM, "Operation not permitted")

    def failing_replace(src, dst):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "link", no_link)
    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OutputError, match="Input/output error"):
        save_image(noise_image(9), tmp_path / "a.png", infotext="x")
    assert leftovers(tmp_path) == []


def test_replace_path_without_hard_links(tmp_path, monkeypatch):
    def no_link(src, dst):
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(os, "link", no_link)
    image = noise_image(10)
    path = save_image(image, tmp_path / "a.png", infotext="hello")
    assert read_infotext(path) == "hello"
    assert leftovers(tmp_path) == ["a.png"]
    with pytest.raises(OutputError, match="refusing to overwrite"):
        save_image(image, path, infotext=None)


def test_race_for_the_name_never_overwrites(tmp_path, monkeypatch):
    real_link = os.link

    def racing_link(src, dst):
        Path(dst).write_bytes(b"the other writer")  # another process takes the name first
        return real_link(src, dst)

    monkeypatch.setattr(os, "link", racing_link)
    with pytest.raises(OutputError, match="refusing to overwrite"):
        save_image(noise_image(11), tmp_path / "a.png", infotext=None)
    assert (tmp_path / "a.png").read_bytes() == b"the other writer"
    assert leftovers(tmp_path) == ["a.png"]


# ---------------------------------------------------------------- output folder


def test_check_outdir_creates_parents(tmp_path):
    outdir = tmp_path / "a" / "b" / "c"
    assert check_outdir(outdir) == outdir
    assert outdir.is_dir()
    assert leftovers(outdir) == []


def test_outdir_that_is_a_file_or_under_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    for outdir in (tmp_path / "file", tmp_path / "file" / "sub"):
        with pytest.raises(OutputError) as info:
            check_outdir(outdir)
        assert "\n" not in str(info.value)
        assert str(outdir) in str(info.value)
        with pytest.raises(OutputError):
            ImageWriter(outdir)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores permissions")
def test_read_only_outdir(tmp_path):
    outdir = tmp_path / "ro"
    outdir.mkdir()
    outdir.chmod(0o500)
    try:
        with pytest.raises(OutputError, match="not writable") as info:
            check_outdir(outdir)
        assert "\n" not in str(info.value)
        with pytest.raises(OutputError):
            save_image(noise_image(12), outdir / "a.png", infotext=None)
    finally:
        outdir.chmod(0o700)


def test_unwritable_outdir_reported(tmp_path, monkeypatch):
    # Works as root too: the folder refuses new files, whatever the reason.
    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(OutputError) as info:
        check_outdir(tmp_path)
    assert str(info.value) == f"output folder {tmp_path} is not writable: Permission denied"
    with pytest.raises(OutputError, match="Permission denied"):
        save_image(noise_image(13), tmp_path / "a.png", infotext=None)
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------------- ImageWriter numbering


def test_numbering_across_two_writers(tmp_path):
    first = ImageWriter(tmp_path)
    second = ImageWriter(tmp_path, fmt="jpg")
    names = [
        first.save(noise_image(0), seed=11, infotext="a").name,
        second.save(noise_image(1), seed=22, infotext="b").name,
        first.save_grid(noise_image(2), infotext="grid").name,
        first.save(noise_image(3), seed=11, infotext=None).name,
        second.save_grid(noise_image(4), infotext=None).name,
        second.save(noise_image(5), seed=33, infotext="c").name,
    ]
    assert names == [
        "seed_11_00000.png",
        "seed_22_00001.jpg",
        "grid-0000.png",
        "seed_11_00002.png",
        "grid-0001.jpg",
        "seed_33_00003.jpg",
    ]
    assert read_infotext(tmp_path / "seed_22_00001.jpg") == "b"
    assert read_infotext(tmp_path / "grid-0000.png") == "grid"
    assert count_images(tmp_path) == 4 and count_grids(tmp_path) == 2


def test_writer_numbers_after_existing_files_and_skips_taken_names(tmp_path):
    (tmp_path / "old.png").write_bytes(b"x")
    (tmp_path / "seed_5_00002.png").write_bytes(b"taken")  # e.g. an earlier image was deleted
    writer = ImageWriter(tmp_path)
    assert writer.save(noise_image(0), seed=5, infotext=None).name == "seed_5_00003.png"
    assert writer.save(noise_image(0), seed=6, infotext=None).name == "seed_6_00003.png"
    assert (tmp_path / "seed_5_00002.png").read_bytes() == b"taken"


def test_writer_creates_outdir(tmp_path):
    writer = ImageWriter(tmp_path / "new" / "dir")
    path = writer.save(noise_image(0), seed=1, infotext="x")
    assert path == tmp_path / "new" / "dir" / "seed_1_00000.png"


# ---------------------------------------------------------------- grids


def _tiles(n: int, size: tuple[int, int] = (4, 3)) -> list[Image.Image]:
    return [noise_image(100 + i, size=size) for i in range(n)]


@pytest.mark.parametrize(
    ("n", "n_rows", "rows", "cols"),
    [(1, None, 1, 1), (4, None, 2, 2), (5, None, 2, 3), (10, None, 3, 4), (5, 1, 1, 5), (5, 2, 2, 3), (6, 3, 3, 2)],
)
def test_grid_layout_and_pixels(n, n_rows, rows, cols):
    tiles = _tiles(n)
    grid = make_grid(tiles, n_rows=n_rows)
    assert grid.size == (cols * 4, rows * 3)
    pixels = np.asarray(grid)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, cols)
        assert np.array_equal(pixels[r * 3:(r + 1) * 3, c * 4:(c + 1) * 4], np.asarray(tile))
    for i in range(n, rows * cols):  # unused cells stay black
        r, c = divmod(i, cols)
        assert not pixels[r * 3:(r + 1) * 3, c * 4:(c + 1) * 4].any()


def test_grid_bad_inputs():
    with pytest.raises(InvalidRequestError, match="no images"):
        make_grid([])
    with pytest.raises(InvalidRequestError, match="image 1 is 5x3"):
        make_grid([noise_image(0, size=(4, 3)), noise_image(1, size=(5, 3))])
    with pytest.raises(InvalidRequestError, match="RGBA"):
        make_grid([noise_image(0), noise_image(1, mode="RGBA")])
    for n_rows in (0, 3):
        with pytest.raises(InvalidRequestError, match="between 1 and"):
            make_grid(_tiles(2), n_rows=n_rows)
