"""Job files: formats, one-pass validation with line numbers, fixed seeds, grouping (no model runs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from leansd.batch.jobs import group_lines, read_jobs
from leansd.errors import InvalidRequestError
from leansd.request import DEFAULT_GUIDANCE

from .common import SIZE, write_jsonl


def test_jsonl_ids_seeds_and_image_counts(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "jobs.jsonl", [
        {"id": "a", "prompt": "one", "batch_size": 2, "n_iter": 2, **SIZE},
        {"prompt": "two", "seed": 5, **SIZE},
        {"prompt": "three", "seed": -1, **SIZE},
    ])
    jobs = read_jobs(path, model="tiny", seed=100)
    assert [line.id for line in jobs.lines] == ["a", "2", "3"]
    # A line without a seed gets the base seed plus the images of the lines before it.
    assert [line.seed for line in jobs.lines] == [100, 5, 105]
    assert [line.num_images for line in jobs.lines] == [4, 1, 1]
    assert jobs.num_images == 6 and jobs.seed == 100
    assert jobs.lines[0].request().image_seeds() == [100, 101, 102, 103]
    assert jobs.lines[0].request().sampler == "Euler a"


def test_random_base_seed_is_fixed_before_work(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "jobs.jsonl", [{"prompt": "one", **SIZE}, {"prompt": "two", **SIZE}])
    jobs = read_jobs(path, model="tiny", seed=None)
    assert 0 <= jobs.seed < 2**32 - 1
    assert [line.seed for line in jobs.lines] == [jobs.seed, jobs.seed + 1]
    # The same file and seed give the same lines (the fingerprint resume relies on).
    again = read_jobs(path, model="tiny", seed=jobs.seed)
    assert [line.fingerprint for line in again.lines] == [line.fingerprint for line in jobs.lines]


def test_every_bad_line_is_reported_at_once(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    outside = tmp_path.parent / "outside.png"
    Image.new("RGB", (64, 64)).save(outside)
    path = tmp_path / "sub" / "jobs.jsonl"
    path.write_text("\n".join([
        json.dumps({"prompt": "fine", **SIZE}),
        "{not json",
        json.dumps({"prompt": "typo", "step": 3}),
        json.dumps({"prompt": "odd size", "width": 65}),
        json.dumps({"prompt": "sampler", "sampler_name": "Nope"}),
        json.dumps({"id": "fine", "prompt": "no"}),
        json.dumps({"id": "x", "prompt": "dup", **SIZE}),
        json.dumps({"id": "x", "prompt": "dup", **SIZE}),
        json.dumps({"prompt": "missing", "init_image": "nothere.png"}),
        json.dumps({"prompt": "escape", "init_image": "../../outside.png"}),
        json.dumps({"id": "../evil", "prompt": "bad id"}),
        json.dumps([1, 2]),
        json.dumps({"prompt": "steps", "steps": "many"}),
    ]) + "\n")
    with pytest.raises(InvalidRequestError) as caught:
        read_jobs(path, model="tiny", seed=1)
    message = str(caught.value)
    assert "10 bad lines, nothing was generated" in message
    expected = {
        2: "not valid JSON",
        3: "unknown field 'step'",
        4: "width must be a multiple of 8, got 65",
        5: "unknown sampler",
        8: "id 'x' is already used by line 7",
        9: "nothere.png: no such file",
        10: "leaves the job file's folder",
        11: "cannot name a file",
        12: "expected a JSON object, got list",
        13: "steps: Input should be a valid integer",
    }
    for number, text in expected.items():
        entry = next((row for row in message.splitlines() if row.strip().startswith(f"line {number}:")), "")
        assert text in entry, (number, entry)
    # line 6 names the id of line 1 only as a string id: it is "fine" vs line 1's id "1": no clash.
    assert "line 6: id 'fine' is already used" not in message


def test_csv_and_prompt_files(tmp_path: Path) -> None:
    csv_path = tmp_path / "jobs.csv"
    csv_path.write_text('id,prompt,seed,width,height,steps,cfg_scale\n'
                        'a,"a fox, in snow",3,64,64,2,5.5\n'
                        '\n'
                        'b,a cat,,64,72,2,\n')
    jobs = read_jobs(csv_path, model="tiny", seed=10)
    assert [(job.id, job.line, job.seed, job.width, job.height) for job in jobs.lines] == [("a", 2, 3, 64, 64), ("b", 4, 11, 64, 72)]
    first = jobs.lines[0].request()
    assert first.prompt == "a fox, in snow" and first.guidance_scale == 5.5
    assert jobs.lines[1].request().guidance_scale == DEFAULT_GUIDANCE  # the HTTP API's default for an empty cell

    bad = tmp_path / "bad.csv"
    bad.write_text("prompt,width\nok,64\ntoo,many,cells\nodd,66\n")
    with pytest.raises(InvalidRequestError, match=r"(?s)line 3: 3 cells.*line 4: width must be a multiple of 8"):
        read_jobs(bad, model="tiny", seed=1)

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a fox\n\n  a cat  \n")
    jobs = read_jobs(prompts, model="tiny", seed=0, defaults={"n_iter": 3, "steps": 2, "width": 64, "height": 64})
    assert [(job.id, job.body["prompt"], job.num_images, job.seed) for job in jobs.lines] == [("1", "a fox", 3, 0), ("3", "a cat", 3, 3)]

    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(InvalidRequestError, match="holds no jobs"):
        read_jobs(empty, model="tiny")


def test_images_relative_to_the_job_file_and_models_per_line(tmp_path: Path) -> None:
    Image.new("RGB", (64, 64), "red").save(tmp_path / "init.png")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    mask.save(tmp_path / "mask.png")
    path = write_jsonl(tmp_path / "jobs.jsonl", [
        {"prompt": "img", "init_images": ["init.png"], "denoising_strength": 0.5, **SIZE},
        {"prompt": "inpaint", "init_image": "init.png", "mask": "mask.png", **SIZE},
        {"prompt": "other model", "model": "other", **SIZE},
        {"prompt": "big", **{**SIZE, "width": 128}},
        {"prompt": "small again", **SIZE},
    ])
    jobs = read_jobs(path, model="tiny", seed=0)
    first, second = jobs.lines[0].request(), jobs.lines[1].request()
    assert first.task == "img2img" and first.strength == 0.5 and first.init_image.getpixel((0, 0)) == (255, 0, 0)
    assert second.task == "inpaint"
    assert jobs.lines[0].body["init_images"] == [str(tmp_path / "init.png")]
    # Grouped by reload key (model, size), file order inside a group.
    assert [job.line for job in group_lines(jobs.lines)] == [1, 2, 5, 3, 4]
    assert jobs.lines[2].model == "other"


def test_a_line_needs_a_model(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "jobs.jsonl", [{"prompt": "x", **SIZE}])
    with pytest.raises(InvalidRequestError, match="line 1: no model"):
        read_jobs(path, model=None, seed=0)
    jobs = read_jobs(write_jsonl(tmp_path / "j2.jsonl", [
        {"prompt": "x", "override_settings": {"sd_model_checkpoint": "tiny"}, **SIZE}]), model=None, seed=0)
    assert jobs.lines[0].model == "tiny"


def test_ids_differing_only_in_case_are_one_id(tmp_path: Path) -> None:
    # "Cat-0.png" and "cat-0.png" are one file on case-insensitive file systems (macOS, Windows).
    path = write_jsonl(tmp_path / "jobs.jsonl", [
        {"id": "Cat", "prompt": "one", **SIZE},
        {"id": "cat", "prompt": "two", **SIZE},
    ])
    with pytest.raises(InvalidRequestError) as caught:
        read_jobs(path, model="tiny", seed=1)
    assert "line 2: id 'cat' is already used by line 1" in str(caught.value)


def test_resume_trusts_only_this_folders_own_image_files(tmp_path: Path) -> None:
    from leansd.batch.manifest import Manifest, sha256_file

    outdir = tmp_path / "out"
    outdir.mkdir()
    outside = tmp_path / "elsewhere.png"
    outside.write_bytes(b"not ours")
    (outdir / "a-0.png").write_bytes(b"png a")
    (outdir / "b-0.png").write_bytes(b"png b")
    manifest = Manifest(outdir)
    manifest.append({"type": "run", "seed": 1})
    manifest.append({"type": "image", "id": "a", "k": 0, "file": "a-0.png", "sha256": sha256_file(outdir / "a-0.png"),
                     "error": None})
    # A record pointing outside the folder, one naming another id's file, one with a k that is no number.
    manifest.append({"type": "image", "id": "x", "k": 0, "file": "../elsewhere.png", "sha256": sha256_file(outside),
                     "error": None})
    manifest.append({"type": "image", "id": "c", "k": 0, "file": "b-0.png", "sha256": sha256_file(outdir / "b-0.png"),
                     "error": None})
    manifest.append({"type": "image", "id": "b", "k": "zero", "file": "b-0.png", "error": None})
    resume = manifest.load_resume()
    assert sorted(resume.done) == [("a", 0)] and resume.run == {"type": "run", "seed": 1}
