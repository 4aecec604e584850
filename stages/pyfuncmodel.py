"""The MLflow model for an image classifier whose class transformers does not name (EfficientNet-Lite).

MLflow's transformers flavour rebuilds a model from the class name transformers exports, so it cannot
load one registered through `stages.efficientnet_lite`. Such a model is logged as this pyfunc instead:
the exported directory as an artifact, this package as its code, and `pipeline(...)` at load time.
It takes and gives what the transformers flavour's image pipelines do (image paths, URLs or base64
of image files in; each image's top `{label, score}` out), so `mlflow.pyfunc.load_model(...).predict`
reads the same for every registered model.
"""
from __future__ import annotations

import mlflow.models
import mlflow.pyfunc
import pandas as pd

MODEL_ARTIFACT = "model"  # the exported model directory, under this key of the logged artifacts


class ImageClassifier(mlflow.pyfunc.PythonModel):
    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        from transformers import pipeline

        import stages.efficientnet_lite  # noqa: F401  (registers the class with the Auto classes)

        self.classify = pipeline("image-classification", model=context.artifacts[MODEL_ARTIFACT])

    # The type hint lets MLflow check the input: a list of strings, each an image path, URL or base64 of an image file.
    def predict(self, model_input: list[str], params: dict | None = None) -> pd.DataFrame:
        return pd.DataFrame(self.classify(list(model_input), top_k=(params or {}).get("top_k", 1)))

# MLflow's models from code: it runs this file to build the model it loads (no pickled object).
mlflow.models.set_model(ImageClassifier())
