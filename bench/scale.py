"""Scale benchmark: download and preprocess in bounded memory, decoding on every core.

Three local folders, each run through the download stage and then the preprocess stage (fraction 1.0,
test_fraction 1.0: every image) as child processes, on idle cores:
- CIFAR-10 from data/cifar10-jpg.tgz, 60,000 32×32 JPEGs;
- the same five times over, 300,000 images (each file hard-linked under five names);
- 20,000 photos of mixed sizes (CIFAR images enlarged to 160-480 px a side, JPEG quality 90), which
  preprocess stores at EfficientNet-Lite0's input size, 224×224.
For each stage: wall time (imports included), images per second, and the peak RSS of the stage's process
and its decoding workers together (bench.common.run_stage).
Run: python -m bench.scale [--only cifar-60k ...]   -> bench/results/scale.md (about 10 minutes on 2 cores)
"""
from __future__ import annotations

import argparse
import os
import random
import tarfile
import tempfile
from pathlib import Path

from PIL import Image

from bench.common import ARCHIVE, project_params, run_stage, write_result

WORK = Path(tempfile.gettempdir()) / "bench-scale"
PHOTOS = 20_000


def cifar_folder() -> Path:
    folder = WORK / "cifar-60k"
    if not (folder / "test").is_dir():
        with tarfile.open(ARCHIVE) as archive:
            archive.extractall(folder, filter="data")
    return folder


def repeated(times: int) -> Path:
    """CIFAR-10 `times` over: every file hard-linked as <copy>-<name> (no more disk for the images)."""
    source, folder = cifar_folder(), WORK / f"cifar-{60 * times}k"
    if not (folder / "test").is_dir():
        for image in sorted(source.glob("*/*/*.jpg")):
            target = folder / image.parent.relative_to(source)
            target.mkdir(parents=True, exist_ok=True)
            for copy in range(times):
                os.link(image, target / f"{copy}-{image.name}")
    return folder


def photos() -> Path:
    """PHOTOS CIFAR images (train and test in CIFAR's 5:1), each enlarged to its own random size."""
    folder, rng = WORK / "photos-20k", random.Random(0)
    if not (folder / "test").is_dir():
        images = sorted(cifar_folder().glob("*/*/*.jpg"))
        picked = rng.sample([i for i in images if i.parts[-3] == "train"], PHOTOS - PHOTOS // 6)
        picked += rng.sample([i for i in images if i.parts[-3] == "test"], PHOTOS // 6)
        for image in picked:
            target = folder / image.relative_to(cifar_folder())
            target.parent.mkdir(parents=True, exist_ok=True)
            size = (rng.randint(160, 480), rng.randint(160, 480))
            Image.open(image).convert("RGB").resize(size, Image.BICUBIC).save(target, quality=90)
    return folder


DATASETS = {"cifar-60k": lambda: cifar_folder(), "cifar-300k": lambda: repeated(5), "photos-20k": photos}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", nargs="*", choices=sorted(DATASETS), default=list(DATASETS))
    args = parser.parse_args()
    rows = []
    for name in args.only:
        source = DATASETS[name]()
        images = sum(1 for _ in source.glob("*/*/*.jpg"))
        work = WORK / f"project-{name}"
        work.mkdir(parents=True, exist_ok=True)
        params = project_params()
        params["data"] |= {"source": str(source), "test_fraction": 1.0}
        params |= {"fraction": 1.0, "model": {**params["model"], "name": "efficientnet-lite0"}}
        for stage in ("download", "preprocess"):
            seconds, peak_mib = run_stage(stage, params, work)
            out = work / ("data/raw" if stage == "download" else "data/processed")
            written = sum(f.stat().st_size for f in out.glob("*") if f.is_file())
            rows.append({
                "data": name, "images": f"{images:,}", "stage": stage, "seconds": f"{seconds:,.1f}", "images/s": f"{images / seconds:,.0f}",
                "peak RSS (MiB)": f"{peak_mib:,.0f}", "written (MB)": f"{written / 1e6:,.0f}",
            })
            print(rows[-1], flush=True)
    notes = [
        "Every image of each folder (fraction 1.0, test_fraction 1.0), on idle cores; seconds include the stage's imports and its worker processes' start.",
        "Peak RSS: the stage's process and its decoding workers together, sampled every 20 ms (shared libraries count once per process, so it errs high).",
        "cifar-300k: CIFAR-10's files hard-linked five times each; photos-20k: CIFAR images enlarged to 160-480 px a side, stored by preprocess at 224×224.",
    ]
    write_result("scale", "Download and preprocess at scale: memory and throughput", rows, notes)


if __name__ == "__main__":
    main()
