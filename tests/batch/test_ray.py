"""`leansd batch --ray` on a real single-node Ray cluster started here, with the tiny model.

The cluster is the session's `ray_cluster` (tests/batch/conftest.py): two CPUs and two logical GPUs,
so a CPU machine exercises one-actor-per-GPU scheduling.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'leansd[ray]'); Ray tests skipped")

from leansd.batch.jobs import read_jobs  # noqa: E402
from leansd.batch.ray_backend import RayBackend  # noqa: E402
from leansd.batch.runner import LocalBackend, run_batch  # noqa: E402
from leansd.batch.worker import BatchWorker  # noqa: E402
from leansd.errors import InvalidRequestError  # noqa: E402

from .common import SIZE, load_engine, records, tiny_jobs  # noqa: E402

OPTIONS = {"device": "cpu", "prompt_cache": False}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same job file run locally: the pixels every Ray run must reproduce."""
    folder = tmp_path_factory.mktemp("ray-jobs")
    jobs = read_jobs(tiny_jobs(folder), model="tiny", seed=40)
    outdir = folder / "local"
    run_batch(jobs, outdir=outdir, backend=LocalBackend(BatchWorker(engine_options=OPTIONS, load=load_engine)))
    return jobs, {(r["id"], r["k"]): r["sha256"] for r in records(outdir)}


def _hashes(outdir: Path) -> dict:
    found = [r for r in records(outdir) if r["error"] is None]
    keys = [(r["id"], r["k"]) for r in found]
    assert len(keys) == len(set(keys)), "an image is recorded twice"
    assert sorted(p.name for p in outdir.glob("*.png")) == sorted(r["file"] for r in found)
    return {(r["id"], r["k"]): r["sha256"] for r in found}


def test_one_actor_per_gpu_a_killed_actor_and_a_line_that_kills_every_worker(
        ray_cluster, reference, tmp_path: Path) -> None:
    """Pixels equal the local run, every image once, although workers die along the way."""
    jobs, expected = reference
    with pytest.raises(InvalidRequestError, match="--workers 3 needs 3 GPUs"):
        RayBackend.connect(None, workers=3, engine_options=OPTIONS)
    path = tmp_path / "jobs.jsonl"
    path.write_text(jobs.path.read_text())
    shutil.copy(jobs.path.parent / "init.png", tmp_path / "init.png")
    with open(path, "a") as f:
        f.write(json.dumps({"id": "poison", "prompt": "x", "model": "crash", **SIZE}) + "\n")
    poisoned = read_jobs(path, model="tiny", seed=40)
    assert {line.id: line.seed for line in poisoned.lines if line.id != "poison"} == \
        {line.id: line.seed for line in jobs.lines}
    backend = RayBackend.connect(None, workers=None, engine_options=OPTIONS, load=load_engine)
    assert (backend.workers, backend.gpus_per_worker, backend.cpus_per_worker) == (2, 1, 1)
    info = backend.start()
    assert sorted(i["gpu_ids"][0] for i in info) == ["0", "1"] and len({i["pid"] for i in info}) == 2
    killed = []

    def kill_one(record: dict) -> None:
        if not killed and backend.actors:
            killed.append(backend.actors[-1])
            ray.kill(backend.actors[-1], no_restart=True)

    summary = run_batch(poisoned, outdir=tmp_path / "out", backend=backend, on_image=kill_one)
    assert killed and backend.deaths >= 3  # two for the poison line, one killed here
    assert (summary.written, summary.failed, summary.exit_code) == (7, 1, 1)
    assert _hashes(tmp_path / "out") == expected
    failed = [r for r in records(tmp_path / "out") if r["error"] is not None]
    assert [(r["id"], r["k"]) for r in failed] == [("poison", 0)]
    assert "died 2 times" in failed[0]["error"]
    assert backend.actors == []  # closed: the actors are gone


def test_interrupted_ray_run_resumes_to_the_same_pixels(ray_cluster, reference, tmp_path: Path) -> None:
    jobs, expected = reference
    outdir = tmp_path / "out"
    # CPU actors with one torch thread each, as the local run: the thread count can change the
    # last bits of CPU convolutions, so bit-equal pixels need the same count.
    backend = RayBackend(workers=1, engine_options=OPTIONS, gpus_per_worker=0, cpus_per_worker=1, load=load_engine)
    seen = []

    def interrupt(record: dict) -> None:
        seen.append(record)
        if len(seen) == 2:
            raise KeyboardInterrupt

    summary = run_batch(jobs, outdir=outdir, backend=backend, on_image=interrupt)
    assert summary.interrupted and summary.exit_code == 130 and backend.actors == []
    assert len(records(outdir)) == 2
    backend = RayBackend(workers=1, engine_options=OPTIONS, gpus_per_worker=0, cpus_per_worker=1, load=load_engine)
    resumed = run_batch(jobs, outdir=outdir, backend=backend, resume=True)
    assert (resumed.skipped, resumed.written, resumed.exit_code) == (2, 5, 0)
    assert _hashes(outdir) == expected


def test_ray_workers_apply_the_vae_as_the_local_run(ray_cluster, tmp_path: Path) -> None:
    from leansd.models.tiny import write_tiny_single_file
    from tests.test_cli_library import write_vae

    checkpoint = write_tiny_single_file(tmp_path / "m.safetensors")
    vae = write_vae(tmp_path / "other.vae.safetensors", seed=5)
    path = tmp_path / "jobs.jsonl"
    path.write_text(json.dumps({"id": "fox", "prompt": "a red fox", "seed": 5, **SIZE}) + "\n")
    jobs = read_jobs(path, model=str(checkpoint))
    local, plain = tmp_path / "local", tmp_path / "plain"
    run_batch(jobs, outdir=local, backend=LocalBackend(BatchWorker(engine_options=OPTIONS, vae=str(vae))), vae=str(vae))
    run_batch(jobs, outdir=plain, backend=LocalBackend(BatchWorker(engine_options=OPTIONS)))
    backend = RayBackend(workers=1, engine_options=OPTIONS, gpus_per_worker=0, cpus_per_worker=1, vae=str(vae))
    summary = run_batch(jobs, outdir=tmp_path / "ray", backend=backend, vae=str(vae))
    assert summary.exit_code == 0
    [on_ray] = records(tmp_path / "ray")
    assert (on_ray["vae"], on_ray["sha256"]) == ("other.vae.safetensors", records(local)[0]["sha256"])
    assert on_ray["sha256"] != records(plain)[0]["sha256"]
