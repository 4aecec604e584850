"""Classify image files with the exported model: `python -m stages.predict IMG...` (or `image-predict`).

Prints one line per image: path, label, score. Runs the model's ONNX graph (stages/runtime.py): no
torch or transformers to import, so one photo takes well under a second.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from stages.dataformat import EXPORT_DIR, decode_rgb
from stages.errors import PipelineError, run_stage
from stages.runtime import ONNX_FILE, ImageClassifier


def classify(model_dir: Path, paths: list[Path], top_k: int = 1) -> list[list[dict]]:
    if not (model_dir / ONNX_FILE).exists():
        raise PipelineError(f"{model_dir} holds no exported model ({ONNX_FILE}); run the pipeline first (dvc repro) or pass --model DIR")
    for path in paths:
        if not path.is_file():
            raise PipelineError(f"{path}: no such image file")
    images = [decode_rgb(path.read_bytes(), str(path), "give an image file (JPEG, PNG, BMP, GIF, WebP or TIFF)") for path in paths]
    return ImageClassifier.load(model_dir).classify(images, top_k)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="+", type=Path, help="image files")
    parser.add_argument("--model", type=Path, default=EXPORT_DIR, help=f"exported model directory (default {EXPORT_DIR})")
    parser.add_argument("--top-k", type=int, default=1, help="labels per image")
    args = parser.parse_args(argv)
    for path, results in zip(args.images, classify(args.model, args.images, args.top_k)):
        print("\t".join([str(path)] + [f"{r['label']}\t{r['score']:.4f}" for r in results]))


def cli() -> None:
    run_stage(main)


if __name__ == "__main__":
    cli()
