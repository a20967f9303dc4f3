"""`leansd batch` throughput: this process vs Ray with 1 and 2 workers on the same machine.

    python bench/batch.py                        # tiny model and full-size SD 1.5 (random weights)
    python bench/batch.py --models tiny --jobs 24 --rounds 3
    python bench/batch.py --models sd15 --size 128 --steps 4 --jobs 4

Every configuration runs the same job lines (one image each) through `leansd.batch.runner.run_batch`,
so files, manifest and sha256 are written as in a real run:
- local: `LocalBackend` in this process, `--threads` torch threads (default 1);
- ray-1: `RayBackend` with one worker actor, `--threads` torch threads: local's competitor;
- ray-2: two worker actors, `--threads` torch threads each.
One thread per process is the default because on a small shared CPU two threads per process are
slower than one (threads wait on each other whenever another process takes a core).
Backends are started once and kept; rounds interleave the configurations (rotating their order) so
a busy machine slows them alike. For the full-size model, which costs ~4.3 GB per worker in fp32,
local and ray-1 are interleaved first, then ray-2 runs alone (RAM). "start-up" is the time to the
first finished image of a fresh backend: Ray actor start, imports and model load included (Ray's
own cluster start is listed separately). "overhead/img" is (ray-1 - local) time per image.
"CPU s/image" is CPU time (user + system) per image: of the thread that runs the local backend
(it computes and writes every image) for local; of this process and all its descendants (the Ray
driver's threads, Ray's daemons and actors, which the driver started) for Ray, so the Ray rows carry
every cost Ray adds, idle polling included. "outside worker s/img" is the run's wall time less the
time the workers spent on its lines as they timed themselves (the manifest's `timings.line`): for
local, the runner's own work (PNG, hash, manifest); for Ray, that plus scheduling, transfer and
result handling. Ray's added per-image cost is the difference between the two, measured around the
same images, so the compute's own variation (the largest noise on a shared machine) drops out. On a shared machine
wall time measures the neighbours as much as Ray; CPU time is what the run itself costs, so the CPU
overhead column is the per-image cost Ray adds that other processes cannot hide or inflate.
Prints markdown; never asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import machine_lines, markdown_table  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SD15 = "sd15-random"


def load_engine(model: str, **options: Any) -> Any:
    """Engine loader for every backend (and inside the Ray actors): "sd15-random" or a real model."""
    from leansd.engine.engine import Engine

    if model == SD15:
        from bench.common import build_sd15_components, sd15_bundle

        return Engine(sd15_bundle(build_sd15_components(seed=0), name=SD15), **options)
    return Engine.load(model, **options)


class _Kept:
    """Keeps a backend's workers between rounds; `really_close()` at the end."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend

    def run(self, lines: list) -> Any:
        return self.backend.run(lines)

    def close(self) -> None:
        pass

    def really_close(self) -> None:
        self.backend.close()


def write_jobs(folder: Path, *, count: int, size: int, steps: int, first: int) -> Path:
    path = folder / f"jobs-{first}.jsonl"
    with open(path, "w") as f:
        for i in range(count):
            f.write(json.dumps({"id": f"j{first + i}", "prompt": f"a photograph of an astronaut riding a horse {i}",
                                "seed": first + i, "width": size, "height": size, "steps": steps,
                                "sampler_name": "Euler a"}) + "\n")
    return path


def tree_cpu_seconds() -> float:
    """CPU seconds (user + system) used so far by this process and every live descendant of it.

    Ray's daemons (GCS, raylet, agents) and its worker actors are descendants of the driver that
    started the cluster, so for a Ray run this counts everything the run costs on this machine.
    Reads /proc (Linux)."""
    tick = os.sysconf("SC_CLK_TCK")
    parent: dict[int, int] = {}
    used: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent[int(entry)] = int(fields[1])
        used[int(entry)] = (int(fields[11]) + int(fields[12])) / tick
    me = os.getpid()
    total = 0.0
    for pid, seconds in used.items():
        p = pid
        while p > 1 and p != me:
            p = parent.get(p, 0)
        if p == me:
            total += seconds
    return total


