"""Stage 2: draw the shares and store them as compact uint8 tensors in data/processed/.

- train: a stratified `fraction` of the train split (seeded), less a stratified `data.val_fraction`
  of it held out as `val` for model selection; the test split is never used for selection.
- test: a stratified `data.test_fraction` of the test split.
Images keep their native resolution when they share one (CIFAR: 32×32). Images of mixed sizes are
resized once: by default (`data.storage_size: null`) to the model's input size with its image
processor's filter, so the model sees what its processor would make of the original file; to a
`data.storage_size` square (bilinear) when that is set. Resizing to the model's input size, where
still needed, and normalising happen later, in batches.
"""
from __future__ import annotations

import io
import math
import shutil
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from stages import tracking
from stages.dataformat import PROCESSED_DIR, TensorSplit, decode_rgb, processed_path, read_classes, read_raw, save_split, split_off, stratified_share
from stages.errors import PipelineError
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
    resample: int  # PIL filter
    why: str


def storage_size(frames: list[pd.DataFrame], params: Params) -> Storage | None:
    """None when every image shares one size (kept as is), else the square to resize to and how."""
    sizes = {Image.open(io.BytesIO(data)).size for frame in frames for data in frame["image"]}
    if len(sizes) == 1:
        return None
    if params.data.storage_size is not None:
        side = params.data.storage_size
        return Storage((side, side), Image.BILINEAR, f"data.storage_size={side}")
    model = model_input(params.model.name, params.model.image_size)
    return Storage((model.width, model.height), model.resample, f"the input size of {params.model.name}")


def to_tensors(frame: pd.DataFrame, rows: np.ndarray, classes: list[str], storage: Storage | None, desc: str) -> TensorSplit:
    """Decode straight into one preallocated uint8 array: no float copies are ever held. The split
    holds numpy arrays (N×3×H×W): this stage saves them and needs no torch."""
    images, paths = frame["image"].to_numpy(), frame["path"].to_numpy()
    width, height = storage.size if storage else decode_rgb(images[rows[0]], paths[rows[0]]).size
    pixels = np.empty((len(rows), height, width, 3), dtype=np.uint8)
    for i, row in enumerate(tqdm(rows, desc=desc, unit="img", mininterval=1)):
        img = decode_rgb(images[row], paths[row])
        pixels[i] = img if img.size == (width, height) else img.resize((width, height), storage.resample)
    labels = frame["label"].to_numpy()[rows].astype(np.int64)
    return TensorSplit(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)), labels, rows.astype(np.int64), classes)


def main() -> None:
    params = load_params()
    classes = read_classes()
    raw = {split: read_raw(split) for split in ("train", "test")}
    rows = draw_indices(raw["train"]["label"].to_numpy(), raw["test"]["label"].to_numpy(), classes, params)
    picked = [raw["train"].iloc[rows["train"]], raw["train"].iloc[rows["val"]], raw["test"].iloc[rows["test"]]]
    storage = storage_size(picked, params)
    if PROCESSED_DIR.exists():
        shutil.rmtree(PROCESSED_DIR)
    PROCESSED_DIR.mkdir(parents=True)
    sizes = {}
    for name, source in (("train", "train"), ("val", "train"), ("test", "test")):
        split = to_tensors(raw[source], rows[name], classes, storage, desc=f"preprocess {name}")
        save_split(split, processed_path(name))
        sizes[name] = len(split)
    shape = "x".join(map(str, split.pixels.shape[1:]))
    print(f"preprocess: {sizes} images of {shape} uint8 -> {PROCESSED_DIR}/" + (f" (mixed sizes, resized to {storage.why})" if storage else " (native size)"))
    tracking.log_metrics({f"data.{name}_images": n for name, n in sizes.items()})


if __name__ == "__main__":
    tracking.run_tracked_stage("preprocess", main)
