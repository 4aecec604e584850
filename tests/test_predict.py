"""`image-predict`: what it prints, and its refusals: one line about the file or folder it was given."""
from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT


def predict(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stages.predict", *args], cwd=ROOT, capture_output=True, text=True)


@pytest.mark.parametrize("case", ["text-named-jpg", "missing-file", "no-model"])
def test_a_bad_argument_is_one_line_about_what_was_given(case, exported_tiny_vit, tmp_path):
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    args, says = {
        "text-named-jpg": ([str(text), "--model", str(exported_tiny_vit)], f"image {text} cannot be decoded"),
        "missing-file": ([str(tmp_path / "gone.png"), "--model", str(exported_tiny_vit)], f"{tmp_path / 'gone.png'}: no such image file"),
        "no-model": ([str(text), "--model", str(tmp_path)], f"{tmp_path} holds no exported model"),
    }[case]
    done = predict(*args)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and says in lines[0], done.stderr
    assert "data.source" not in lines[0]  # it speaks of the file it was given, not of the pipeline's data


def test_it_prints_each_images_label_and_score_as_the_runtime_gives_them(exported_tiny_vit, small_tree):
    from stages.dataformat import decode_rgb
    from stages.runtime import ImageClassifier

    images = sorted((small_tree / "test/ship").glob("*.jpg"))[:2]
    done = predict(*map(str, images), "--model", str(exported_tiny_vit), "--top-k", "2")
    assert done.returncode == 0 and done.stderr == "", done.stderr
    expected = ImageClassifier.load(exported_tiny_vit).classify([decode_rgb(p.read_bytes(), str(p)) for p in images], top_k=2)
    assert done.stdout.splitlines() == ["\t".join([str(p)] + [f"{r['label']}\t{r['score']:.4f}" for r in rs]) for p, rs in zip(images, expected)]


def test_classifying_imports_neither_torch_nor_transformers(exported_tiny_vit, small_tree):
    image = next((small_tree / "test/ship").glob("*.jpg"))
    code = f"import sys; from stages.predict import main; main([{str(image)!r}, '--model', {str(exported_tiny_vit)!r}]); print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.splitlines()[-1] == "[]", done.stdout
