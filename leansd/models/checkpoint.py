"""Single-file checkpoints: read a .safetensors or .ckpt into a state dict, safely and without copies.

Memory: every path below returns tensors backed by a copy-on-write file mapping, not by
anonymous memory. Measured (torch 2.13, safetensors 0.8, 384 MB file): after reading every
byte of every tensor and `load_state_dict(..., assign=True)` into a meta-device module, the
process's RssAnon did not grow at all; the pages count as RssFile (page cache, which the
kernel can drop and re-read). This holds for `safe_open(..., framework="pt")` (and for
`safetensors.torch.load_file`, which is the same loop) and for `torch.load(..., mmap=True)`
on zip-format .ckpt files. Only legacy (pre-1.6, non-zip) .ckpt files are read into memory.
A later dtype cast or `.to(device)` copies, as it must; nothing here does one.

Safety: a .ckpt is a pickle. It is read only with `torch.load(weights_only=True)`, widened by
a short allowlist (`CKPT_SAFE_GLOBALS`) for the benign extras the original SD 1.x files carry;
anything else is refused with `UnsafeCheckpointError`, never retried with a full unpickle.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from leansd.errors import ModelLoadError, UnsafeCheckpointError, one_line

if TYPE_CHECKING:
    from collections.abc import Mapping

    import torch

logger = logging.getLogger(__name__)

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
SUPPORTED_SUFFIXES = SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES

LFS_POINTER_PREFIX = b"version https://git-lfs.github.com/spec/v1"
_ZIP_MAGIC = b"PK\x03\x04"
_HASH_CHUNK = 1 << 20  # 1 MiB
_HASH_CACHE_FILE = "model_hashes.json"

# Classes the original SD 1.x .ckpt files reference only as dict keys (Lightning's
# `callbacks` dict); a stand-in with the same pickled name lets them load without
# importing (or even having) pytorch_lightning.
LIGHTNING_MODEL_CHECKPOINT_NAMES = (
    "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
    "lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint",
)

# torch's allowlist is process-wide state that `safe_globals` adds to and removes from;
# serialise .ckpt reads so one thread's exit cannot narrow another's load midway.
_CKPT_LOAD_LOCK = threading.Lock()


class LightningModelCheckpointStandIn:
    """Placeholder for `pytorch_lightning...ModelCheckpoint` when a .ckpt names that class.

    The original files use the class object only as a key of their `callbacks` dict; it is
    dropped with every other non-tensor value.
    """


def ckpt_safe_globals() -> list[tuple[Any, str]]:
    """The allowlist added to torch's `weights_only` unpickler for .ckpt files, as (object, pickled name)."""
    allow: list[tuple[Any, str]] = [
        (LightningModelCheckpointStandIn, name) for name in LIGHTNING_MODEL_CHECKPOINT_NAMES
    ]
    try:
        import numpy as np
    except ImportError:  # numpy is a dependency; without it, files needing it are refused
        return allow
    try:
        from numpy._core import multiarray  # numpy >= 2
    except ImportError:
        from numpy.core import multiarray  # type: ignore[no-redef]  # numpy 1.x
    # numpy scalars pickle as scalar(dtype, raw bytes); numpy 1.x wrote the `numpy.core` name.
    allow += [
        (multiarray.scalar, "numpy.core.multiarray.scalar"),
        (multiarray.scalar, "numpy._core.multiarray.scalar"),
        (np.dtype, "numpy.dtype"),
    ]
    # A dtype is rebuilt as dtype(code) then BUILD(state) on the concrete class
    # (Float64DType, Int64DType, ...), which must be allowlisted for that BUILD.
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        for name in sorted(dir(dtypes)):
            cls = getattr(dtypes, name)
            if isinstance(cls, type) and issubclass(cls, np.dtype) and cls is not np.dtype:
                allow.append((cls, f"numpy.dtypes.{name}"))
    return allow


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, "torch.Tensor"]:
    """Read a single-file checkpoint into {key: tensor} on the CPU, memory-mapped where the format allows.

    `.safetensors` is read with `safe_open`; `.ckpt/.pt/.pth/.bin` with
    `torch.load(weights_only=True, mmap=True)` plus `ckpt_safe_globals()`. A top-level
    `{"state_dict": {...}}` is unwrapped and non-tensor values (step counters, callbacks) are
    dropped. Raises `ModelLoadError` (one line, naming the file) for anything unreadable and
    `UnsafeCheckpointError` for a pickle that would need a full, code-executing unpickle.
    """
    p = Path(path)
    suffix = _check_file(p)
    if suffix in SAFETENSORS_SUFFIXES:
        state = _read_safetensors(p)
    else:
        state = _read_pickle(p, suffix)
    if not state:
        raise ModelLoadError(f"{p}: contains no tensors; it is not a model checkpoint")
    logger.debug("read %d tensors from %s", len(state), p)
    return state


