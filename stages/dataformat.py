"""What the stages hand each other on disk.

data/inputs/     `source.json`, `model.json`: what `data.source` and `model.name` name, with a content
                 digest of a local path (the inputs stage), so DVC sees a changed folder.
data/raw/        whole dataset as received: `<split>.parquet` (encoded image bytes, source path,
                 integer label; Hugging Face `Image`/`ClassLabel` features) and `classes.json`.
data/processed/  the drawn shares as safetensors: `pixels` uint8 N×3×H×W, `labels` int64, and
                 `index` int64 (the row in the raw split, so later stages can find the original file).
data/features/   `<split>.safetensors`, with train.mode=head (head-then-full: train, val): the frozen backbone's pooled features
                 of each processed split (`features` float32 N×D, `labels`; train also `flipped`,
                 the features of its mirrored images); metadata says which model and mode made them.
models/finetuned/  the fine-tuned model and its image processor (save_pretrained).
metrics/test_predictions.csv  one row per evaluated test image: raw `index`, actual, predicted, confidence
                 (the predicted label's probability), and `prob_<class>` for every class.
models/export/   the proven, self-contained export of models/finetuned.
"""
from __future__ import annotations

import io
import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from stages.errors import PipelineError

if TYPE_CHECKING:
    import pandas as pd
    import torch

# torch, safetensors.torch and scikit-learn are imported where they are used: the download and
# preprocess stages, which use this module, load no model and need none of them at import.

INPUTS_DIR = Path("data/inputs")
SOURCE_INPUT = INPUTS_DIR / "source.json"
MODEL_INPUT = INPUTS_DIR / "model.json"
RAW_DIR = Path("data/raw")
PROCESSED_DIR = Path("data/processed")
SPLITS = ("train", "test")
PROCESSED_SPLITS = ("train", "val", "test")
FEATURES_DIR = Path("data/features")
FINETUNED_DIR = Path("models/finetuned")
FINETUNE_FILE = Path("metrics/finetune.json")  # the kept epoch, the temperature, what trained, lr/epochs as resolved
EPOCHS_FILE = Path("metrics/finetune_epochs.csv")  # one row per epoch, written as each ends
PREDICTIONS_FILE = Path("metrics/test_predictions.csv")
EVAL_FILE = Path("metrics/eval.json")
EXPORT_FILE = Path("metrics/export.json")  # the export check, and whether the model may be aliased `candidate`
EXPORT_DIR = Path("models/export")


def read_json(path: Path):
    """The file's JSON, or None when it is missing or cut short (a run killed while writing it)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def probability_column(label: str) -> str:
    """The column of metrics/test_predictions.csv holding each image's evaluated probability of `label`."""
    return f"prob_{label}"


def raw_path(split: str, root: Path = RAW_DIR) -> Path:
    return root / f"{split}.parquet"


def read_classes(root: Path = RAW_DIR) -> list[str]:
    path = root / "classes.json"
    if not path.exists():
        raise PipelineError(f"{path} not found; run the download stage first (dvc repro download)")
    return json.loads(path.read_text())


def raw_labels(split: str, root: Path = RAW_DIR) -> np.ndarray:
    """The raw split's labels alone, without its images."""
    import pyarrow.parquet as pq

    return pq.read_table(existing_raw(split, root), columns=["label"])["label"].to_numpy()


@dataclass(frozen=True)
class RawGroup:
    """Some rows of one row group of a raw split (download bounds its row groups), and the position in
    the processed split of the first of them: a task that a decoding worker reads and writes by itself."""

    path: Path
    group: int
    rows: np.ndarray  # in the row group, ascending
    position: int


def raw_groups(split: str, rows: np.ndarray, per_task: int, root: Path = RAW_DIR) -> list[RawGroup]:
    """The raw split's `rows` (ascending) as RawGroups of at most `per_task` rows; groups holding none of them are left out."""
    import pyarrow.parquet as pq

    assert np.all(np.diff(rows) > 0), "rows must ascend"
    path = existing_raw(split, root)
    metadata, tasks, start = pq.ParquetFile(path).metadata, [], 0
    for group in range(metadata.num_row_groups):
        end = start + metadata.row_group(group).num_rows
        first, last = np.searchsorted(rows, [start, end])
        for at in range(first, last, per_task):
            tasks.append(RawGroup(path, group, rows[at : min(at + per_task, last)] - start, int(at)))
        start = end
    return tasks


def read_raw_group(task: RawGroup) -> list[tuple[str, bytes]]:
    """(where it came from, encoded bytes) of the task's rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    images = pq.ParquetFile(task.path).read_row_group(task.group, columns=["image"]).column(0).combine_chunks().take(pa.array(task.rows))
    return list(zip(images.field("path").to_pylist(), images.field("bytes").to_pylist()))


def existing_raw(split: str, root: Path) -> Path:
    path = raw_path(split, root)
    if not path.exists():
        raise PipelineError(f"{path} not found; run the download stage first (dvc repro download)")
    return path


def read_raw(split: str, root: Path = RAW_DIR) -> pd.DataFrame:
    """Columns: image (encoded bytes), path (where the image came from), label (int). The whole split in
    memory: for a few images (export, tests); preprocess reads a row group at a time (raw_groups)."""
    path = existing_raw(split, root)
    import pandas as pd  # here, so the stages that only need a path (inputs, on every dvc repro) start fast

    frame = pd.read_parquet(path)
    return pd.DataFrame(
        {"image": frame["image"].map(lambda cell: cell["bytes"]), "path": frame["image"].map(lambda cell: cell["path"]), "label": frame["label"]}
    )


SIXTEEN_BIT_MODES = {"I", "I;16", "I;16L", "I;16B", "I;16N"}  # PIL's 16-bit (and 32-bit integer) greyscale


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB. PIL's own convert clips 16-bit greyscale (PNG "I;16"/"I") at 255, which makes it
    all white; its 0-65535 range is scaled by 1/257 instead (65535 -> 255)."""
    if img.mode in SIXTEEN_BIT_MODES:
        scaled = np.rint(np.asarray(img, dtype=np.float64) / 257).clip(0, 255).astype(np.uint8)
        return Image.fromarray(scaled).convert("RGB")
    return img.convert("RGB")


