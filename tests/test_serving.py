"""`mlflow models serve` of the registered model answers a REST request carrying base64-encoded image files
(README "Serving") with each image's label and score: those evaluate recorded, within the export tolerance."""
from __future__ import annotations

import base64

import mlflow
import pandas as pd
import pytest
import requests

from bench.export_check import evaluated_project, working_directory
from scripts.servers import model_server
from stages import efficientnet_lite, export, track
from stages.dataformat import EXPORT_DIR, PREDICTIONS_FILE, probability_column, read_raw
from stages.params import load_params

pytestmark = pytest.mark.slow  # a real server per model


@pytest.mark.parametrize("kind", ["tiny-vit", efficientnet_lite.NAME])
def test_the_served_model_answers_a_base64_image_with_evaluates_label_and_score(kind, small_tree, tiny_vit, tmp_path):
    project = evaluated_project(tmp_path / "project", small_tree, str(tiny_vit) if kind == "tiny-vit" else kind, None)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with working_directory(project):
        export.main()
        raw, evaluated = read_raw("test"), pd.read_csv(PREDICTIONS_FILE)
        files = [raw["image"].iloc[i] for i in evaluated["index"]]
        mlflow.set_tracking_uri(store)
        with mlflow.start_run():
            track.log_model(EXPORT_DIR, "cifar10-classifier", files[0])
        tolerance = load_params().export.max_mean_probability_diff
    with model_server("models:/cifar10-classifier@candidate", {"MLFLOW_TRACKING_URI": store}) as url:
        # what the README's curl line sends
        answer = requests.post(f"{url}/invocations", json={"inputs": [base64.b64encode(f).decode() for f in files]}, timeout=120)
    assert answer.ok, answer.text
    served = pd.DataFrame(answer.json()["predictions"])
    assert len(served) == len(evaluated) == 18
    evaluated_score = [row[probability_column(label)] for label, (_, row) in zip(served["label"], evaluated.iterrows())]
    assert (served["score"] - evaluated_score).abs().mean() <= tolerance
    assert (served["label"] == evaluated["predicted"]).mean() >= 0.9
