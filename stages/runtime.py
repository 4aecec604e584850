"""Inference on the CPU with ONNX Runtime: a model's ONNX graph, and images to its class probabilities.

An exported model directory holds `model.onnx` (input `pixel_values` N×3×h×w float32 as its image
processor makes them, output `logits`: the layout of Hugging Face's own ONNX exports) beside its
safetensors weights and `preprocessor_config.json`. This module runs it with numpy, Pillow and
onnxruntime alone, no torch or transformers: `image-predict`, the export check and the served MLflow
model start in a fraction of a second, and a user can serve the model without PyTorch.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime
from PIL import Image

from stages.inputsize import PROCESSOR_FILE, processor_resample, processor_size

ONNX_FILE = "model.onnx"
INPUT, OUTPUT = "pixel_values", "logits"


def session(path: Path) -> onnxruntime.InferenceSession:
    """An ONNX Runtime session on the CPU. It sizes its own thread pool (one thread per physical core)
    unless OMP_NUM_THREADS says otherwise, as it does for torch (the test workers share the cores)."""
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = int(os.environ.get("OMP_NUM_THREADS", "0"))
    options.log_severity_level = 3  # errors only: its warnings are about graph rewrites it made itself
    # Its threads sleep between batches instead of spinning: the stages prepare each batch in torch on the
    # same cores (10% more images/s for EfficientNet-Lite0 here).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def logits(runner: onnxruntime.InferenceSession, pixel_values: np.ndarray) -> np.ndarray:
    """Float32 logits N×classes of one batch of `pixel_values`."""
    return runner.run([OUTPUT], {INPUT: np.ascontiguousarray(pixel_values, dtype=np.float32)})[0]


def pixel_values(images: list[Image.Image], settings: dict) -> np.ndarray:
    """Float32 N×3×h×w: RGB images as the image processor with `settings` (preprocessor_config.json) makes
    them: resized in PIL with its filter, rescaled, normalised, channels first."""
    size = processor_size(settings)
    resample = processor_resample(settings)
    arrays = [np.asarray(img.resize(size[::-1], resample=resample) if size and img.size != size[::-1] else img, dtype=np.float32) for img in images]
    x = np.stack(arrays)
    if settings.get("do_rescale", True):
        x *= np.float32(settings.get("rescale_factor", 1 / 255))
    if settings.get("do_normalize", True):
        x = (x - np.asarray(settings["image_mean"], dtype=np.float32)) / np.asarray(settings["image_std"], dtype=np.float32)
    return x.transpose(0, 3, 1, 2)


def softmax(values: np.ndarray) -> np.ndarray:
    exp = np.exp(values - values.max(axis=-1, keepdims=True))
    return exp / exp.sum(axis=-1, keepdims=True)


@dataclass
class ImageClassifier:
    """An exported model directory, loaded as a user without PyTorch loads it."""

    runner: onnxruntime.InferenceSession
    settings: dict  # its preprocessor_config.json
    labels: list[str]  # by class index, from config.json's id2label

    @classmethod
    def load(cls, model_dir: Path) -> ImageClassifier:
        config = json.loads((model_dir / "config.json").read_text())
        labels = [label for _, label in sorted(config["id2label"].items(), key=lambda item: int(item[0]))]
        return cls(session(model_dir / ONNX_FILE), json.loads((model_dir / PROCESSOR_FILE).read_text()), labels)

    @property
    def input_size(self) -> tuple[int, int] | None:
        """(height, width) the graph takes; None where it takes any."""
        height, width = self.runner.get_inputs()[0].shape[-2:]
        return (height, width) if isinstance(height, int) and isinstance(width, int) else None

    def probabilities(self, images: list[Image.Image], batch_size: int = 64) -> np.ndarray:
        """Float32 N×classes: each image's class probabilities."""
        batches = [logits(self.runner, pixel_values(images[i : i + batch_size], self.settings)) for i in range(0, len(images), batch_size)]
        return softmax(np.concatenate(batches))

    def classify(self, images: list[Image.Image], top_k: int = 1) -> list[list[dict]]:
        """Each image's `top_k` {label, score}, best first: what transformers' image-classification pipeline gives."""
        probs = self.probabilities(images)
        return [[{"label": self.labels[i], "score": float(row[i])} for i in np.argsort(-row, kind="stable")[:top_k]] for row in probs]