def timed_run(backend: Any, jobs_path: Path, model: str, workdir: Path, *,
              tree: bool = False) -> tuple[float, float, float, int]:
    """(wall seconds, CPU seconds, wall seconds outside the workers' own line timings, images written) of
    one run. CPU: this thread alone for a local run
    (it computes and writes every image; the Ray driver's own threads, which live in this process
    because the cluster is up, are not the local run's cost), or this process and every descendant
    process (`tree`: a Ray run, the driver's threads, the daemons and the actors included)."""
    from leansd.batch.jobs import read_jobs
    from leansd.batch.runner import run_batch

    jobs = read_jobs(jobs_path, model=model, seed=0)
    outdir = Path(tempfile.mkdtemp(dir=workdir))
    cpu = tree_cpu_seconds if tree else time.thread_time
    cpu0, start = cpu(), time.perf_counter()
    summary = run_batch(jobs, outdir=outdir, backend=backend)
    seconds, cpu_seconds = time.perf_counter() - start, cpu() - cpu0
    in_worker = worker_seconds(outdir / "manifest.jsonl")
    shutil.rmtree(outdir)
    if summary.failed:
        raise SystemExit(f"bench run failed: {summary.errors[:3]}")
    return seconds, cpu_seconds, seconds - in_worker, summary.written


def worker_seconds(manifest: Path) -> float:
    """Seconds the workers spent on the run's lines, as they timed themselves (`timings.line` of each
    line's manifest records, counted once per line)."""
    lines: dict[str, float] = {}
    with open(manifest) as f:
        for text in f:
            record = json.loads(text)
            if "timings" in record and "id" in record:
                lines[record["id"]] = float(record["timings"].get("line", 0.0))
    return sum(lines.values())


def make_backend(name: str, *, threads: int, options: dict[str, Any]) -> Any:
    import torch

    from leansd.batch.ray_backend import RayBackend
    from leansd.batch.runner import LocalBackend
    from leansd.batch.worker import BatchWorker

    if name == "local":
        torch.set_num_threads(threads)
        return _Kept(LocalBackend(BatchWorker(engine_options=options, load=load_engine)))
    workers = int(name.split("-")[1])
    return _Kept(RayBackend(workers=workers, engine_options=options, gpus_per_worker=0,
                            cpus_per_worker=threads, load=load_engine))


