"""ONNX Runtime computes what PyTorch does: the exported graph's logits match PyTorch fp32's within 1e-4 on
real CIFAR images for every kind of model the project trains, its preprocessing is the image processor's,
and evaluate through either gives the same accuracy and the same predictions."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline

from bench.export_check import working_directory
from stages import efficientnet_lite, evaluate, runtime
from stages.dataformat import EVAL_FILE, FINETUNED_DIR, PREDICTIONS_FILE, decode_rgb, load_split
from stages.modeling import PixelTransform, forward_batches, load_pretrained, save_model
from tests.test_export import trained_project

PARITY = 1e-4  # max abs difference of logits, ONNX Runtime against PyTorch fp32


def cifar_images(small_tree, n=12):
    paths = sorted((small_tree / "test").rglob("*.jpg"))[:n]
    return [decode_rgb(p.read_bytes(), str(p)) for p in paths]


def as_pixels(images) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.array(img)).permute(2, 0, 1) for img in images])


def max_logit_diff(model_dir, pixels: torch.Tensor) -> float:
    """The saved model's logits by PyTorch fp32 against its graph's by ONNX Runtime, on the same pixel_values."""
    model = AutoModelForImageClassification.from_pretrained(model_dir).eval()
    transform = PixelTransform(AutoImageProcessor.from_pretrained(model_dir))
    by_torch = torch.cat(list(forward_batches(model, transform, pixels, 64, "cpu", "torch"))).numpy()
    by_runtime = runtime.logits(runtime.session(model_dir / runtime.ONNX_FILE), transform(pixels).numpy())
    return float(np.abs(by_torch - by_runtime).max())


@pytest.mark.parametrize("name", ["tiny-vit", *efficientnet_lite.EMBEDDED_MODELS])
def test_the_graph_gives_pytorchs_logits(name, small_tree, tiny_vit, tmp_path):
    """At each model's own input size (Lite0/1/2: 224, 240, 260 px), the classifier head fresh."""
    torch.manual_seed(0)
    model, processor = load_pretrained(str(tiny_vit) if name == "tiny-vit" else name, ["cat", "dog", "ship"])
    save_model(model, processor, tmp_path / "model", (32, 32))
    assert max_logit_diff(tmp_path / "model", as_pixels(cifar_images(small_tree))) <= PARITY


@pytest.mark.parametrize("name", ["tiny-vit", efficientnet_lite.NAME])
def test_preprocessing_is_the_image_processors_and_the_classifier_is_the_pipelines(name, small_tree, tiny_vit, tmp_path):
    torch.manual_seed(0)
    model, processor = load_pretrained(str(tiny_vit) if name == "tiny-vit" else name, ["cat", "dog", "ship"], None if name == "tiny-vit" else 64)
    save_model(model, processor, tmp_path / "model", (32, 32))
    images = cifar_images(small_tree)
    classifier = runtime.ImageClassifier.load(tmp_path / "model")
    expected = AutoImageProcessor.from_pretrained(tmp_path / "model")(images, return_tensors="np")["pixel_values"]
    np.testing.assert_allclose(runtime.pixel_values(images, classifier.settings), expected, rtol=0, atol=1e-6)
    by_pipeline = pipeline("image-classification", model=str(tmp_path / "model"))(images, top_k=2)
    by_runtime = classifier.classify(images, top_k=2)
    assert [[r["label"] for r in rs] for rs in by_runtime] == [[r["label"] for r in rs] for rs in by_pipeline]
    np.testing.assert_allclose([[r["score"] for r in rs] for rs in by_runtime], [[r["score"] for r in rs] for rs in by_pipeline], rtol=0, atol=PARITY)


@pytest.fixture(scope="module")
def full_mode(small_tree, tmp_path_factory):
    """EfficientNet-Lite0 fine-tuned in full mode at 64 px by the real stages, evaluated by ONNX Runtime."""
    return trained_project(tmp_path_factory.mktemp("full") / "project", small_tree, "full", 64, "fp32")


def test_a_full_mode_fine_tuned_models_graph_gives_pytorchs_logits(full_mode):
    with working_directory(full_mode):
        assert max_logit_diff(FINETUNED_DIR, load_split("test").pixels) <= PARITY


def test_evaluate_through_pytorch_gives_the_runtimes_accuracy_and_predictions(full_mode, tmp_path, monkeypatch):
    project = tmp_path / "project"
    shutil.copytree(full_mode, project)
    monkeypatch.setattr(evaluate, "uses_runtime", lambda params: False)
    with working_directory(project):
        evaluate.main()
    by_runtime, by_torch = (json.loads((root / EVAL_FILE).read_text()) for root in (full_mode, project))
    assert by_torch["accuracy"] == by_runtime["accuracy"] and by_torch["test_images"] == 18
    predicted = [pd.read_csv(root / PREDICTIONS_FILE) for root in (full_mode, project)]
    assert predicted[0]["predicted"].tolist() == predicted[1]["predicted"].tolist()
    np.testing.assert_allclose(predicted[0]["confidence"], predicted[1]["confidence"], rtol=0, atol=1e-4)
