"""The batch manifest (`manifest.jsonl`) and the image files it lists.

The manifest is append-only JSON Lines. The first record describes the run (base seed, job file);
every other record is one image: id, k, seed, file, sha256, model, timings, error. Each record is
one `write` of one whole line on a file opened for appending, followed by an fsync, so a crash
leaves at most one torn last line, which readers skip. An image file is written (temporary file,
then rename) before its record, so a record always points at a complete file; `--resume` trusts a
record only when the file is still there with the recorded sha256. One run at a time writes to a
folder: a run holds an exclusive lock on the OUTDIR folder itself while it works, and a second
run there stops at once with an error instead of making and recording the same images twice.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from leansd.errors import InvalidRequestError, OutputError, one_line

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.jsonl"


def image_name(job_id: str, k: int) -> str:
    """`<id>-<k>.png`: the file of image k of job `job_id`."""
    return f"{job_id}-{k}.png"


def encode_png(image: "Any", infotext: str | None) -> bytes:
    """PNG bytes with A1111's `parameters` text chunk."""
    from PIL import PngImagePlugin

    from leansd.outputs.writer import INFOTEXT_KEY

    info = PngImagePlugin.PngInfo()
    if infotext is not None:
        info.add_text(INFOTEXT_KEY, infotext)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str | None:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    except OSError:
        return None
    return digest.hexdigest()


def write_file_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a hidden temporary file and a rename: never half a file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise OutputError(one_line(f"cannot write {path}: {exc.strerror or exc}")) from exc
        raise


class OutdirLock:
    """An exclusive, non-blocking lock on OUTDIR for one batch run (released on close or process exit)."""

    def __init__(self, outdir: Path) -> None:
        self.path = Path(outdir)
        self._fd: int | None = None

    def acquire(self) -> "OutdirLock":
        try:
            import fcntl
        except ImportError:  # Windows: no advisory locks here; runs are not guarded against each other
            return self
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDONLY)  # the folder itself: no lock file is left behind
        except OSError as exc:
            raise OutputError(one_line(f"cannot open output folder {self.path}: {exc.strerror or exc}")) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            raise InvalidRequestError(
                f"another batch run is writing to {self.path}: wait for it to finish, or choose another --outdir"
            ) from exc
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the lock
            self._fd = None


@dataclass
class Resume:
    """What an existing manifest says: the run record and the images already done (by (id, k))."""

    run: dict[str, Any] | None
    done: dict[tuple[str, int], dict[str, Any]]
    records: int


class Manifest:
    """Appends records to OUTDIR/manifest.jsonl, one whole line per write, thread-safe."""

    def __init__(self, outdir: Path) -> None:
        self.outdir = Path(outdir)
        self.path = self.outdir / MANIFEST_NAME
        self._lock = threading.Lock()

    def exists(self) -> bool:
        return self.path.exists() and self.path.stat().st_size > 0

    def records(self) -> Iterator[dict[str, Any]]:
        """Every whole record; a torn or foreign line is skipped with a warning."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return
        except (OSError, UnicodeDecodeError) as exc:
            raise OutputError(one_line(f"cannot read {self.path}: {exc}")) from exc
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                logger.warning("%s line %d is incomplete (an interrupted write); ignored", self.path, number)
                continue
            if isinstance(record, dict):
                yield record

    def load_resume(self) -> Resume:
        """The run record and, per (id, k), the last successful record whose file is intact."""
        run = None
        done: dict[tuple[str, int], dict[str, Any]] = {}
        count = 0
        for record in self.records():
            count += 1
            if record.get("type") == "run":
                run = run or record
                continue
            if record.get("type") != "image":
                continue
            k = record.get("k")
            if isinstance(k, bool) or not isinstance(k, int):
                logger.warning("%s: an image record without a whole-number k is ignored", self.path)
                continue
            key = (str(record.get("id")), k)
            # Only the file this run would write counts: a record naming another path ("../x.png",
            # a file of another id) is not an image of this folder.
            if record.get("error") is None and record.get("file") == image_name(*key):
                done[key] = record
            else:
                done.pop(key, None)  # a later failure replaces an earlier record for the image
        intact = {}
        for key, record in done.items():
            path = self.outdir / str(record["file"])
            if path.is_file() and sha256_file(path) == record.get("sha256"):
                intact[key] = record
            else:
                logger.info("%s is missing or changed: image %s-%d will be made again", path, *key)
        return Resume(run=run, done=intact, records=count)

    def append(self, record: dict[str, Any]) -> None:
        """One record as one line, written with a single os.write on an O_APPEND file, then fsync."""
        data = json.dumps(record, sort_keys=True, default=str)
        with self._lock:
            self.outdir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                # A torn last line from a crash must not swallow this record: start a new line.
                size = os.fstat(fd).st_size
                prefix = ""
                if size:
                    with open(self.path, "rb") as f:
                        f.seek(size - 1)
                        prefix = "" if f.read(1) == b"\n" else "\n"
                payload = (prefix + data + "\n").encode("utf-8")
                written = os.write(fd, payload)
                if written != len(payload):
                    raise OSError(f"short write ({written} of {len(payload)} bytes)")
                os.fsync(fd)
            except OSError as exc:
                raise OutputError(one_line(f"cannot append to {self.path}: {exc}")) from exc
            finally:
                os.close(fd)


def run_record(*, jobs: Path, seed: int, model: str | None, images: int, lines: int,
               vae: str = "Automatic") -> dict[str, Any]:
    from leansd import __version__

    return {"type": "run", "jobs": str(jobs), "seed": seed, "model": model, "vae": vae, "images": images, "lines": lines,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "version": f"leansd {__version__}"}


def check_resume(resume: Resume, *, seed_given: bool, seed: int) -> None:
    """A resumed run must use the recorded base seed (or none, to take it from the manifest)."""
    if resume.run is not None and seed_given and resume.run.get("seed") != seed:
        raise InvalidRequestError(
            f"--seed {seed} differs from the seed {resume.run.get('seed')} this manifest was started with; "
            "drop --seed to resume with the recorded one, or use another --outdir"
        )
