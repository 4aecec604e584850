"""Preprocess benchmark: this project's stage versus the seed recipe, on the same CIFAR-10 images.

Seed: `datasets.map(ViTImageProcessor, batched=True, batch_size=32)` stored as float32 224×224.
Ours: what the preprocess stage does with them, from its raw parquet: decode into uint8 at native size
on every core, each worker writing its images into their place in a safetensors file
(stages/decoding.py's worker processes, started once before the timing, as the stage starts them once);
also on one core, for the speed-up that the second core brings.
Then the whole preprocess stage on all 50,000 train (and 10,000 test) images in a child process,
for its peak memory. Run: python -m bench.preprocess [--images 5000]   -> bench/results/preprocess.md
"""
from __future__ import annotations

import argparse
from concurrent.futures import ProcessPoolExecutor
from functools import partial

import numpy as np

from bench.common import cifar_work_dir, median_seconds, project_params, run_stage, write_result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=5000)
    args = parser.parse_args()
    work = cifar_work_dir()  # not timed: the download stage's raw parquet of all 60,000 images
    params = project_params()
    import datasets
    from transformers import ViTImageProcessor

    from stages.dataformat import create_split, raw_groups, raw_labels, read_classes, read_raw_group
    from stages.decoding import CHUNK_IMAGES, cores, decode_into, spawned_pool, unordered_map

    rows = np.arange(args.images)
    raw = work / "data/raw"
    labels, classes = raw_labels("train", raw)[rows], read_classes(raw)
    ours_file = work / "ours.safetensors"

    def ours(pool: ProcessPoolExecutor | None) -> None:
        """The preprocess stage's write_processed, for these images."""
        start = create_split(ours_file, labels, rows, classes, (3, 32, 32))
        decode = partial(decode_into, out=ours_file, start=start, size=(32, 32), resample=None)
        assert sum(unordered_map(decode, raw_groups("train", rows, CHUNK_IMAGES, raw), pool)) == len(rows)

    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=classes)})
    table = datasets.Dataset.from_dict(
        {"img": [{"bytes": data, "path": path} for task in raw_groups("train", rows, CHUNK_IMAGES, raw) for path, data in read_raw_group(task)], "label": labels.tolist()},
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

    n = args.images
    seed_seconds, one_core_seconds = median_seconds(seed), median_seconds(lambda: ours(None))
    with spawned_pool(cores()) as pool:  # started by the warm-up run: the stage starts its pool once, for every split
        all_cores_seconds = median_seconds(lambda: ours(pool))
    rows_out = [
        {"recipe": "seed: datasets.map(ViTImageProcessor), float32 224×224", "images/s": f"{n / seed_seconds:,.0f}", "bytes per image": f"{seed_file.stat().st_size / n:,.0f}"},
        {"recipe": "ours, 1 core: uint8 native size, safetensors", "images/s": f"{n / one_core_seconds:,.0f}", "bytes per image": f"{ours_file.stat().st_size / n:,.0f}"},
        {"recipe": f"ours, {cores()} cores (the stage's way)", "images/s": f"{n / all_cores_seconds:,.0f}", "bytes per image": f"{ours_file.stat().st_size / n:,.0f}"},
    ]

    full = {**params, "fraction": 1.0, "data": {**params["data"], "test_fraction": 1.0}}
    seconds, peak_mib = run_stage("preprocess", full, work)
    processed = sum(f.stat().st_size for f in (work / "data/processed").glob("*.safetensors"))
    notes = [
        f"Images: the first {n:,} of the CIFAR-10 train split from data/cifar10-jpg.tgz; median of 3 runs after a warm-up.",
        f"Speed-up over the seed: **{seed_seconds / all_cores_seconds:.1f}×** images/s on {cores()} cores ({seed_seconds / one_core_seconds:.1f}× on one); "
        f"**{(seed_file.stat().st_size / n) / (ours_file.stat().st_size / n):.0f}×** smaller per image.",
        f"{cores()} cores against one: **{one_core_seconds / all_cores_seconds:.2f}×** the decoding throughput (the worker processes started before the timing).",
        f"Whole preprocess stage (`python -m stages.preprocess`, fraction 1.0, test_fraction 1.0: 60,000 images, imports included): "
        f"{seconds:.0f} s, {60000 / seconds:,.0f} images/s, peak RSS {peak_mib:,.0f} MiB (the stage and its workers together)"
        + f", {processed / 60000:,.0f} bytes per image in data/processed.",
    ]
    write_result("preprocess", "Preprocess: seed recipe versus this project", rows_out, notes)


if __name__ == "__main__":
    main()
