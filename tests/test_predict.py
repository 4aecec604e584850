"""`image-predict`'s refusals: one line about the file or folder it was given, before any model loads."""
from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT


def predict(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stages.predict", *args], cwd=ROOT, capture_output=True, text=True)


@pytest.mark.parametrize("case", ["text-named-jpg", "missing-file", "no-model"])
def test_a_bad_argument_is_one_line_about_what_was_given(case, tiny_vit, tmp_path):
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    args, says = {
        "text-named-jpg": ([str(text), "--model", str(tiny_vit)], f"image {text} cannot be decoded"),
        "missing-file": ([str(tmp_path / "gone.png"), "--model", str(tiny_vit)], f"{tmp_path / 'gone.png'}: no such image file"),
        "no-model": ([str(text), "--model", str(tmp_path)], f"{tmp_path} holds no model"),
    }[case]
    done = predict(*args)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and says in lines[0], done.stderr
    assert "data.source" not in lines[0]  # it speaks of the file it was given, not of the pipeline's data