def decode_rgb(data: bytes, name: str, fix: str = "remove or replace it in data.source") -> Image.Image:
    """Decode one image fully; a corrupt file is named in the error, with `fix`, not discovered mid-training."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return to_rgb(img)
    except Exception as err:  # PIL raises several unrelated types for bad data
        raise PipelineError(f"image {name} cannot be decoded ({type(err).__name__}: {err}); {fix}") from None


def stratified_share(labels: np.ndarray, share: float, seed: int) -> np.ndarray:
    """Indices of a `share` of `labels`, drawn stratified by class with `seed`, in ascending order."""
    indices = np.arange(len(labels))
    if share >= 1:
        return indices
    from sklearn.model_selection import train_test_split

    picked, _ = train_test_split(indices, train_size=share, stratify=labels, random_state=seed)
    return np.sort(picked)


def split_off(indices: np.ndarray, labels: np.ndarray, share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split `indices` into (rest, held-out share), stratified by their labels."""
    from sklearn.model_selection import train_test_split

    rest, held = train_test_split(indices, test_size=share, stratify=labels[indices], random_state=seed)
    return np.sort(rest), np.sort(held)


@dataclass
class TensorSplit:
    """As loaded: torch tensors. The preprocess stage builds one from numpy arrays (no torch needed to save)."""

    pixels: torch.Tensor  # uint8 N×3×H×W
    labels: torch.Tensor  # int64 N
    index: torch.Tensor  # int64 N, row in the raw split
    classes: list[str]

    def __len__(self) -> int:
        return len(self.labels)


def processed_path(split: str, root: Path = PROCESSED_DIR) -> Path:
    return root / f"{split}.safetensors"


def create_split(path: Path, labels: np.ndarray, index: np.ndarray, classes: list[str], image_shape: tuple[int, int, int]) -> int:
    """A processed split's file with room for its pixels (uint8 3×H×W images, one after another), to be
    written in place: where they start. Once filled in, it is byte for byte what safetensors' own save_file
    writes (index and labels first, then pixels)."""
    n, image_bytes = len(labels), math.prod(image_shape)
    header = {"__metadata__": {"classes": json.dumps(classes, ensure_ascii=False)}}
    offset = 0
    for name in ("index", "labels"):
        header[name] = {"dtype": "I64", "shape": [n], "data_offsets": [offset, offset + 8 * n]}
        offset += 8 * n
    header["pixels"] = {"dtype": "U8", "shape": [n, *image_shape], "data_offsets": [offset, offset + n * image_bytes]}
    encoded = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(encoded)) + encoded)
        out.write(np.asarray(index, dtype="<i8").tobytes() + np.asarray(labels, dtype="<i8").tobytes())
        start = out.tell()
        out.truncate(start + n * image_bytes)
    return start


def save_split(split: TensorSplit, path: Path) -> None:
    """Torch tensors or numpy arrays: the file is the same (safetensors stores dtype, shape and bytes)."""
    pixels = np.ascontiguousarray(np.asarray(split.pixels))
    assert pixels.dtype == np.uint8 and pixels.ndim == 4 and pixels.shape[1] == 3
    start = create_split(path, np.asarray(split.labels), np.asarray(split.index), split.classes, pixels.shape[1:])
    with open(path, "r+b") as out:
        out.seek(start)
        out.write(pixels.tobytes())


def load_split(name: str, root: Path = PROCESSED_DIR) -> TensorSplit:
    path = processed_path(name, root)
    if not path.exists():
        raise PipelineError(f"{path} not found; run the preprocess stage first (dvc repro preprocess)")
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as fh:
        classes = json.loads(fh.metadata()["classes"])
    tensors = load_file(str(path))
    return TensorSplit(tensors["pixels"], tensors["labels"], tensors["index"], classes)


def load_labels(name: str, root: Path = PROCESSED_DIR) -> tuple[np.ndarray, list[str]]:
    """(labels, class names) of a processed split, read without torch or the pixels."""
    from safetensors import safe_open

    path = processed_path(name, root)
    if not path.exists():
        raise PipelineError(f"{path} not found; run the preprocess stage first (dvc repro preprocess)")
    with safe_open(str(path), framework="numpy") as fh:
        return fh.get_tensor("labels"), json.loads(fh.metadata()["classes"])


def features_path(split: str, root: Path = FEATURES_DIR) -> Path:
    return root / f"{split}.safetensors"


def load_features(split: str, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """`features`, `labels` (and `flipped` for train) of a processed split, as the features stage cached
    them; `labels` are the processed split's, to catch features left over from other data."""
    import torch
    from safetensors.torch import load_file

    path = features_path(split)
    tensors = load_file(str(path)) if path.exists() else {}
    if "features" not in tensors:
        raise PipelineError(f"{path} holds no features; with train.mode=head or head-then-full run the features stage first (dvc repro features)")
    if not torch.equal(tensors["labels"], labels):
        raise PipelineError(f"{path} was computed from other data; re-run the features stage (dvc repro features)")
    return tensors
