"""The batch driver: skip what is done, hand lines to a backend, write files and the manifest.

A backend (in-process `LocalBackend`, or `leansd.batch.ray_backend.RayBackend`) yields one
`LineResult` per line in any order; only this driver writes files and manifest records, so every
image appears once on disk and once in the manifest whatever the backend does.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

from leansd.batch.jobs import JobFile, JobLine, group_lines
from leansd.batch.manifest import (
    Manifest,
    OutdirLock,
    Resume,
    image_name,
    run_record,
    sha256_bytes,
    write_file_atomic,
)
from leansd.batch.worker import BatchWorker, LineResult
from leansd.errors import InvalidRequestError

logger = logging.getLogger(__name__)


class Backend(Protocol):
    def run(self, lines: list[JobLine]) -> Iterator[LineResult]: ...

    def close(self) -> None: ...


class LocalBackend:
    """Runs lines one after another in this process with one `BatchWorker`."""

    def __init__(self, worker: BatchWorker) -> None:
        self.worker = worker

    def run(self, lines: list[JobLine]) -> Iterator[LineResult]:
        for line in lines:
            yield self.worker.run(line)

    def close(self) -> None:
        self.worker.engine = None


@dataclass
class BatchSummary:
    lines: int
    images: int
    written: int = 0
    skipped: int = 0
    failed: int = 0
    seconds: float = 0.0
    interrupted: bool = False
    errors: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """0: every image is there; 1: some failed; 130: interrupted (resumable)."""
        if self.interrupted:
            return 130
        return 1 if self.failed else 0

    def line(self, manifest: Path) -> str:
        rate = self.written / self.seconds if self.seconds > 0 else 0.0
        parts = [f"{self.written} image{'s' if self.written != 1 else ''} written"]
        if self.skipped:
            parts.append(f"{self.skipped} already done")
        parts.append(f"{self.failed} failed")
        text = (f"{', '.join(parts)} of {self.images} in {self.seconds:.1f} s ({rate:.2f} images/s); "
                f"manifest {manifest}")
        if self.interrupted:
            text += "; interrupted: rerun with --resume to finish"
        return text


def prepare_outdir(outdir: Path, *, resume: bool, jobs: JobFile | None = None,
                   overwrite: bool = False) -> tuple[Manifest, Resume | None]:
    """The manifest of `outdir`; a previous run there needs --resume (nothing is overwritten).

    Without a manifest, image files of `jobs` already in `outdir` (`<id>-<k>.png` that no manifest
    lists: another tool's, or a run whose manifest was deleted) are refused unless `overwrite`.
    """
    from leansd.outputs.writer import preflight_outdir

    preflight_outdir(outdir)
    manifest = Manifest(outdir)
    if manifest.exists():
        if not resume:
            raise InvalidRequestError(
                f"{manifest.path} already exists: pass --resume to finish that run, or choose another --outdir"
            )
        return manifest, manifest.load_resume()
    if jobs is not None and not overwrite:
        stray = stray_images(outdir, jobs)
        if stray:
            raise InvalidRequestError(
                f"{outdir} already has {len(stray)} image{'s' if len(stray) != 1 else ''} not in a manifest "
                f"({', '.join(stray[:3])}{', ...' if len(stray) > 3 else ''}) that this run would replace: "
                "pass --overwrite to replace them, or choose another --outdir"
            )
    return manifest, None


def stray_images(outdir: Path, jobs: JobFile) -> list[str]:
    """The names `jobs` would write that already exist in `outdir` (checked where no manifest lists them)."""
    if not outdir.is_dir():
        return []
    present = {path.name for path in outdir.iterdir()}
    return [name for line in jobs.lines for k in range(line.num_images)
            if (name := image_name(line.id, k)) in present]


def recorded_seed(outdir: Path) -> int | None:
    """The base seed an earlier run in `outdir` recorded (for --resume without --seed)."""
    manifest = Manifest(outdir)
    if not manifest.exists():
        return None
    run = manifest.load_resume().run
    seed = None if run is None else run.get("seed")
    return seed if isinstance(seed, int) else None


def run_batch(
    jobs: JobFile,
    *,
    outdir: Path,
    backend: Backend,
    resume: bool = False,
    model: str | None = None,
    progress: bool = False,
    on_image: "Callable[[dict[str, Any]], None] | None" = None,
    vae: str = "Automatic",
    overwrite: bool = False,
) -> BatchSummary:
    """Run every line of `jobs` not already done into `outdir`; files and manifest written here.

    `overwrite`: replace image files of this job file that are in `outdir` without a manifest
    (else refused, see `prepare_outdir`). `vae`: the backend's VAE choice (`--vae`), recorded in the manifest's run record; resuming with
    another one is refused, as it would mix two runs.

    `on_image(record)` is called after each image's record is written (progress hooks, tests).
    KeyboardInterrupt stops the backend and returns a summary with `interrupted=True`: every image
    already recorded stays valid and `--resume` finishes the rest.
    """
    outdir = Path(outdir)
    from leansd.outputs.writer import preflight_outdir

    lock: OutdirLock | None = None
    try:
        preflight_outdir(outdir)
        lock = OutdirLock(outdir).acquire()  # before the manifest is read: one run per folder
        return _run_locked(jobs, outdir=outdir, backend=backend, resume=resume, model=model, progress=progress,
                           on_image=on_image, vae=vae, overwrite=overwrite)
    finally:
        backend.close()  # also when the folder is refused (closing twice is harmless)
        if lock is not None:
            lock.release()


def _run_locked(
    jobs: JobFile,
    *,
    outdir: Path,
    backend: Backend,
    resume: bool,
    model: str | None,
    progress: bool,
    on_image: "Callable[[dict[str, Any]], None] | None",
    vae: str,
    overwrite: bool,
) -> BatchSummary:
    manifest, state = prepare_outdir(outdir, resume=resume, jobs=jobs, overwrite=overwrite)
    done: dict[tuple[str, int], dict[str, Any]] = {} if state is None else dict(state.done)
    recorded_vae = None if state is None or state.run is None else state.run.get("vae", "Automatic")
    if recorded_vae is not None and recorded_vae != vae:
        raise InvalidRequestError(
            f"--vae {vae} differs from the VAE {recorded_vae} this manifest was started with: resuming would mix "
            "two runs; pass the same --vae, or use another --outdir"
        )
    _check_unchanged(jobs, done)
    summary = BatchSummary(lines=len(jobs.lines), images=jobs.num_images)
    pending = [line for line in group_lines(jobs.lines)
               if any((line.id, k) not in done for k in range(line.num_images))]
    summary.skipped = sum(1 for line in jobs.lines for k in range(line.num_images) if (line.id, k) in done)
    if state is None or state.run is None:
        outdir.mkdir(parents=True, exist_ok=True)
        manifest.append(run_record(jobs=jobs.path, seed=jobs.seed, model=model, images=jobs.num_images,
                                   lines=len(jobs.lines), vae=vae))
    by_id = {line.id: line for line in jobs.lines}
    started = time.perf_counter()
    bar = _bar(total=summary.images, initial=summary.skipped, enabled=progress)
    try:
        for result in backend.run(pending):
            line = by_id[result.id]
            for outcome in result.images:
                key = (line.id, outcome.k)
                if key in done:
                    continue  # a resumed line made again: its finished images stay as they are
                record: dict[str, Any] = {
                    "type": "image", "id": line.id, "k": outcome.k, "line": line.line, "seed": outcome.seed,
                    "file": None, "sha256": None, "model": result.model, "model_hash": result.model_hash,
                    "vae": result.vae, "vae_hash": result.vae_hash,
                    "timings": result.timings, "error": outcome.error, "worker": result.worker,
                    "fingerprint": line.fingerprint,
                }
                if outcome.png is not None and outcome.error is None:
                    name = image_name(line.id, outcome.k)
                    write_file_atomic(outdir / name, outcome.png)
                    record.update(file=name, sha256=sha256_bytes(outcome.png))
                    summary.written += 1
                else:
                    summary.failed += 1
                    if len(summary.errors) < 20:
                        summary.errors.append(f"line {line.line} (id {line.id}) image {outcome.k}: {outcome.error}")
                manifest.append(record)
                done[key] = record
                bar.update(1)
                if on_image is not None:
                    on_image(record)
    except KeyboardInterrupt:
        summary.interrupted = True
        logger.warning("interrupted: stopping the workers; the manifest holds every finished image")
    finally:
        bar.close()
        backend.close()
        summary.seconds = time.perf_counter() - started
    return summary


def _check_unchanged(jobs: JobFile, done: dict[tuple[str, int], dict[str, Any]]) -> None:
    by_id = {line.id: line for line in jobs.lines}
    changed = []
    for (job_id, _k), record in done.items():
        line = by_id.get(job_id)
        if line is not None and record.get("fingerprint") not in (None, line.fingerprint) and line not in changed:
            changed.append(line)
    if changed:
        listed = ", ".join(f"line {line.line} (id {line.id})" for line in changed[:10])
        raise InvalidRequestError(
            f"{listed} changed since the manifest recorded {'it' if len(changed) == 1 else 'them'} "
            "(prompt, settings, seed or model): resuming would mix two runs; use another --outdir"
        )


def _bar(*, total: int, initial: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="img", desc="batch", disable=not enabled, dynamic_ncols=True,
                smoothing=0.1)


def local_backend(*, engine_options: dict[str, Any], load: "Callable[..., Any] | None" = None) -> LocalBackend:
    return LocalBackend(BatchWorker(engine_options=engine_options, load=load))
