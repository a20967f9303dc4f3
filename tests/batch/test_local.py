"""`leansd batch` on this machine with the tiny model: files, manifest, failures, resume, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from leansd.batch.jobs import read_jobs
from leansd.batch.manifest import sha256_file
from leansd.batch.runner import LocalBackend, run_batch
from leansd.batch.worker import BatchWorker
from leansd.errors import InvalidRequestError
from leansd.outputs.infotext import parse_infotext
from leansd.outputs.writer import read_infotext

from .common import SIZE, load_engine, pixels, records, tiny_jobs, write_jsonl

OPTIONS = {"device": "cpu", "prompt_cache": False}


@pytest.fixture(scope="module")
def worker() -> BatchWorker:
    return BatchWorker(engine_options=OPTIONS, load=load_engine)


class _Keep(LocalBackend):
    """A local backend that keeps its engine between runs (close() would drop it)."""

    def close(self) -> None:
        pass


def test_files_manifest_and_pixels(tmp_path: Path, worker: BatchWorker) -> None:
    jobs = read_jobs(tiny_jobs(tmp_path), model="tiny", seed=40)
    outdir = tmp_path / "out"
    summary = run_batch(jobs, outdir=outdir, backend=_Keep(worker), model="tiny")
    assert (summary.written, summary.failed, summary.exit_code) == (7, 0, 0)
    assert sorted(p.name for p in outdir.iterdir()) == [
        "2-0.png", "fox-0.png", "fox-1.png", "manifest.jsonl", "owl-0.png", "owl-1.png", "paint-0.png", "wide-0.png"]
    found = records(outdir)
    assert sorted((r["id"], r["k"], r["seed"]) for r in found) == [
        ("2", 0, 77), ("fox", 0, 40), ("fox", 1, 41), ("owl", 0, 44), ("owl", 1, 45), ("paint", 0, 46), ("wide", 0, 43)]
    run = json.loads((outdir / "manifest.jsonl").read_text().splitlines()[0])
    assert run["type"] == "run" and run["seed"] == 40 and run["images"] == 7
    for record in found:
        path = outdir / record["file"]
        assert record["sha256"] == sha256_file(path) and record["error"] is None and record["model"] == "tiny"
        assert parse_infotext(read_infotext(path))["Seed"] == str(record["seed"])
        assert record["timings"]["sample"] > 0
    # Each image equals what the engine makes for the same request directly.
    owl = next(line for line in jobs.lines if line.id == "owl")
    direct = worker.engine_for("tiny").generate(owl.request(), progress_bar=False)
    assert direct.seeds == [44, 45]
    for k in (0, 1):
        assert np.array_equal(pixels(outdir / f"owl-{k}.png"), np.asarray(direct.images[k]))
    assert (pixels(outdir / "wide-0.png")).shape == (64, 72, 3)


def test_a_failed_line_is_recorded_and_the_rest_go_on(tmp_path: Path, worker: BatchWorker,
                                                       capsys: pytest.CaptureFixture) -> None:
    path = write_jsonl(tmp_path / "jobs.jsonl", [
        {"id": "ok", "prompt": "fine", **SIZE},
        {"id": "bad", "prompt": "missing model", "model": "no-such-folder/model.safetensors", "batch_size": 2, **SIZE},
        {"id": "ok2", "prompt": "fine too", **SIZE},
    ])
    outdir = tmp_path / "out"
    summary = run_batch(read_jobs(path, model="tiny", seed=1), outdir=outdir, backend=_Keep(worker), progress=True)
    assert (summary.written, summary.failed, summary.exit_code) == (2, 2, 1)
    bar = capsys.readouterr().err  # the progress bar counts images, with a rate
    assert "batch: 100%" in bar and "4/4" in bar and "img/s" in bar
    assert summary.line(outdir / "manifest.jsonl").startswith("2 images written, 2 failed of 4 in ")
    found = {(r["id"], r["k"]): r for r in records(outdir)}
    assert set(found) == {("ok", 0), ("ok2", 0), ("bad", 0), ("bad", 1)}
    assert found[("bad", 1)]["file"] is None and "no-such-folder" in found[("bad", 1)]["error"]
    assert found[("bad", 1)]["seed"] == 3
    assert not list(outdir.glob("bad-*"))
    assert "line 2 (id bad) image 0" in summary.errors[0]


def test_interrupt_then_resume_gives_the_same_pixels(tmp_path: Path, worker: BatchWorker) -> None:
    jobs = read_jobs(tiny_jobs(tmp_path), model="tiny", seed=40)
    reference = tmp_path / "reference"
    run_batch(jobs, outdir=reference, backend=_Keep(worker))
    outdir = tmp_path / "out"
    seen = []

    def stop_after_two(record: dict) -> None:
        seen.append(record)
        if len(seen) == 2:
            raise KeyboardInterrupt

    summary = run_batch(jobs, outdir=outdir, backend=_Keep(worker), on_image=stop_after_two)
    assert summary.interrupted and summary.exit_code == 130 and summary.written == 2
    assert len(records(outdir)) == 2
    # A crash meanwhile: a torn last manifest line, and a file written without its record.
    with open(outdir / "manifest.jsonl", "a") as f:
        f.write('{"type": "image", "id": "owl", "k"')
    (outdir / "owl-0.png").write_bytes(b"half a png")

    with pytest.raises(InvalidRequestError, match="already exists: pass --resume"):
        run_batch(jobs, outdir=outdir, backend=_Keep(worker))
    resumed = run_batch(jobs, outdir=outdir, backend=_Keep(worker), resume=True)
    assert (resumed.skipped, resumed.written, resumed.failed, resumed.exit_code) == (2, 5, 0, 0)
    found = records(outdir)
    assert sorted((r["id"], r["k"]) for r in found) == sorted((r["id"], r["k"]) for r in records(reference))
    for record in found:
        assert np.array_equal(pixels(outdir / record["file"]), pixels(reference / record["file"]))
    again = run_batch(jobs, outdir=outdir, backend=_Keep(worker), resume=True)
    assert (again.skipped, again.written) == (7, 0)

    # A changed line cannot be resumed into the same folder.
    changed = write_jsonl(tmp_path / "jobs.jsonl", [{"id": "fox", "prompt": "a blue fox", "batch_size": 2, **SIZE}])
    with pytest.raises(InvalidRequestError, match=r"line 1 \(id fox\) changed"):
        run_batch(read_jobs(changed, model="tiny", seed=40), outdir=outdir, backend=_Keep(worker), resume=True)


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "leansd.frontends.cli", "batch", *args],
                          capture_output=True, text=True, env=env, timeout=300)


def test_cli_validates_everything_first_then_runs_and_resumes(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "ok", **SIZE}) + "\n{oops\n" + json.dumps({"prompt": "x", "width": 7}) + "\n")
    outdir = tmp_path / "out"
    out = _cli(str(bad), "--model", "tiny", "--outdir", str(outdir))
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    assert "2 bad lines, nothing was generated" in out.stderr
    assert f"{bad} line 2: not valid JSON" in out.stderr and f"{bad} line 3: width" in out.stderr
    assert not outdir.exists()

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a fox\na cat\n")
    args = (str(prompts), "--model", "tiny", "--outdir", str(outdir), "--n_iter", "2", "--W", "64", "--H", "64",
            "--steps", "2", "--no-prompt-cache")
    out = _cli(*args)
    assert out.returncode == 0, out.stderr
    assert "base seed" in out.stderr and "4 images written, 0 failed of 4" in out.stderr
    assert sorted(p.name for p in outdir.glob("*.png")) == ["1-0.png", "1-1.png", "2-0.png", "2-1.png"]
    out = _cli(*args)
    assert out.returncode == 2 and "--resume" in out.stderr
    out = _cli(*args, "--resume")
    assert out.returncode == 0 and "0 images written, 4 already done" in out.stderr


def test_workers_without_ray_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from leansd.frontends.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a fox\n")
    assert main(["batch", str(prompts), "--model", "tiny", "--workers", "2"]) == 2
    assert "--workers is for Ray runs" in capsys.readouterr().err


def test_ray_flag_without_ray_says_how_to_install(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from leansd.frontends.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a fox\n")
    assert main(["batch", str(prompts), "--model", "tiny", "--ray"]) == 2
    err = capsys.readouterr().err
    assert "--ray needs Ray, which is not installed: pip install 'leansd[ray]'" in err
    assert "Traceback" not in err and not (tmp_path / "outputs").exists()


def test_serve_ray_flags_without_ray(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    from leansd.frontends.cli import main

    assert main(["serve", "--model", "tiny", "--replicas", "2"]) == 2
    assert "--replicas is for Ray Serve: add --ray" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    assert main(["serve", "--model", "tiny", "--ray", "--replicas", "2"]) == 2
    assert "pip install 'leansd[ray]'" in capsys.readouterr().err


def test_two_runs_on_one_outdir_cannot_interleave(tmp_path: Path, worker: BatchWorker) -> None:
    from leansd.batch.manifest import OutdirLock

    jobs = read_jobs(write_jsonl(tmp_path / "jobs.jsonl", [{"id": "one", "prompt": "a cat", **SIZE}]),
                     model="tiny", seed=3)
    outdir = tmp_path / "out"
    held = OutdirLock(outdir).acquire()  # another run is working in this folder
    try:
        with pytest.raises(InvalidRequestError, match="another batch run is writing to .*out"):
            run_batch(jobs, outdir=outdir, backend=_Keep(worker), model="tiny")
        assert list(outdir.iterdir()) == []  # nothing made, nothing recorded
        with pytest.raises(InvalidRequestError, match="another batch run"):
            run_batch(jobs, outdir=outdir, backend=_Keep(worker), resume=True, model="tiny")
    finally:
        held.release()
    summary = run_batch(jobs, outdir=outdir, backend=_Keep(worker), model="tiny")
    assert (summary.written, summary.exit_code) == (1, 0)
    assert sorted(p.name for p in outdir.iterdir()) == ["manifest.jsonl", "one-0.png"]  # no lock file left
    assert [r["id"] for r in records(outdir)] == ["one"]


def test_cli_batch_finds_loras_in_the_lora_dir_flag(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from tests.helpers import tiny_kohya_lora

    loras = tmp_path / "my-loras"
    loras.mkdir()
    save_file(tiny_kohya_lora(seed=1), str(loras / "ink.safetensors"))
    jobs = write_jsonl(tmp_path / "jobs.jsonl", [{"id": "ink", "prompt": "a red fox <lora:ink:1>", "steps": 2, **SIZE}])
    outdir = tmp_path / "out"
    out = _cli(str(jobs), "--model", "tiny", "--outdir", str(outdir), "--lora-dir", str(loras), "--no-prompt-cache")
    assert out.returncode == 0, out.stderr
    assert parse_infotext(read_infotext(outdir / "ink-0.png"))["Lora hashes"].startswith("ink: ")


def test_a_fresh_run_refuses_to_replace_images_no_manifest_lists(tmp_path: Path, worker: BatchWorker,
                                                                   capsys: pytest.CaptureFixture) -> None:
    from leansd.frontends.cli import main

    path = write_jsonl(tmp_path / "jobs.jsonl", [{"id": "fox", "prompt": "a fox", "batch_size": 2, **SIZE},
                                                 {"id": "cat", "prompt": "a cat", **SIZE}])
    jobs = read_jobs(path, model="tiny", seed=3)
    outdir = tmp_path / "out"
    outdir.mkdir()
    for name in ("fox-1.png", "cat-0.png", "other-0.png"):
        (outdir / name).write_bytes(b"someone else's picture")
    for resume in (False, True):  # without a manifest, --resume has nothing to trust either
        with pytest.raises(InvalidRequestError, match=r"already has 2 images not in a manifest \(fox-1.png, cat-0.png\)"
                           r" that this run would replace: pass --overwrite"):
            run_batch(jobs, outdir=outdir, backend=_Keep(worker), resume=resume)
    assert main(["batch", str(path), "--model", "tiny", "--outdir", str(outdir), "--seed", "3"]) == 2
    assert "already has 2 images not in a manifest" in capsys.readouterr().err
    assert sorted(p.name for p in outdir.iterdir()) == ["cat-0.png", "fox-1.png", "other-0.png"]
    assert {(outdir / n).read_bytes() for n in ("cat-0.png", "fox-1.png")} == {b"someone else's picture"}

    summary = run_batch(jobs, outdir=outdir, backend=_Keep(worker), overwrite=True)
    assert (summary.written, summary.exit_code) == (3, 0)
    assert (outdir / "other-0.png").read_bytes() == b"someone else's picture"  # not this run's: left alone
    for record in records(outdir):
        assert record["sha256"] == sha256_file(outdir / record["file"])
    # With a manifest, --resume replaces a file its record never made it into (a crash in between).
    (outdir / "cat-0.png").write_bytes(b"torn")
    lines = (outdir / "manifest.jsonl").read_text().splitlines()
    (outdir / "manifest.jsonl").write_text("\n".join(text for text in lines if "\"cat\"" not in text) + "\n")
    resumed = run_batch(jobs, outdir=outdir, backend=_Keep(worker), resume=True)
    assert (resumed.skipped, resumed.written) == (2, 1) and (outdir / "cat-0.png").read_bytes() != b"torn"
