"""The web UI's LoRA and embedding lists: the choices come from the library, the buttons edit the prompt."""

from __future__ import annotations

from pathlib import Path

import pytest

from leansd.frontends.webui import add_to_prompt, library_choices


@pytest.mark.parametrize(
    ("prompt", "text", "expected"),
    [
        ("", "<lora:ink:1>", "<lora:ink:1>"),
        (None, "badhands", "badhands"),
        ("a cat", "<lora:ink:1>", "a cat, <lora:ink:1>"),
        ("a cat,", "badhands", "a cat, badhands"),
        ("a cat, ", "badhands", "a cat, badhands"),
        ("a cat", "", "a cat"),
    ],
)
def test_add_to_prompt(prompt, text, expected):
    assert add_to_prompt(prompt, text) == expected


def test_choices_come_from_the_library(tmp_path: Path):
    from leansd.engine.engine import Engine
    from leansd.frontends.webui import build_ui
    from leansd.models.library import ModelLibrary
    from leansd.service.queue import JobQueue
    from tests.helpers import tiny_bundle

    for rel in ("models/Lora/ink.safetensors", "models/Lora/sub/wave.pt", "embeddings/badhands.pt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    engine = Engine(tiny_bundle(), device="cpu", precision="full", prompt_cache=False,
                    library=ModelLibrary(data_dir=tmp_path))
    assert library_choices(engine) == (["ink", "wave"], ["badhands"])
    blocks = build_ui(JobQueue(engine))
    dropdowns = {c.elem_id: c for c in blocks.blocks.values() if getattr(c, "elem_id", None) in
                 ("txt2img_lora", "txt2img_embedding", "img2img_lora")}
    assert [choice[0] for choice in dropdowns["txt2img_lora"].choices] == ["ink", "wave"]
    assert [choice[0] for choice in dropdowns["txt2img_embedding"].choices] == ["badhands"]
    assert "img2img_lora" in dropdowns
