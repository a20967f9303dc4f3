"""Image files: atomic PNG/JPEG writing with A1111 metadata, optimizedSD naming, grids.

Names follow the optimizedSD scripts: images are `seed_<seed>_<NNNNN>.<ext>`, grids are
`grid-<NNNN>.<ext>`, each numbered by how many of its kind the folder already holds.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import struct
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from PIL import ExifTags, Image, PngImagePlugin

from leansd.errors import InvalidRequestError, OutputError, one_line

__all__ = [
    "ImageWriter",
    "check_outdir",
    "preflight_outdir",
    "count_grids",
    "count_images",
    "grid_filename",
    "image_filename",
    "make_grid",
    "read_infotext",
    "save_image",
]

FORMATS = ("png", "jpg", "jpeg")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
GRID_PREFIX = "grid-"
INFOTEXT_KEY = "parameters"  # the PNG text chunk A1111 writes and reads

_USER_COMMENT = 0x9286  # EXIF UserComment, in the Exif sub-IFD (0x8769)
# EXIF 2.3 table 9: an 8-byte character-code prefix starts every UserComment.
_UNICODE_PREFIX = b"UNICODE\x00"
_ASCII_PREFIX = b"ASCII\x00\x00\x00"
_JIS_PREFIX = b"JIS\x00\x00\x00\x00\x00"
_UNDEFINED_PREFIX = b"\x00" * 8
_MAX_JPEG_MARKER = 65533  # a JPEG APP1 segment holds at most this many bytes of EXIF
# Hard links that the folder's filesystem cannot make: fall back to exists-check + replace.
_NO_LINK_ERRNOS = {
    errno.EPERM, errno.EACCES, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK
}


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _normalize_fmt(fmt: str) -> str:
    if fmt not in FORMATS:
        raise InvalidRequestError(f"unknown image format {fmt!r}; valid formats: png, jpg, jpeg")
    return "jpg" if fmt == "jpeg" else fmt


def check_outdir(outdir: Path) -> Path:
    """Create the output folder (parents too) and prove it is writable; OutputError if not."""
    outdir = Path(outdir)
    if outdir.exists() and not outdir.is_dir():
        raise OutputError(f"output folder {outdir} exists and is not a folder")
    try:
        outdir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(one_line(f"cannot create output folder {outdir}: {_reason(exc)}")) from exc
    try:
        fd, probe = tempfile.mkstemp(prefix=".leansd-probe-", suffix=".tmp", dir=outdir)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(one_line(f"output folder {outdir} is not writable: {_reason(exc)}")) from exc
    return outdir


def preflight_outdir(outdir: Path) -> Path:
    """Check, leaving nothing behind, that `outdir` is a writable folder or can be created as one.

    A file is really created (and removed) in the folder, or in its nearest existing parent, so
    permissions are proven rather than guessed (`os.access` says yes to root on a read-only mount).
    """
    outdir = Path(outdir)
    if outdir.exists() and not outdir.is_dir():
        raise OutputError(f"output folder {outdir} exists and is not a folder")
    existing = outdir
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"cannot create output folder {outdir}: {existing} is not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".leansd-probe-", suffix=".tmp", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        what = "write to" if existing == outdir else "create"
        raise OutputError(
            one_line(f"cannot {what} output folder {outdir}: {existing} is not writable ({_reason(exc)})")
        ) from exc
    return outdir


def _image_names(outdir: Path) -> list[str]:
    try:
        with os.scandir(outdir) as entries:
            return [
                e.name
                for e in entries
                if not e.name.startswith(".")
                and os.path.splitext(e.name)[1].lower() in IMAGE_SUFFIXES
                and e.is_file()
            ]
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise OutputError(one_line(f"cannot list output folder {outdir}: {_reason(exc)}")) from exc


def count_images(outdir: Path) -> int:
    """Image files (png/jpg/jpeg/webp) in the folder, grids and hidden temp files excluded."""
    return sum(1 for name in _image_names(Path(outdir)) if not name.startswith(GRID_PREFIX))


def count_grids(outdir: Path) -> int:
    """Grid image files (`grid-*`) in the folder."""
    return sum(1 for name in _image_names(Path(outdir)) if name.startswith(GRID_PREFIX))


def image_filename(*, seed: int, index: int, fmt: str) -> str:
    """`seed_<seed>_<index:05d>.<ext>`, the optimizedSD name."""
    if index < 0:
        raise InvalidRequestError(f"image index must be >= 0, got {index}")
    return f"seed_{seed}_{index:05d}.{_normalize_fmt(fmt)}"


def grid_filename(index: int, fmt: str) -> str:
    """`grid-<index:04d>.<ext>`, the CompVis name."""
    if index < 0:
        raise InvalidRequestError(f"grid index must be >= 0, got {index}")
    return f"{GRID_PREFIX}{index:04d}.{_normalize_fmt(fmt)}"


def _user_comment_exif(text: str) -> bytes:
    """An APP1 EXIF block holding only UserComment, as piexif writes it for A1111.

    Pillow's Exif would type a bytes UserComment as BYTE; A1111 (piexif) then reads a tuple
    and fails, so the two IFDs are laid out here by hand with the UNDEFINED type piexif expects.
    """
    comment = _UNICODE_PREFIX + text.encode("utf-16-be")  # piexif UserComment.dump(..., "unicode")
    header = b"MM\x00\x2a" + struct.pack(">I", 8)  # big-endian TIFF, IFD0 at offset 8
    ifd_size = 2 + 12 + 4  # entry count, one 12-byte entry, next-IFD offset (0: none)
    exif_ifd_offset = 8 + ifd_size
    comment_offset = exif_ifd_offset + ifd_size
    # IFD: entry count, then (tag, type, count, value or offset); type 4 = LONG, 7 = UNDEFINED.
    ifd0 = struct.pack(">HHHII", 1, ExifTags.IFD.Exif, 4, 1, exif_ifd_offset) + bytes(4)
    exif_ifd = struct.pack(">HHHII", 1, _USER_COMMENT, 7, len(comment), comment_offset) + bytes(4)
    return b"Exif\x00\x00" + header + ifd0 + exif_ifd + comment


def _decode_user_comment(data: bytes, *, little_endian: bool) -> str:
    prefix, body = data[:8], data[8:]
    if prefix == _UNICODE_PREFIX:
        # piexif and A1111 write UTF-16 big-endian; other tools follow the EXIF byte order.
        return body.decode("utf-16-le" if little_endian else "utf-16-be", errors="replace")
    if prefix == _ASCII_PREFIX:
        return body.decode("ascii", errors="replace")
    if prefix == _JIS_PREFIX:
        return body.decode("shift_jis", errors="replace")
    if prefix == _UNDEFINED_PREFIX:
        return body.decode("utf-8", errors="replace")
    return data.decode("utf-8", errors="replace")


def write_png(image: Image.Image, f: BinaryIO, *, infotext: str | None) -> None:
    """PNG with A1111's `parameters` text chunk (when `infotext` is given)."""
    pnginfo = None
    if infotext is not None:
        pnginfo = PngImagePlugin.PngInfo()
        pnginfo.add_text(INFOTEXT_KEY, infotext)  # tEXt if latin-1, else iTXt (UTF-8)
    image.save(f, format="PNG", pnginfo=pnginfo)


