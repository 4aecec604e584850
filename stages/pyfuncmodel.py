"""The MLflow model every registered classifier is logged as: the exported directory's ONNX graph.

The exported directory is the logged artifact and this package its code; `load_context` loads it with
stages/runtime.py (ONNX Runtime, numpy, Pillow: no torch or transformers), so `mlflow models serve`
answers without PyTorch. It takes what MLflow's transformers image pipelines take (image file paths,
or base64 of image files: what a REST request can carry) and gives each image's top `{label, score}`.
"""
from __future__ import annotations

import base64
import binascii
from pathlib import Path

import mlflow.models
import mlflow.pyfunc
import pandas as pd

MODEL_ARTIFACT = "model"  # the exported model directory, under this key of the logged artifacts


def image_bytes(given: str) -> bytes:
    """An image file's bytes from its path or from base64 of the file."""
    if len(given) < 4096 and Path(given).is_file():
        return Path(given).read_bytes()
    try:
        return base64.b64decode(given, validate=True)
    except binascii.Error:
        raise ValueError(f"input {given[:60]!r} is neither an image file's path nor base64 of an image file") from None


class ImageClassifier(mlflow.pyfunc.PythonModel):
    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        from stages.runtime import ImageClassifier as Exported

        self.classifier = Exported.load(Path(context.artifacts[MODEL_ARTIFACT]))

    # The type hint lets MLflow check the input: a list of strings, each an image path or base64 of an image file.
    def predict(self, model_input: list[str], params: dict | None = None) -> pd.DataFrame:
        from stages.dataformat import decode_rgb

        images = [decode_rgb(image_bytes(given), f"#{i}", "send an image file (JPEG, PNG, ...), base64-encoded") for i, given in enumerate(model_input)]
        top = [best for best, *_ in self.classifier.classify(images, top_k=1)]
        return pd.DataFrame(top)

# MLflow's models from code: it runs this file to build the model it loads (no pickled object).
mlflow.models.set_model(ImageClassifier())
