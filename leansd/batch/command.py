"""`leansd batch JOBS`: the command behind the CLI's subcommand (argparse namespace in, exit code out)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from leansd.errors import InvalidRequestError

logger = logging.getLogger(__name__)


def defaults_from(args: argparse.Namespace) -> dict[str, Any]:
    """The flags that fill fields a job line leaves out, under the HTTP API's field names."""
    return {
        "negative_prompt": args.negative_prompt,
        "steps": args.steps,
        "cfg_scale": args.scale,
        "sampler_name": args.sampler,
        "width": args.width,
        "height": args.height,
        "batch_size": args.n_samples,
        "n_iter": args.n_iter,
    }


def engine_options(args: argparse.Namespace, memory: dict[str, Any]) -> dict[str, Any]:
    from leansd.models.library import ModelLibrary

    # The folder flags (--data-dir, --lora-dir, ...) name where <lora:...> tags and embeddings are found.
    library = ModelLibrary.from_options(
        data_dir=getattr(args, "data_dir", None), ckpt_dir=getattr(args, "ckpt_dir", None),
        lora_dir=getattr(args, "lora_dir", None), vae_dir=getattr(args, "vae_dir", None),
        embeddings_dir=getattr(args, "embeddings_dir", None),
    )
    return {"device": args.device, "precision": args.precision, "prompt_cache": args.prompt_cache,
            "library": library, **memory}


def _check_vae(vae: str, *, library: Any, model: str | None) -> None:
    """A bad --vae (no such file, no such name in --vae-dir) fails before any model loads."""
    from leansd.models.vae_override import resolve_vae

    checkpoint = model if model and Path(model).expanduser().is_file() else None
    resolve_vae(vae, library=library, checkpoint=checkpoint)


def run(args: argparse.Namespace, *, memory: dict[str, Any]) -> int:
    from leansd.batch.jobs import JobFileError, read_jobs
    from leansd.batch.runner import LocalBackend, prepare_outdir, recorded_seed, run_batch
    from leansd.batch.worker import BatchWorker

    outdir = Path(args.outdir)
    if args.workers is not None and args.workers < 1:
        raise InvalidRequestError(f"--workers must be at least 1, got {args.workers}")
    if args.workers is not None and args.ray is None:
        raise InvalidRequestError("--workers is for Ray runs: add --ray [ADDRESS] (locally one process works)")
    if getattr(args, "taesd", None):
        # Job lines have no field that asks for TAESD (no previews, no --vae-decoder): refuse, not ignore.
        raise InvalidRequestError("--taesd has no use in leansd batch: images are decoded with the VAE (--vae)")
    if args.ray is not None:
        from leansd.batch.ray_backend import require_ray

        require_ray()  # a clear install hint before any work
    # 1. Validate the whole job file (and the output folder) before anything loads.
    seed = args.seed
    seed_given = seed is not None and seed != -1
    if args.resume and not seed_given:
        seed = recorded_seed(outdir)
    try:
        jobs = read_jobs(args.jobs, model=args.model, seed=seed, fmt=args.jobs_format, defaults=defaults_from(args))
    except JobFileError as exc:
        # One line per bad job line, so every problem can be fixed in one go.
        print(f"leansd: error: {str(exc).splitlines()[0]}", file=sys.stderr)
        for error in exc.errors:
            print(f"leansd: error: {args.jobs} {error}", file=sys.stderr)
        return 2
    _, state = prepare_outdir(outdir, resume=args.resume, jobs=jobs, overwrite=args.overwrite)
    if state is not None and state.run is not None and state.run.get("seed") != jobs.seed:
        raise InvalidRequestError(
            f"--seed {jobs.seed} differs from the seed {state.run.get('seed')} this manifest was started with; "
            "drop --seed to resume with the recorded one, or use another --outdir"
        )
    if not seed_given and seed is None:
        print(f"leansd: base seed {jobs.seed} (random; recorded in the manifest)", file=sys.stderr)
    print(f"leansd: {len(jobs.lines)} job line{'s' if len(jobs.lines) != 1 else ''}, {jobs.num_images} image"
          f"{'s' if jobs.num_images != 1 else ''} -> {outdir}", file=sys.stderr)

    options = engine_options(args, memory)
    vae = getattr(args, "vae", None) or "Automatic"
    _check_vae(vae, library=options["library"], model=args.model)

    # 2. Run on this machine or on Ray.
    if args.ray is None:
        backend: Any = LocalBackend(BatchWorker(engine_options=options, vae=vae))
    else:
        from leansd.batch.ray_backend import RayBackend

        backend = RayBackend.connect(args.ray, workers=args.workers, engine_options=options, vae=vae)
    summary = run_batch(jobs, outdir=outdir, backend=backend, resume=args.resume, model=args.model,
                        progress=sys.stderr.isatty(), vae=vae, overwrite=args.overwrite)
    for error in summary.errors:
        print(f"leansd: failed: {error}", file=sys.stderr)
    print(f"leansd: {summary.line(outdir / 'manifest.jsonl')}", file=sys.stderr)
    return summary.exit_code