def _encode(image: Image.Image, f: BinaryIO, *, fmt: str, infotext: str | None, quality: int) -> None:
    if fmt == "png":
        write_png(image, f, infotext=infotext)
        return
    if image.mode not in ("RGB", "L"):
        image = image.convert("RGB")  # JPEG has no alpha or palette
    exif = _user_comment_exif(infotext) if infotext is not None else b""
    if len(exif) > _MAX_JPEG_MARKER:
        raise ValueError(
            f"infotext is too long for JPEG EXIF ({len(exif)} bytes, at most {_MAX_JPEG_MARKER}); "
            "save as png"
        )
    image.save(f, format="JPEG", quality=quality, exif=exif)


def _place(tmp: Path, path: Path) -> None:
    """Move the finished temp file to `path`; FileExistsError if `path` exists."""
    try:
        # A hard link fails if the name is taken, so a racing writer can never be overwritten.
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno not in _NO_LINK_ERRNOS:
            raise
        if path.exists():
            raise FileExistsError(errno.EEXIST, "file exists", str(path)) from None
        os.replace(tmp, path)
        return
    tmp.unlink()


_DEFERRED: dict[str, Any] = {"depth": 0, "pending": None}
"""`signals_deferred` nesting and the exception a deferrable signal handler postponed."""


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Inside, a handler made by `deferrable` records its exception instead of raising it; the exception is
    raised when the outermost block ends. Python runs a signal handler between any two bytecodes, so
    without this a signal could land after a temp file is created and before anyone knows its name."""
    _DEFERRED["depth"] += 1
    try:
        yield
    finally:
        _DEFERRED["depth"] -= 1
        pending = _DEFERRED["pending"]
        if _DEFERRED["depth"] == 0 and pending is not None:
            _DEFERRED["pending"] = None
            raise pending()


def deferrable(exception: "type[BaseException]") -> "Callable[[int, object], None]":
    """A signal handler that raises `exception`, or, inside `signals_deferred`, raises it when the block ends."""

    def handler(signum: int, frame: object) -> None:
        if _DEFERRED["depth"] > 0:
            _DEFERRED["pending"] = exception
            return
        raise exception()

    return handler


def _write_atomic(image: Image.Image, path: Path, *, infotext: str | None, fmt: str, quality: int) -> Path:
    """save_image without the wrapping of FileExistsError, so ImageWriter can take the next number. A
    termination signal (see `deferrable`) waits until the file is published or its temp file removed."""
    with signals_deferred():
        return _write_atomic_now(image, path, infotext=infotext, fmt=fmt, quality=quality)


def _write_atomic_now(image: Image.Image, path: Path, *, infotext: str | None, fmt: str, quality: int) -> Path:
    if path.exists():
        raise FileExistsError(errno.EEXIST, "file exists", str(path))
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise OutputError(one_line(f"cannot write {path}: {_reason(exc)}")) from exc
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            _encode(image, f, fmt=fmt, infotext=infotext, quality=quality)
            f.flush()
            os.fsync(f.fileno())
        _place(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, FileExistsError) or not isinstance(exc, Exception):
            raise
        raise OutputError(one_line(f"cannot write {path}: {_reason(exc)}")) from exc
    return path


def _check_save_args(path: Path, fmt: str, quality: int) -> str:
    fmt = _normalize_fmt(fmt)
    suffixes = (".png",) if fmt == "png" else (".jpg", ".jpeg")
    if path.suffix.lower() not in suffixes:
        raise InvalidRequestError(
            f"file name {path.name!r} does not match format {fmt!r}; use a name ending in {' or '.join(suffixes)}"
        )
    if not 1 <= quality <= 100:
        raise InvalidRequestError(f"JPEG quality must be between 1 and 100, got {quality}")
    return fmt


def save_image(
    image: Image.Image,
    path: Path,
    *,
    infotext: str | None,
    fmt: str = "png",
    quality: int = 95,
) -> Path:
    """Write `image` atomically (hidden temp file in the same folder, then a rename).

    The infotext goes in the PNG `parameters` text chunk, or the JPEG EXIF UserComment, where
    A1111 reads it. An existing `path` is never overwritten: OutputError. Any failure leaves
    neither the temp file nor `path` behind and raises OutputError.
    """
    path = Path(path)
    fmt = _check_save_args(path, fmt, quality)
    try:
        return _write_atomic(image, path, infotext=infotext, fmt=fmt, quality=quality)
    except FileExistsError as exc:
        raise OutputError(f"refusing to overwrite existing file {path}") from exc


def read_infotext(path: Path) -> str | None:
    """The A1111 parameters text of an image file (PNG text chunk or EXIF UserComment), or None."""
    try:
        with Image.open(path) as image:
            text = image.info.get(INFOTEXT_KEY)
            if isinstance(text, str):
                return text
            exif = image.getexif()
            comment = exif.get_ifd(ExifTags.IFD.Exif).get(_USER_COMMENT)
    except (OSError, ValueError) as exc:
        raise OutputError(one_line(f"cannot read {path}: {_reason(exc)}")) from exc
    if isinstance(comment, bytes) and comment:
        return _decode_user_comment(comment, little_endian=exif.endian == "<")
    return None


def make_grid(images: Sequence[Image.Image], *, n_rows: int | None = None) -> Image.Image:
    """Tile equal-size images row-major; ceil(sqrt(n)) columns unless `n_rows` is given."""
    n = len(images)
    if n == 0:
        raise InvalidRequestError("cannot make a grid of no images")
    size, mode = images[0].size, images[0].mode
    for i, image in enumerate(images):
        if image.size != size or image.mode != mode:
            raise InvalidRequestError(
                f"grid images must share size and mode: image 0 is {size[0]}x{size[1]} {mode}, "
                f"image {i} is {image.size[0]}x{image.size[1]} {image.mode}"
            )
    if n_rows is None:
        n_cols = math.ceil(math.sqrt(n))
        n_rows = math.ceil(n / n_cols)
    elif not 1 <= n_rows <= n:
        raise InvalidRequestError(f"n_rows must be between 1 and the number of images ({n}), got {n_rows}")
    else:
        n_cols = math.ceil(n / n_rows)
    width, height = size
    grid = Image.new(mode, (n_cols * width, n_rows * height))
    for i, image in enumerate(images):
        row, col = divmod(i, n_cols)
        grid.paste(image, (col * width, row * height))
    return grid


class ImageWriter:
    """Saves a run's images and grids into one folder with optimizedSD numbering.

    Numbers are recounted from the folder at every save (no cached counter), so several
    writers, or several runs, can share a folder; a name taken meanwhile moves to the next
    number instead of overwriting.
    """

    def __init__(self, outdir: Path, *, fmt: str = "png", quality: int = 95) -> None:
        self.fmt = _normalize_fmt(fmt)
        if not 1 <= quality <= 100:
            raise InvalidRequestError(f"JPEG quality must be between 1 and 100, got {quality}")
        self.quality = quality
        # Nothing is created until the first image is saved: a failed run leaves no empty folder.
        self.outdir = preflight_outdir(Path(outdir))
        self._ready = False

    def _save_numbered(
        self, image: Image.Image, start: int, name_for: Callable[[int], str], infotext: str | None
    ) -> Path:
        index = start
        while True:
            path = self.outdir / name_for(index)
            try:
                return _write_atomic(image, path, infotext=infotext, fmt=self.fmt, quality=self.quality)
            except FileExistsError:
                index += 1

    def _ensure_outdir(self) -> None:
        if not self._ready:
            check_outdir(self.outdir)
            self._ready = True

    def save(self, image: Image.Image, *, seed: int, infotext: str | None) -> Path:
        """Save as `seed_<seed>_<NNNNN>`, NNNNN = images already in the folder.

        optimizedSD's README says the 55th image is `..._00055`, but its code numbers with
        `len(os.listdir(...))` before writing, so the 55th image is `..._00054`; we follow the code.
        """
        self._ensure_outdir()
        start = count_images(self.outdir)
        return self._save_numbered(
            image, start, lambda i: image_filename(seed=seed, index=i, fmt=self.fmt), infotext
        )

    def save_all(self, images: Sequence[Image.Image], *, seeds: Sequence[int],
                 infotexts: Sequence[str | None]) -> list[Path]:
        """`save` for each image of a result, in order: image k with seeds[k] and infotexts[k]."""
        return [self.save(image, seed=seed, infotext=info) for image, seed, info in zip(images, seeds, infotexts, strict=True)]

    def save_grid(self, image: Image.Image, *, infotext: str | None) -> Path:
        """Save as `grid-<NNNN>`, NNNN = grids already in the folder."""
        self._ensure_outdir()
        start = count_grids(self.outdir)
        return self._save_numbered(image, start, lambda i: grid_filename(i, self.fmt), infotext)
