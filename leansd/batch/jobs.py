"""Job files: read, validate every line in one pass, fix every seed, group lines by reload key.

A job file is JSON Lines (one HTTP API txt2img/img2img body per line), a CSV with a header of the
same field names, or a plain prompt file (one prompt per line, as `--from-file`). Lines are turned
into `GenerationRequest`s by the A1111 layer the HTTP API uses, so a job line means exactly what
the same body means to `/sdapi/v1/txt2img` or `/sdapi/v1/img2img`. Image fields hold file paths,
relative to the job file's folder (they may not leave it unless absolute), read with the CLI's checks.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from leansd.errors import InvalidRequestError, one_line

logger = logging.getLogger(__name__)

FORMATS = ("auto", "jsonl", "csv", "txt")
ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
MAX_ERRORS_SHOWN = 20
"""Lines whose errors are listed one by one; the rest are counted."""

# Fields a job line may hold besides the HTTP API's: an id, file paths instead of base64, a model.
EXTRA_FIELDS = ("id", "init_image", "model")
IMAGE_FIELDS = ("init_images", "init_image", "mask")
DEFAULT_FIELDS = ("negative_prompt", "steps", "cfg_scale", "sampler_name", "width", "height",
                  "batch_size", "n_iter")
"""Fields the `leansd batch` flags fill in where a line leaves them out."""


class JobFileError(InvalidRequestError):
    """Bad lines in a job file: `errors` holds one message per bad line ("line N: ...")."""

    def __init__(self, message: str, errors: list[str]) -> None:
        super().__init__(message)
        self.errors = errors


@dataclass
class JobLine:
    """One validated line: its id, where it is, its A1111 body (seed fixed), model and image count."""

    id: str
    line: int
    body: dict[str, Any]
    """The A1111 fields, with the seed fixed and image fields as resolved absolute paths."""
    model: str
    task: str
    """txt2img or img2img (img2img with a mask inpaints)."""
    seed: int
    num_images: int
    width: int
    height: int
    fingerprint: str = ""
    """sha256 of everything that decides the pixels (body, seed, model): resume refuses a changed line."""
    prepared: Any = None
    """The request built ahead (by a Ray driver, which reads the images), else None."""

    @property
    def reload_key(self) -> tuple[str, int, int]:
        """What a worker would have to reload or re-plan for: the model, then the size."""
        return (self.model, self.width, self.height)

    def request(self) -> "Any":
        """The GenerationRequest of this line (reads its images again, unless `prepared`)."""
        if self.prepared is not None:
            return self.prepared
        return build_request(self.body, task=self.task, model=self.model)

    def with_request(self) -> "JobLine":
        """A copy carrying its built request, images included: workers then need no access to the files."""
        from dataclasses import replace

        return replace(self, prepared=self.request())


@dataclass
class JobFile:
    path: Path
    lines: list[JobLine]
    seed: int
    """The base seed lines without a seed count from (`--seed`, or a random one, recorded)."""
    errors: list[str] = field(default_factory=list)

    @property
    def num_images(self) -> int:
        return sum(line.num_images for line in self.lines)


def detect_format(path: Path, fmt: str = "auto") -> str:
    if fmt not in FORMATS:
        raise InvalidRequestError(f"unknown job file format {fmt!r}; valid: {', '.join(FORMATS)}")
    if fmt != "auto":
        return fmt
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        return "jsonl"
    if suffix in (".csv", ".tsv"):
        return "csv"
    return "txt"


def _raw_lines(path: Path, fmt: str) -> Iterable[tuple[int, "dict[str, Any] | str"]]:
    """(line number, fields or an error message) for every non-blank line."""
    from leansd.inputs.text import read_text_file

    text = read_text_file(path, label="job file")
    if fmt == "txt":
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                yield number, {"prompt": line.strip()}
        return
    if fmt == "jsonl":
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                yield number, f"not valid JSON ({exc.msg} at column {exc.colno})"
                continue
            yield number, value if isinstance(value, dict) else f"expected a JSON object, got {type(value).__name__}"
        return
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    header: list[str] | None = None
    start = 1
    for row in reader:
        number, start = start, reader.line_num + 1
        if not any(cell.strip() for cell in row):
            continue
        if header is None:
            header = [cell.strip() for cell in row]
            if len(set(header)) != len(header):
                raise InvalidRequestError(f"job file {path} line {number}: the CSV header repeats a column")
            continue
        if len(row) != len(header):
            yield number, f"{len(row)} cells, but the header has {len(header)} columns"
            continue
        fields: dict[str, Any] = {}
        for name, cell in zip(header, row, strict=True):
            if cell.strip() == "":
                continue  # an empty cell: the field's default
            if name == "override_settings":
                try:
                    fields[name] = json.loads(cell)
                except json.JSONDecodeError:
                    yield number, "override_settings must be a JSON object"
                    break
            else:
                fields[name] = cell
        else:
            yield number, fields
    if header is None:
        raise InvalidRequestError(f"job file {path}: the CSV file has no header line")


def read_jobs(
    path: "str | os.PathLike[str]",
    *,
    model: str | None,
    seed: int | None = None,
    fmt: str = "auto",
    defaults: dict[str, Any] | None = None,
) -> JobFile:
    """Read and validate the whole job file; InvalidRequestError lists every bad line at once.

    `model`: the model of lines that name none (`--model`). `seed`: the base seed (None or -1:
    random); a line without a seed gets base + the number of images of the lines before it.
    `defaults`: values for `DEFAULT_FIELDS` that a line leaves out.
    """
    from leansd.request import MAX_SEED, random_seed

    path = Path(path)
    fmt = detect_format(path, fmt)
    raw = list(_raw_lines(path, fmt))
    if not raw:
        raise InvalidRequestError(f"job file {path}: it holds no jobs (it is empty)")
    defaults = {k: v for k, v in (defaults or {}).items() if v is not None}
    unknown = set(defaults) - set(DEFAULT_FIELDS)
    if unknown:
        raise InvalidRequestError(f"unknown default field(s): {', '.join(sorted(unknown))}")
    errors: list[str] = []
    total_seeds = 0
    planned: list[tuple[int, dict[str, Any] | str]] = []
    for number, fields in raw:
        if isinstance(fields, dict):
            fields = {**defaults, **fields}
            total_seeds += _seeds_used(fields)
        planned.append((number, fields))
    base = seed
    if base is None or base == -1:
        base = random_seed(max(1, min(total_seeds, MAX_SEED)))
    elif not 0 <= base <= MAX_SEED:
        raise InvalidRequestError(f"--seed must be between 0 and {MAX_SEED} (or -1 for random), got {base}")
    folder = path.resolve().parent
    lines: list[JobLine] = []
    seen: dict[str, int] = {}
    offset = 0
    for number, fields in planned:
        if isinstance(fields, str):
            errors.append(f"line {number}: {fields}")
            continue
        used = _seeds_used(fields)
        try:
            job = _validate_line(fields, number=number, folder=folder, model=model, seed=base + offset)
        except InvalidRequestError as exc:
            errors.append(f"line {number}: {one_line(exc)}")
        else:
            # Case-insensitive: "A" and "a" would name the same image file on macOS and Windows.
            if job.id.lower() in seen:
                errors.append(f"line {number}: id {job.id!r} is already used by line {seen[job.id.lower()]}")
            else:
                seen[job.id.lower()] = number
                lines.append(job)
        offset += used
    if errors:
        shown = errors[:MAX_ERRORS_SHOWN]
        more = len(errors) - len(shown)
        raise JobFileError(
            f"job file {path}: {len(errors)} bad line{'s' if len(errors) != 1 else ''}, nothing was generated:\n  "
            + "\n  ".join(shown) + (f"\n  ... and {more} more" if more else ""),
            errors,
        )
    return JobFile(path=path, lines=lines, seed=base)


def _seeds_used(fields: dict[str, Any]) -> int:
    """How many seeds a line's images use (its batch_size x n_iter), 1 where that is not a number yet."""
    try:
        return max(1, int(fields.get("batch_size", 1))) * max(1, int(fields.get("n_iter", 1)))
    except (TypeError, ValueError):
        return 1


