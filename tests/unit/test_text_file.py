"""Reading a user's text file (prompt file, job file): the text, or one line naming what is wrong."""

from pathlib import Path

import pytest

from leansd.errors import InvalidRequestError
from leansd.inputs.text import read_text_file


def test_reads_utf8_and_drops_a_byte_order_mark(tmp_path: Path) -> None:
    path = tmp_path / "prompts.txt"
    path.write_bytes("\ufeffa red fox\nun café\n".encode())
    assert read_text_file(path, label="--from-file") == "a red fox\nun café\n"


@pytest.mark.parametrize("case", ["missing", "folder", "not utf-8"])
def test_each_failure_is_one_line_with_the_label_and_path(tmp_path: Path, case: str) -> None:
    path = tmp_path / "jobs.jsonl"
    expected = {"missing": "no such file", "folder": "is a folder, expected a text file",
                "not utf-8": "cannot read it"}[case]
    if case == "folder":
        path.mkdir()
    elif case == "not utf-8":
        path.write_bytes(b"\xff\xfe\xfa prompt")
    with pytest.raises(InvalidRequestError) as info:
        read_text_file(path, label="job file")
    message = str(info.value)
    assert message.startswith(f"job file {path}: {expected}") and "\n" not in message
