"""The export check compares the exported model's class probabilities, through pipeline() from the
original files, with evaluate's: a near-chance model exported correctly passes; an export whose
image processor normalises or resizes otherwise than training did fails, in one line."""
from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest

from bench.export_check import alter_processor, cifar_folder, evaluated_project, working_directory
from stages import efficientnet_lite, export
from stages.dataformat import FINETUNED_DIR, PREDICTIONS_FILE, probability_column
from stages.errors import PipelineError


@pytest.fixture(scope="module")
def cifar10(cifar_archive, tmp_path_factory):
    """All 10 classes: 10 train and 10 test real CIFAR-10 images each."""
    return cifar_folder(tmp_path_factory.mktemp("cifar10") / "tree", test_per_class=10, archive=cifar_archive)


@pytest.fixture(scope="module")
def lite_project(cifar10, tmp_path_factory):
    """EfficientNet-Lite0 with a fresh head at 64 px (near chance), evaluated in fp32 by the real stage."""
    return evaluated_project(tmp_path_factory.mktemp("lite") / "project", cifar10, efficientnet_lite.NAME, 64, "fp32")


def run_export(project) -> dict:
    with working_directory(project):
        export.main()
        return json.loads(export.METRICS_FILE.read_text())


def test_evaluate_records_every_class_probability(lite_project):
    predictions = pd.read_csv(lite_project / PREDICTIONS_FILE)
    classes = json.loads((lite_project / "data/raw/classes.json").read_text())
    probabilities = predictions[[probability_column(c) for c in classes]]
    assert len(predictions) == 100 and probabilities.sum(axis=1).sub(1).abs().max() < 1e-5
    assert (probabilities.max(axis=1) - predictions["confidence"]).abs().max() < 1e-6


def test_a_near_chance_model_exported_correctly_passes(lite_project, cifar10, tiny_vit, tmp_path):
    check = run_export(lite_project)
    assert check["evaluated_accuracy"] < 0.3  # near chance (0.1)
    assert check["check_images"] == 100 and check["images_from"] == "original files"
    assert check["mean_probability_diff"] <= check["allowed_mean_probability_diff"] and check["evaluate_precision"] == "fp32"
    # a random tiny ViT at its native 32 px: nothing is resized, the probabilities are the same to float rounding
    vit = evaluated_project(tmp_path / "vit", cifar10, str(tiny_vit), None, "fp32")
    assert run_export(vit)["max_probability_diff"] < 1e-5


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}, "class probabilities differ from the evaluated ones"),
        ({"size": {"height": 128, "width": 128}}, "class probabilities differ from the evaluated ones"),
    ],
    ids=["wrong-normalisation", "wrong-size"],
)
def test_an_export_whose_processor_differs_from_training_fails(lite_project, tmp_path, changes, message):
    project = tmp_path / "project"
    shutil.copytree(lite_project, project)
    alter_processor(project / FINETUNED_DIR, **changes)  # what export writes and pipeline() uses, after evaluate
    with pytest.raises(PipelineError, match=message) as failed:
        run_export(project)
    assert "\n" not in str(failed.value) and "preprocessor_config.json" in str(failed.value)
    assert json.loads((project / export.METRICS_FILE).read_text())["mean_probability_diff"] > 0.03


def test_a_vit_fed_another_size_fails_in_one_line(cifar10, tiny_vit, tmp_path):
    project = evaluated_project(tmp_path / "vit", cifar10, str(tiny_vit), None, "fp32")
    alter_processor(project / FINETUNED_DIR, size={"height": 64, "width": 64})
    with pytest.raises(PipelineError, match=r"cannot classify test images through pipeline\(\).*doesn't match model"):
        run_export(project)
