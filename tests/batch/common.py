"""Shared pieces of the batch tests: job files on the tiny model, a loader, and reading results."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

SIZE = {"width": 64, "height": 64, "steps": 2, "sampler_name": "Euler a"}


def write_jsonl(path: Path, lines: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def tiny_jobs(folder: Path) -> Path:
    """Five lines, seven images, two sizes, one img2img: ids given and by line number, seeds given and derived."""
    ramp = np.linspace(0, 255, 64, dtype=np.uint8)
    Image.fromarray(np.stack([np.tile(ramp, (64, 1)), np.tile(ramp[:, None], (1, 64)),
                              np.full((64, 64), 128, np.uint8)], axis=-1)).save(folder / "init.png")
    return write_jsonl(folder / "jobs.jsonl", [
        {"id": "fox", "prompt": "a red fox", "batch_size": 2, **SIZE},
        {"prompt": "a cat", "seed": 77, **SIZE},
        {"id": "wide", "prompt": "a wide field", **{**SIZE, "width": 72}},
        {"id": "owl", "prompt": "an owl", "n_iter": 2, **SIZE},
        {"id": "paint", "prompt": "a painting", "init_image": "init.png", "denoising_strength": 0.6, **SIZE},
    ])


def load_engine(model: str, **options: Any) -> Any:
    """Engine loader for the tests' workers: the tiny model, anything else as a user would load it.

    The model name "crash" ends the worker process, as a segfault or the OOM killer would.
    """
    if model == "crash":
        os._exit(1)
    from leansd.engine.engine import Engine

    return Engine.load(model, **options)


def records(outdir: Path) -> list[dict[str, Any]]:
    lines = (outdir / "manifest.jsonl").read_text().splitlines()
    parsed = []
    for line in lines:
        try:
            parsed.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return [r for r in parsed if r.get("type") == "image"]


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))
