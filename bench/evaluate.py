"""Evaluation benchmark: batched inference from uint8 tensors (the evaluate stage) versus the seed's
`pipeline("image-classification")` called image by image, same model directory, same images.

Run: python -m bench.evaluate [--images 128]   -> bench/results/evaluate.md
"""
from __future__ import annotations

import argparse
import io
import tempfile
from pathlib import Path

from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline

import stages.efficientnet_lite  # noqa: F401  (registers EfficientNet-Lite with the Auto classes)
from bench.common import cifar_images, cifar_work_dir, median_seconds, write_result
from bench.models import ARCHITECTURES, save_model
from stages.dataformat import read_raw
from stages.hardware import pick_device
from stages.modeling import PixelTransform, forward_batches


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    n = args.images
    split = cifar_images(n, "test")
    files = [Image.open(io.BytesIO(data)) for data in read_raw("test", cifar_work_dir() / "data/raw")["image"][:n]]
    device = pick_device()
    rows = []
    for arch in ARCHITECTURES:
        model_dir = save_model(arch, Path(tempfile.mkdtemp()) / arch)
        classify = pipeline("image-classification", model=str(model_dir), device=device)
        model = AutoModelForImageClassification.from_pretrained(model_dir)
        transform = PixelTransform(AutoImageProcessor.from_pretrained(model_dir))

        def seed() -> None:
            for image in files:
                classify(image)

        def ours() -> None:
            for _ in forward_batches(model, transform, split.pixels, args.batch_size, device, arch):
                pass

        seed_s, ours_s = median_seconds(seed), median_seconds(ours)
        rows.append({
            "model (224×224)": arch,
            "seed: pipeline per image, images/s": f"{n / seed_s:.1f}",
            f"ours: batched uint8 -> {precision}, images/s": f"{n / ours_s:.1f}",
            "speed-up": f"**{seed_s / ours_s:.1f}×**",
        })
    notes = [f"{n} CIFAR-10 test images (JPEG files for the pipeline, stored uint8 tensors for ours), batch {args.batch_size}, "
             f"device {device}; median of 3 runs after a warm-up. bf16 is used only where the hardware runs it natively."]
    write_result("evaluate", "Evaluation throughput: seed recipe versus this project", rows, notes)


if __name__ == "__main__":
    main()