def bench_model(model: str, *, label: str, groups: list[list[str]], jobs: int, rounds: int, size: int, steps: int,
                threads: int, workdir: Path) -> list[list[Any]]:
    options = {"device": "cpu", "precision": "full", "prompt_cache": False}
    startup: dict[str, float] = {}
    times: dict[str, list[float]] = {}
    cpu_times: dict[str, list[float]] = {}
    outside: dict[str, list[float]] = {}
    counter = 1000
    for group in groups:
        backends = {}
        for name in group:
            print(f"[{label}] starting {name} ...", file=sys.stderr, flush=True)
            backend = make_backend(name, threads=threads, options=options)
            warm = write_jobs(workdir, count=1, size=size, steps=steps, first=counter)
            counter += 1
            t0 = time.perf_counter()
            if name != "local":
                backend.backend.start()
            timed_run(backend, warm, model, workdir, tree=name != "local")
            startup[name] = time.perf_counter() - t0
            backends[name] = backend
        for r in range(rounds):
            order = group[r % len(group):] + group[:r % len(group)]
            for name in order:
                path = write_jobs(workdir, count=jobs, size=size, steps=steps, first=counter)
                counter += jobs
                seconds, cpu_seconds, gap, written = timed_run(backends[name], path, model, workdir,
                                                               tree=name != "local")
                times.setdefault(name, []).append(seconds / written)
                cpu_times.setdefault(name, []).append(cpu_seconds / written)
                outside.setdefault(name, []).append(gap / written)
                print(f"[{label}] round {r + 1} {name}: {written} images in {seconds:.1f} s "
                      f"(CPU {cpu_seconds:.1f} s)", file=sys.stderr, flush=True)
        for backend in backends.values():
            backend.really_close()
    local = statistics.median(times["local"])
    local_cpu = statistics.median(cpu_times["local"])
    local_out = statistics.median(outside["local"])
    rows = []
    for name in ("local", "ray-1", "ray-2"):
        if name not in times:
            continue
        per = statistics.median(times[name])
        per_cpu = statistics.median(cpu_times[name])
        per_out = statistics.median(outside[name])
        overhead = cpu_overhead = out_overhead = ""
        if name == "ray-1":
            overhead = f"{per - local:+.3f} s ({(per / local - 1) * 100:+.1f} %)"
            cpu_overhead = f"{per_cpu - local_cpu:+.3f} s ({(per_cpu / local_cpu - 1) * 100:+.1f} %)"
            added = per_out - local_out
            out_overhead = f"{added:+.3f} s ({added / local * 100:+.1f} % of local s/image)"
        rows.append([label, name, f"{1 / per:.2f}", f"{per:.2f}", f"{local / per:.2f}x", overhead,
                     f"{per_cpu:.2f}", cpu_overhead,
                     "" if name == "ray-2" else f"{per_out:.3f}",  # ray-2: the two workers' lines overlap
                     out_overhead, f"{startup[name]:.1f}"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,sd15", help="comma list of tiny, sd15 (default both)")
    parser.add_argument("--jobs", type=int, default=0, help="images per round (default: tiny 16, sd15 4)")
    parser.add_argument("--rounds", type=int, default=0, help="interleaved rounds (default: tiny 3, sd15 2)")
    parser.add_argument("--size", type=int, default=128, help="width and height (default 128)")
    parser.add_argument("--steps", type=int, default=0, help="steps (default: tiny 8, sd15 4)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker process (default 1)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # Ray runs its workers at nice 15, so on a shared machine every other process goes first; the
    # local run has nice 0. Same priority for both, or the table measures the neighbours.
    os.environ.setdefault("RAY_worker_niceness", "0")
    import ray

    cores = os.cpu_count() or 1
    pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    t0 = time.perf_counter()
    # Logical CPUs for the ray-1 and ray-2 actors alive at once (they never run at once).
    ray.init(num_cpus=max(cores, 3 * args.threads), include_dashboard=False, log_to_driver=False, logging_level="WARNING",
             runtime_env={"env_vars": {"PYTHONPATH": pythonpath}})
    ray_start = time.perf_counter() - t0
    time.sleep(5)  # let the fresh cluster settle, then measure what its idle daemons cost
    idle_cpu0, idle_t0 = tree_cpu_seconds() - time.process_time(), time.perf_counter()
    time.sleep(10)
    idle_share = (tree_cpu_seconds() - time.process_time() - idle_cpu0) / (time.perf_counter() - idle_t0)
    rows = []
    with tempfile.TemporaryDirectory(prefix="leansd-bench-batch-") as folder:
        workdir = Path(folder)
        for model in args.models.split(","):
            if model == "tiny":
                rows += bench_model("tiny", label="tiny", groups=[["local", "ray-1", "ray-2"]],
                                    jobs=args.jobs or 16, rounds=args.rounds or 3, size=args.size,
                                    steps=args.steps or 8, threads=args.threads, workdir=workdir)
            elif model == "sd15":
                rows += bench_model(SD15, label="SD 1.5 (random weights)", groups=[["local", "ray-1"], ["ray-2"]],
                                    jobs=args.jobs or 4, rounds=args.rounds or 2, size=args.size,
                                    steps=args.steps or 4, threads=args.threads, workdir=workdir)
            else:
                raise SystemExit(f"unknown model {model!r}; valid: tiny, sd15")
    ray.shutdown()
    print(f"## leansd batch: local vs Ray (bench/batch.py), {args.size}x{args.size}, fp32, CPU, "
          f"{args.threads} torch thread(s) per worker\n")
    print(machine_lines())
    print(f"- Ray {ray.__version__}: single-node cluster started in {ray_start:.1f} s (not in the table); "
          f"worker niceness {os.environ['RAY_worker_niceness']}; its idle daemons used {idle_share * 100:.1f} % "
          f"of one core (counted in the Ray rows' CPU time)\n")
    print(markdown_table(["model", "backend", "images/s", "s/image", "vs local", "Ray overhead/img (ray-1)",
                          "CPU s/image", "Ray CPU overhead/img (ray-1)", "outside worker s/img",
                          "Ray added outside the worker (ray-1)", "start-up s"], rows))


if __name__ == "__main__":
    main()
