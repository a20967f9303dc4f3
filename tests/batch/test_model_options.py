"""`leansd batch` applies every model option it accepts: --vae as `leansd txt2img --vae` does, per line."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from leansd.batch.jobs import read_jobs
from leansd.batch.runner import LocalBackend, run_batch
from leansd.batch.worker import BatchWorker
from leansd.errors import InvalidRequestError
from leansd.outputs.infotext import parse_infotext
from leansd.outputs.writer import read_infotext
from tests.test_cli_library import write_vae

from .common import pixels, records, write_jsonl

OPTIONS = {"device": "cpu", "prompt_cache": False}
LINE = {"prompt": "a red fox", "seed": 5, "width": 64, "height": 64, "steps": 2, "sampler_name": "DDIM"}


def _cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str]:
    """The CLI in this process (its model loads are what a subprocess would do, minus the imports)."""
    from leansd.frontends.cli import main

    code = main(list(args))
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> tuple[Path, Path]:
    from leansd.models.tiny import write_tiny_single_file

    root = tmp_path_factory.mktemp("vae")
    return write_tiny_single_file(root / "m.safetensors"), write_vae(root / "other.vae.safetensors", seed=5)


def test_batch_vae_makes_the_pixels_of_txt2img_vae(files: tuple[Path, Path], tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    checkpoint, vae = files
    jobs = write_jsonl(tmp_path / "jobs.jsonl", [{"id": "fox", **LINE}])
    outdir = tmp_path / "out"
    code, err = _cli(capsys, "batch", str(jobs), "--model", str(checkpoint), "--vae", str(vae), "--outdir", str(outdir),
               "--no-prompt-cache")
    assert code == 0, err
    single = tmp_path / "single"
    code, err = _cli(capsys, "txt2img", "--model", str(checkpoint), "--vae", str(vae), "--prompt", LINE["prompt"], "--H", "64",
               "--W", "64", "--steps", "2", "--seed", "5", "--sampler", "DDIM", "--outdir", str(single),
               "--no-prompt-cache")
    assert code == 0, err
    [reference] = sorted(single.glob("*.png"))
    assert np.array_equal(pixels(outdir / "fox-0.png"), pixels(reference))
    info = parse_infotext(read_infotext(outdir / "fox-0.png"))
    vae_hash = hashlib.sha256(vae.read_bytes()).hexdigest()[:10]
    assert (info["VAE"], info["VAE hash"]) == ("other.vae.safetensors", vae_hash)
    assert info == parse_infotext(read_infotext(reference))
    [record] = records(outdir)
    assert (record["vae"], record["vae_hash"]) == ("other.vae.safetensors", vae_hash)
    run = json.loads((outdir / "manifest.jsonl").read_text().splitlines()[0])
    assert run["vae"] == str(vae)

    # The checkpoint's own VAE (the default) makes other pixels, and resuming with it is refused.
    plain = tmp_path / "plain"
    summary = run_batch(read_jobs(jobs, model=str(checkpoint)), outdir=plain,
                        backend=LocalBackend(BatchWorker(engine_options=OPTIONS)))
    assert summary.exit_code == 0
    assert np.abs(pixels(plain / "fox-0.png").astype(int) - pixels(reference).astype(int)).max() > 5
    assert records(plain)[0]["vae"] is None and "VAE" not in parse_infotext(read_infotext(plain / "fox-0.png"))
    code, err = _cli(capsys, "batch", str(jobs), "--model", str(checkpoint), "--outdir", str(outdir), "--resume")
    assert code == 2 and "Traceback" not in err
    assert f"--vae Automatic differs from the VAE {vae} this manifest was started with" in err


def test_a_lines_own_vae_does_not_leak_into_the_next_line(files: tuple[Path, Path], tmp_path: Path) -> None:
    checkpoint, vae = files
    jobs = read_jobs(write_jsonl(tmp_path / "jobs.jsonl", [
        {"id": "own", **LINE, "override_settings": {"sd_vae": "None"}},
        {"id": "default", **LINE},
    ]), model=str(checkpoint))
    outdir = tmp_path / "out"
    worker = BatchWorker(engine_options=OPTIONS, vae=str(vae))
    assert run_batch(jobs, outdir=outdir, backend=LocalBackend(worker), vae=str(vae)).exit_code == 0
    found = {r["id"]: r for r in records(outdir)}
    assert found["own"]["vae"] is None and found["default"]["vae"] == "other.vae.safetensors"
    assert np.abs(pixels(outdir / "own-0.png").astype(int) - pixels(outdir / "default-0.png").astype(int)).max() > 5


def test_bad_vae_and_taesd_are_refused_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    jobs = write_jsonl(tmp_path / "jobs.jsonl", [{"id": "fox", **LINE}])
    outdir = tmp_path / "out"
    code, err = _cli(capsys, "batch", str(jobs), "--model", "tiny", "--vae", "nope", "--outdir", str(outdir))
    assert code == 2 and "VAE 'nope': no such file" in err and "Traceback" not in err
    code, err = _cli(capsys, "batch", str(jobs), "--model", "tiny", "--taesd", str(tmp_path), "--outdir", str(outdir))
    assert code == 2 and "--taesd has no use in leansd batch" in err
    assert not outdir.exists()


def test_resume_with_another_vae_is_refused_in_the_api(tmp_path: Path) -> None:
    jobs = read_jobs(write_jsonl(tmp_path / "jobs.jsonl", [{"id": "fox", **LINE}]), model="tiny", seed=1)
    outdir = tmp_path / "out"
    outdir.mkdir()
    (outdir / "manifest.jsonl").write_text(json.dumps({"type": "run", "seed": 1, "vae": "None"}) + "\n")
    with pytest.raises(InvalidRequestError, match="--vae Automatic differs from the VAE None"):
        run_batch(jobs, outdir=outdir, backend=LocalBackend(BatchWorker(engine_options=OPTIONS)), resume=True)
