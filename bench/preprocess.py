"""Preprocess benchmark: this project's stage versus the seed recipe, on the same CIFAR-10 images.

Seed: `datasets.map(ViTImageProcessor, batched=True, batch_size=32)` stored as float32 224×224.
Ours: decode into uint8 at native size (stages.preprocess.to_tensors) and save as safetensors.
Then the whole preprocess stage on all 50,000 train (and 10,000 test) images in a child process,
for its peak memory. Run: python -m bench.preprocess [--images 500]   -> bench/results/preprocess.md
"""
from __future__ import annotations

import argparse

import numpy as np

from bench.common import cifar_work_dir, median_seconds, project_params, run_stage, write_result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=500)
    args = parser.parse_args()
    work = cifar_work_dir()  # not timed: the download stage's raw parquet of all 60,000 images
    params = project_params()
    import datasets
    from transformers import ViTImageProcessor

    from stages.dataformat import read_classes, read_raw, save_split
    from stages.preprocess import to_tensors

    raw, classes = read_raw("train", work / "data/raw"), read_classes(work / "data/raw")
    rows = np.arange(args.images)
    ours_file = work / "ours.safetensors"

    def ours() -> None:
        save_split(to_tensors(raw, rows, classes, None, "ours"), ours_file)

    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=classes)})
    table = datasets.Dataset.from_dict(
        {"img": [{"bytes": b, "path": p} for b, p in zip(raw["image"][: args.images], raw["path"][: args.images])], "label": raw["label"][: args.images].tolist()},
        features=features,
    )
    processor = ViTImageProcessor()  # google/vit-base-patch16-224's settings: 224×224, mean = std = 0.5
    seed_file = work / "seed.arrow"

    def transform(batch: dict) -> dict:
        inputs = processor(batch["img"], return_tensors="np")
        return {"pixel_values": inputs["pixel_values"].astype(np.float32), "label": batch["label"]}

    def seed() -> None:
        seed_file.unlink(missing_ok=True)
        table.map(transform, batched=True, batch_size=32, cache_file_name=str(seed_file), remove_columns=["img"], load_from_cache_file=False)

    seed_seconds, ours_seconds = median_seconds(seed), median_seconds(ours)
    n = args.images
    rows_out = [
        {"recipe": "seed: datasets.map(ViTImageProcessor), float32 224×224", "images/s": f"{n / seed_seconds:,.0f}", "bytes per image": f"{seed_file.stat().st_size / n:,.0f}"},
        {"recipe": "ours: uint8 native size, safetensors", "images/s": f"{n / ours_seconds:,.0f}", "bytes per image": f"{ours_file.stat().st_size / n:,.0f}"},
    ]

    full = {**params, "fraction": 1.0, "data": {**params["data"], "test_fraction": 1.0}}
    seconds, peak_mib = run_stage("preprocess", full, work)
    processed = sum(f.stat().st_size for f in (work / "data/processed").glob("*.safetensors"))
    notes = [
        f"Images: the first {n} of the CIFAR-10 train split from ../shared/data/cifar10-jpg.tgz; median of 3 runs after a warm-up.",
        f"Speed-up: **{seed_seconds / ours_seconds:.1f}×** images/s; **{(seed_file.stat().st_size / n) / (ours_file.stat().st_size / n):.0f}×** smaller per image.",
        f"Whole preprocess stage (`python -m stages.preprocess`, fraction 1.0, test_fraction 1.0: 60,000 images, imports included): "
        f"{seconds:.0f} s, {60000 / seconds:,.0f} images/s, peak RSS {peak_mib:,.0f} MiB"
        + f", {processed / 60000:,.0f} bytes per image in data/processed.",
    ]
    write_result("preprocess", "Preprocess: seed recipe versus this project", rows_out, notes)


if __name__ == "__main__":
    main()