def _validate_line(fields: dict[str, Any], *, number: int, folder: Path, model: str | None, seed: int) -> JobLine:
    from leansd.frontends.a1111 import Img2ImgRequest, Txt2ImgRequest

    known = set(Txt2ImgRequest.model_fields) | set(Img2ImgRequest.model_fields) | set(EXTRA_FIELDS)
    unknown = sorted(set(fields) - known)
    if unknown:
        raise InvalidRequestError(
            f"unknown field{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} "
            "(job lines take the HTTP API's txt2img/img2img fields, plus id, init_image, model)"
        )
    body = dict(fields)
    job_id = _job_id(body.pop("id", None), number)
    line_model = body.pop("model", None)
    override = body.get("override_settings")
    if override is not None and not isinstance(override, dict):
        raise InvalidRequestError("override_settings must be an object")
    checkpoint = (override or {}).get("sd_model_checkpoint")
    if line_model is not None and checkpoint is not None and str(line_model) != str(checkpoint):
        raise InvalidRequestError("model and override_settings.sd_model_checkpoint name different models")
    chosen = line_model if line_model is not None else checkpoint if checkpoint is not None else model
    if chosen is None or not str(chosen).strip():
        raise InvalidRequestError("no model: pass --model, or give the line a model field")
    chosen = _model_spec(str(chosen).strip(), folder)
    if override is not None:
        body["override_settings"] = {k: v for k, v in override.items() if k != "sd_model_checkpoint"}
    if "init_image" in body:
        if "init_images" in body:
            raise InvalidRequestError("give init_image or init_images, not both")
        body["init_images"] = [body.pop("init_image")]
    images = body.get("init_images")
    if images is not None:
        if isinstance(images, str):
            images = [images]
        if not isinstance(images, list) or len(images) != 1:
            raise InvalidRequestError("init_images must hold exactly one image path")
        body["init_images"] = [_image_path(images[0], folder, "init_images[0]")]
    if body.get("mask") is not None:
        if images is None:
            raise InvalidRequestError("a mask needs an init image (init_image or init_images)")
        body["mask"] = _image_path(body["mask"], folder, "mask")
    if body.get("seed") in (None, -1, "-1"):
        body["seed"] = seed
    task = "img2img" if images is not None else "txt2img"
    request = build_request(body, task=task, model=chosen)  # every check the HTTP API makes
    width, height = request.width, request.height
    if task == "img2img":
        width, height = request.init_image.size if width is None else (width, height)
    body["seed"] = request.seed
    fingerprint = hashlib.sha256(
        json.dumps({"body": body, "model": chosen, "task": task}, sort_keys=True, default=str).encode()
    ).hexdigest()
    return JobLine(id=job_id, line=number, body=body, model=chosen, task=task, seed=request.seed,
                   num_images=request.num_images, width=int(width or 0), height=int(height or 0),
                   fingerprint=fingerprint)


