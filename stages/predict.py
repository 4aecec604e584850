"""Classify image files with the exported model: `python -m stages.predict IMG...` (or `image-predict`).

Prints one line per image: path, label, score.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from stages.dataformat import EXPORT_DIR, decode_rgb
from stages.errors import PipelineError, run_stage


def classify(model_dir: Path, paths: list[Path], top_k: int = 1) -> list[list[dict]]:
    if not (model_dir / "config.json").exists():
        raise PipelineError(f"{model_dir} holds no model; run the pipeline first (dvc repro) or pass --model DIR")
    for path in paths:
        if not path.is_file():
            raise PipelineError(f"{path}: no such image file")
    images = [decode_rgb(path.read_bytes(), str(path), "give an image file (JPEG, PNG, BMP, GIF, WebP or TIFF)") for path in paths]
    # Imported here, so `--help` and a wrong path answer at once.
    from transformers import pipeline

    import stages.efficientnet_lite  # noqa: F401  (registers EfficientNet-Lite, should the model be one)
    from stages.modeling import quiet_transformers

    quiet_transformers()
    results = pipeline("image-classification", model=str(model_dir))(images, top_k=top_k)
    return [results] if top_k and len(images) == 1 and isinstance(results[0], dict) else results


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
