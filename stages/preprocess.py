"""Stage 2: draw the shares and store them as compact uint8 tensors in data/processed/.

- train: a stratified `fraction` of the train split (seeded), less a stratified `data.val_fraction`
  of it held out as `val` for model selection; the test split is never used for selection.
- test: a stratified `data.test_fraction` of the test split.
Images keep their native resolution when they share one (CIFAR: 32×32). Images of mixed sizes are
resized once: by default (`data.storage_size: null`) to the model's input size with its image
processor's filter, so the model sees what its processor would make of the original file; to a
`data.storage_size` square (bilinear) when that is set. Resizing to the model's input size, where
still needed, and normalising happen later, in batches.
Images are read, decoded on every core and written in place a few at a time (stages/decoding.py): memory
does not grow with the number of images.
"""
from __future__ import annotations

import math
import shutil
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial

import numpy as np
from PIL import Image
from tqdm import tqdm

from stages.dataformat import PROCESSED_DIR, create_split, processed_path, raw_groups, raw_labels, read_classes, split_off, stratified_share
from stages.decoding import CHUNK_BYTES, CHUNK_IMAGES, decode_into, image_sizes, unordered_map, worker_pool
from stages.errors import PipelineError, run_stage
from stages.inputsize import model_input
from stages.params import Params, load_params


def check_share(key: str, share: float, labels: np.ndarray, classes: list[str], per_class: int, what: str) -> None:
    """A share too small for scikit-learn's stratified draw ("the resulting train set will be empty", or
    fewer images than classes) is named here, in the words of the check after the draw."""
    if share >= 1:
        return
    counts = Counter(labels.tolist())
    smallest = min(range(len(classes)), key=lambda c: counts.get(c, 0))
    if math.floor(share * len(labels)) < per_class * len(classes):
        kept = math.floor(share * counts.get(smallest, 0))
        need = per_class / max(1, counts.get(smallest, 0))
        raise PipelineError(
            f"params.yaml: {key}={share} leaves class {classes[smallest]!r} with {kept} {what} image(s); allowed: {key} >= {need:.4g} for this data"
        )


def draw_indices(train_labels: np.ndarray, test_labels: np.ndarray, classes: list[str], params: Params) -> dict[str, np.ndarray]:
    """Row numbers of each processed split in its raw split; checks every class keeps images."""
    check_share("fraction", params.fraction, train_labels, classes, 2, "train")  # one to train on, one to validate with
    check_share("data.test_fraction", params.data.test_fraction, test_labels, classes, 1, "test")
    drawn = stratified_share(train_labels, params.fraction, params.seed)
    per_class = Counter(train_labels[drawn].tolist())
    fewest = min(per_class.get(c, 0) for c in range(len(classes)))
    if fewest < 2:  # one image to train on and one to validate with, per class
        poorest = classes[min(range(len(classes)), key=lambda c: per_class.get(c, 0))]
        need = 2 / min(Counter(train_labels.tolist()).values())
        raise PipelineError(f"params.yaml: fraction={params.fraction} leaves class {poorest!r} with {fewest} train image(s); allowed: fraction >= {need:.4g} for this data")
    held = math.ceil(params.data.val_fraction * len(drawn))  # as scikit-learn counts a test_size
    if held < len(classes):
        raise PipelineError(
            f"params.yaml: data.val_fraction={params.data.val_fraction} holds out {held} of {len(drawn)} drawn train images, fewer than the "
            f"{len(classes)} classes; allowed: data.val_fraction >= {len(classes) / len(drawn):.4g} for this data, or raise fraction"
        )
    if len(drawn) - held < len(classes):
        raise PipelineError(f"params.yaml: data.val_fraction={params.data.val_fraction} leaves fewer train images than classes; lower it or raise fraction")
    train, val = split_off(drawn, train_labels, params.data.val_fraction, params.seed)
    missing = set(range(len(classes))) - set(train_labels[train].tolist())
    if missing:
        raise PipelineError(f"params.yaml: data.val_fraction={params.data.val_fraction} leaves class {classes[min(missing)]!r} no train image; lower it or raise fraction")
    test = stratified_share(test_labels, params.data.test_fraction, params.seed)
    return {"train": train, "val": val, "test": test}


@dataclass(frozen=True)
class Storage:
    size: tuple[int, int]  # (width, height), as PIL counts
    resample: int | None  # the PIL filter to resize with; None: every image has this size already
    why: str


SOURCES = {"train": "train", "val": "train", "test": "test"}  # processed split -> the raw split it is drawn from


def storage_for(rows: dict[str, np.ndarray], params: Params, pool: ProcessPoolExecutor | None) -> Storage:
    """The native size when every drawn image shares one, else the square to resize to and how."""
    tasks = [task for name, source in SOURCES.items() for task in raw_groups(source, rows[name], CHUNK_IMAGES)]
    sizes = set().union(*unordered_map(image_sizes, tasks, pool))
    if len(sizes) == 1:
        return Storage(sizes.pop(), None, "native size")
    if params.data.storage_size is not None:
        side = params.data.storage_size
        return Storage((side, side), Image.BILINEAR, f"mixed sizes, resized to data.storage_size={side}")
    model = model_input(params.model.name, params.model.image_size)
    return Storage((model.width, model.height), model.resample, f"mixed sizes, resized to the input size of {params.model.name}")


def write_processed(name: str, rows: np.ndarray, labels: np.ndarray, classes: list[str], storage: Storage, pool: ProcessPoolExecutor | None) -> None:
    """Decode straight into uint8 pixels, each task's written into its place in the split's file by the
    worker that decoded it: no float copies, and a few tasks' images in memory, however many there are."""
    width, height = storage.size
    path = processed_path(name)
    start = create_split(path, labels[rows], rows, classes, (3, height, width))
    tasks = raw_groups(SOURCES[name], rows, per_task=max(1, min(CHUNK_IMAGES, CHUNK_BYTES // (3 * width * height))))
    decode = partial(decode_into, out=path, start=start, size=storage.size, resample=storage.resample)
    with tqdm(total=len(rows), desc=f"preprocess {name}", unit="img", mininterval=1) as progress:
        for written in unordered_map(decode, tasks, pool):
            progress.update(written)
    assert progress.n == len(rows), f"{progress.n} of {len(rows)} {name} images written"


def main() -> None:
    params = load_params()
    classes = read_classes()
    labels = {split: raw_labels(split) for split in ("train", "test")}
    rows = draw_indices(labels["train"], labels["test"], classes, params)
    with worker_pool(sum(map(len, rows.values()))) as pool:
        storage = storage_for(rows, params, pool)
        if PROCESSED_DIR.exists():
            shutil.rmtree(PROCESSED_DIR)
        PROCESSED_DIR.mkdir(parents=True)
        for name, source in SOURCES.items():
            write_processed(name, rows[name], labels[source], classes, storage, pool)
    sizes = {name: len(rows[name]) for name in SOURCES}
    width, height = storage.size
    print(f"preprocess: {sizes} images of 3x{height}x{width} uint8 -> {PROCESSED_DIR}/ ({storage.why})")


if __name__ == "__main__":
    run_stage(main, "preprocess")