def state_dict_summary(state_dict: Mapping[str, "torch.Tensor"]) -> dict[str, tuple[int, ...]]:
    """Key -> shape, the view family detection works on."""
    return {key: tuple(int(d) for d in tensor.shape) for key, tensor in state_dict.items()}


def user_cache_dir() -> Path:
    """leansd's cache folder: $LEANSD_CACHE_DIR, else $XDG_CACHE_HOME/leansd, else ~/.cache/leansd."""
    explicit = os.environ.get("LEANSD_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "leansd"


def model_hash(path: str | os.PathLike[str], *, cache_dir: str | os.PathLike[str] | None = None) -> str:
    """First 10 hex digits of the file's sha256 (AUTOMATIC1111's "Model hash").

    Results are cached in `<cache_dir>/model_hashes.json` (default `user_cache_dir()`), keyed by
    absolute path, size and mtime, so a multi-GB file is hashed once until it changes.
    """
    p = Path(path)
    if not p.is_file():
        raise ModelLoadError(f"{p}: {'is a directory, not a checkpoint file' if p.is_dir() else 'no such file'}")
    st = p.stat()
    key = str(p.resolve())
    cache_file = Path(cache_dir if cache_dir is not None else user_cache_dir()) / _HASH_CACHE_FILE
    cache = _read_hash_cache(cache_file)
    entry = cache.get(key)
    if (
        isinstance(entry, dict)
        and entry.get("size") == st.st_size
        and entry.get("mtime_ns") == st.st_mtime_ns
        and isinstance(entry.get("sha256"), str)
    ):
        return entry["sha256"][:10]
    try:
        digest = _sha256_file(p)
    except OSError as exc:
        raise ModelLoadError(f"{p}: cannot be read ({exc.strerror or exc})") from exc
    cache[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
    _write_hash_cache(cache_file, cache)
    return digest[:10]


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _read_hash_cache(cache_file: Path) -> dict[str, Any]:
    try:
        data = json.loads(cache_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        logger.debug("ignoring unreadable hash cache %s: %s", cache_file, exc)
        return {}
    return data if isinstance(data, dict) else {}


def _write_hash_cache(cache_file: Path, cache: dict[str, Any]) -> None:
    """Write atomically (temp file + os.replace); a cache that cannot be written is only logged."""
    tmp_name = None
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(
            "w", encoding="utf-8", dir=cache_file.parent, prefix=".model_hashes.", suffix=".tmp", delete=False
        ) as tmp:
            tmp_name = tmp.name
            json.dump(cache, tmp, indent=1, sort_keys=True)
        os.replace(tmp_name, cache_file)
    except OSError as exc:
        logger.warning("could not write the model hash cache %s: %s", cache_file, exc)
        if tmp_name is not None:
            try:
                os.unlink(tmp_name)
            except OSError:
                pass


def _check_file(path: Path) -> str:
    """Common checks before any parsing; returns the lower-case suffix."""
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file")
    if path.is_dir():
        raise ModelLoadError(f"{path}: is a directory, not a checkpoint file")
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        shown = f"'{suffix}'" if suffix else "no extension"
        raise ModelLoadError(
            f"{path}: unknown checkpoint type ({shown}); supported: {', '.join(SUPPORTED_SUFFIXES)}"
        )
    try:
        with open(path, "rb") as f:
            head = f.read(len(LFS_POINTER_PREFIX))
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot be read ({exc.strerror or exc})") from exc
    if not head:
        raise ModelLoadError(f"{path}: is empty (0 bytes); the download or copy probably failed")
    if head.startswith(LFS_POINTER_PREFIX):
        raise ModelLoadError(
            f"{path}: is a git-LFS pointer, not the weights; run `git lfs pull` or download the real file"
        )
    return suffix


def _one_line(exc: BaseException, limit: int = 160) -> str:
    """The first sentence of an exception's message: for embedding in our one-line errors."""
    text = str(exc).strip() or type(exc).__name__
    return one_line(text.splitlines()[0].split(". ")[0], limit=limit)


def _read_safetensors(path: Path) -> dict[str, "torch.Tensor"]:
    from safetensors import SafetensorError, safe_open

    size = path.stat().st_size
    with open(path, "rb") as f:
        header = f.read(8)
    header_len = int.from_bytes(header, "little") if len(header) == 8 else -1
    if header_len < 2 or 8 + header_len > size:
        raise ModelLoadError(f"{path}: is truncated or not a safetensors file (bad header)")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"{path}: is truncated or corrupt ({_one_line(exc)})") from exc


def _read_pickle(path: Path, suffix: str) -> dict[str, "torch.Tensor"]:
    return _tensors_only(path, load_weights_only(path, suffix=suffix))


def load_weights_only(path: str | os.PathLike[str], *, suffix: str | None = None) -> object:
    """``torch.load(weights_only=True)`` of a pickle-based file, returning the object as stored.

    For files whose tensors sit in nested dicts (textual-inversion ``.pt``: ``string_to_param``).
    Same checks and errors as :func:`read_state_dict`.
    """
    import pickle
    import zipfile

    import torch

    path = Path(path)
    if suffix is None:
        suffix = _check_file(path)

    with open(path, "rb") as f:
        head = f.read(32)
    is_zip = head.startswith(_ZIP_MAGIC)
    if not is_zip:
        # A legacy (pre-zip) torch file starts with its pickled magic number; anything else is
        # not a torch checkpoint, and weights_only would misreport it as unsafe.
        legacy_head = pickle.dumps(torch.serialization.MAGIC_NUMBER, protocol=2)[:-1]
        if not head.startswith(legacy_head):
            raise ModelLoadError(
                f"{path}: is not a PyTorch checkpoint (neither a zip archive nor a legacy torch pickle);"
                " it is corrupt or of another format"
            )
        logger.debug("%s is a legacy (non-zip) torch file: read into memory, not mmapped", path)
    try:
        # torch's stub wants a list of its union type (lists are invariant); ours holds only tuples.
        with _CKPT_LOAD_LOCK, torch.serialization.safe_globals(ckpt_safe_globals()):  # type: ignore[arg-type]
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as exc:
        refs = _unsafe_references(path, exc, is_zip=is_zip)
        raise UnsafeCheckpointError(
            f"{path}: this {suffix} file needs a full unpickle ({refs}), which can run arbitrary code;"
            " leansd refuses it. Convert it to .safetensors with a tool you trust."
        ) from None
    except EOFError as exc:
        raise ModelLoadError(f"{path}: is truncated (unexpected end of file)") from exc
    except (RuntimeError, ValueError, KeyError, IndexError, OSError, zipfile.BadZipFile) as exc:
        raise ModelLoadError(f"{path}: is truncated or corrupt ({_one_line(exc)})") from exc
    except Exception as exc:  # noqa: BLE001 - a hostile pickle can make the safe unpickler raise anything
        # (a stand-in class called with arguments: TypeError; deep nesting: RecursionError; ...)
        raise UnsafeCheckpointError(
            f"{path}: this {suffix} file cannot be read as plain weights ({type(exc).__name__}: {_one_line(exc)});"
            " leansd refuses it. Convert it to .safetensors with a tool you trust."
        ) from None
    return obj


def _tensors_only(path: Path, obj: object) -> dict[str, "torch.Tensor"]:
    import torch

    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ModelLoadError(f"{path}: holds a {type(obj).__name__}, not a state dict of tensors")
    state = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    dropped = len(obj) - len(state)
    if dropped:
        logger.debug("%s: dropped %d non-tensor entries", path, dropped)
    return state


def _unsafe_references(path: Path, exc: BaseException, *, is_zip: bool) -> str:
    """Say what the pickle wanted, e.g. "it references os.system", without unpickling anything."""
    names: list[str] = []
    if is_zip:
        import torch

        allowed = {name for _, name in ckpt_safe_globals()}
        try:
            found = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except Exception:  # noqa: BLE001 - only a better message is lost (e.g. opcodes its scanner does not know)
            found = []
        names = [n for n in found if n not in allowed]
    if not names:
        inner = str(exc.__context__ or exc)
        names = re.findall(r"GLOBAL ([\w.]+)", inner)
        if not names:
            m = re.search(r"unrecognized function (\S+)", inner) or re.search(r"but got (\S+)", inner)
            if m:
                names = [m.group(1)]
        if not names:
            m = re.search(r"Unsupported operand (\d+)", inner)
            if m:
                code = int(m.group(1))
                char = f" ({chr(code)!r})" if 32 < code < 127 else ""
                return f"it uses pickle opcode {code}{char}, outside the safe subset"
            return "it uses pickle features outside the safe subset"
    shown = [re.sub(r"^(posix|nt)\.", "os.", n) for n in dict.fromkeys(names)]
    return "it references " + ", ".join(shown)