def _job_id(value: Any, number: int) -> str:
    if value is None:
        return str(number)
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise InvalidRequestError(f"id must be a string or an integer, got {type(value).__name__}")
    text = str(value)
    if not ID_PATTERN.fullmatch(text):
        raise InvalidRequestError(
            f"id {text!r} cannot name a file: use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return text


def _model_spec(spec: str, folder: Path) -> str:
    """A model named by a line: a path relative to the job file when one exists there, else as given."""
    candidate = Path(spec).expanduser()
    if not candidate.is_absolute() and (folder / candidate).exists():
        return str((folder / candidate).resolve())
    if candidate.is_absolute() and not candidate.exists():
        raise InvalidRequestError(f"model {spec}: no such file or folder")
    return spec


def _image_path(value: Any, folder: Path, label: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InvalidRequestError(f"{label} must be a file path (relative to the job file), got {value!r}")
    candidate = Path(value.strip()).expanduser()
    if candidate.is_absolute():
        return str(candidate)
    resolved = (folder / candidate).resolve()
    if not resolved.is_relative_to(folder):
        raise InvalidRequestError(
            f"{label} {value!r} leaves the job file's folder; use a path inside it or an absolute path"
        )
    return str(resolved)


def build_request(body: dict[str, Any], *, task: str, model: str) -> "Any":
    """The A1111 body -> GenerationRequest through the A1111 layer's translation (image files read here)."""
    from pydantic import ValidationError

    from leansd.frontends.a1111 import Img2ImgRequest, Limits, Txt2ImgRequest, img2img_request, txt2img_request
    from leansd.request import MAX_BATCH, MAX_ITER, MAX_SIZE, MAX_STEPS

    limits = Limits(max_size=MAX_SIZE, max_steps=MAX_STEPS, max_images=MAX_BATCH * MAX_ITER)
    fields = dict(body)
    images: dict[str, Any] = {}
    if task == "img2img":
        from leansd.inputs.images import load_image, load_mask

        # The CLI's checks (load_image/load_mask), with the file named in every message.
        images["init_image"] = load_image(fields.pop("init_images")[0], label="init_images[0]")
        mask = fields.pop("mask", None)
        if mask is not None:
            images["mask"] = load_mask(mask, label="mask")
    try:
        if task == "img2img":
            return img2img_request(Img2ImgRequest.model_validate(fields), model_name=model, limits=limits, **images)
        return txt2img_request(Txt2ImgRequest.model_validate(fields), model_name=model, limits=limits)
    except ValidationError as exc:
        parts = []
        for err in exc.errors()[:3]:
            where = ".".join(str(p) for p in err.get("loc", ())) or "line"
            parts.append(f"{where}: {err.get('msg', 'invalid')} (got {one_line(repr(err.get('input')), limit=60)})")
        raise InvalidRequestError("; ".join(parts)) from None


def group_lines(lines: list[JobLine]) -> list[JobLine]:
    """Lines ordered so that those sharing a reload key (model, size) run together, in file order within."""
    order: dict[tuple[str, int, int], int] = {}
    for line in lines:
        order.setdefault(line.reload_key, len(order))
    return sorted(lines, key=lambda line: order[line.reload_key])  # sorted() is stable
