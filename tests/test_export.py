"""The export check compares the exported model's class probabilities, through ONNX Runtime from the
original files, with evaluate's: a near-chance model exported correctly passes; an export whose
image processor normalises or resizes otherwise than training did fails, in one line."""
from __future__ import annotations

import json
import shutil
import sys

import pandas as pd
import pytest

from bench.export_check import alter_processor, cifar_folder, evaluated_project, working_directory
from stages import efficientnet_lite, evaluate, export, features, finetune, preprocess
from stages.download import resolve_source, write_raw
from stages.dataformat import EVAL_FILE, EXPORT_DIR, FINETUNE_FILE, FINETUNED_DIR, PREDICTIONS_FILE, probability_column
from stages.errors import PipelineError
from tests.conftest import ROOT, set_params


@pytest.fixture(scope="module")
def cifar10(cifar_archive, tmp_path_factory):
    """All 10 classes: 10 train and 10 test real CIFAR-10 images each."""
    return cifar_folder(tmp_path_factory.mktemp("cifar10") / "tree", test_per_class=10, archive=cifar_archive)


@pytest.fixture(scope="module")
def lite_project(cifar10, tmp_path_factory):
    """EfficientNet-Lite0 with a fresh head at 64 px (near chance), evaluated in fp32 by the real stage."""
    return evaluated_project(tmp_path_factory.mktemp("lite") / "project", cifar10, efficientnet_lite.NAME, 64)


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
    assert check["mean_probability_diff"] <= check["allowed_mean_probability_diff"]
    card = (lite_project / EXPORT_DIR / "README.md").read_text()
    evaluated = json.loads((lite_project / EVAL_FILE).read_text())
    assert card.startswith("---\nbase_model: efficientnet-lite0\npipeline_tag: image-classification\n")
    assert f"**Test accuracy:** {evaluated['accuracy']:.4f} (95% interval {evaluated['accuracy_ci95_low']:.4f}-" in card
    assert "`fraction` = 1.0" in card and "## Intended use" in card and str(cifar10) in card
    # a random tiny ViT at its native 32 px: nothing is resized, the probabilities are the same to float rounding
    vit = evaluated_project(tmp_path / "vit", cifar10, str(tiny_vit), None)
    assert run_export(vit)["max_probability_diff"] < 1e-5


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}, "class probabilities differ from the evaluated ones"),
        ({"size": {"height": 128, "width": 128}}, "the exported model takes 64x64 images, but models/finetuned's preprocessor_config.json resizes to 128x128"),
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
    if "differ" in message:
        assert json.loads((project / export.METRICS_FILE).read_text())["mean_probability_diff"] > 0.03


def test_a_vit_fed_another_size_fails_in_one_line(cifar10, tiny_vit, tmp_path):
    project = evaluated_project(tmp_path / "vit", cifar10, str(tiny_vit), None)
    alter_processor(project / FINETUNED_DIR, size={"height": 64, "width": 64})
    with pytest.raises(PipelineError, match="the exported model takes 32x32 images, but .* resizes to 64x64"):
        run_export(project)


@pytest.mark.parametrize(
    "accuracy, n_classes, aliased",
    [(0.9, 10, True), (0.11, 10, True), (0.1, 10, False), (0.05, 10, False), (3 / 9, 3, False), (4 / 9, 3, True), (float("nan"), 3, False)],
)
def test_candidate_verdict_withholds_the_alias_at_or_below_chance(accuracy, n_classes, aliased):
    verdict = export.candidate_verdict(accuracy, n_classes)
    assert (verdict is None) == aliased
    if verdict:
        assert "at or below chance" in verdict and f"1/{n_classes}" in verdict and "metrics/eval.json" in verdict


def test_non_finite_weights_fail_in_one_line_before_anything_is_written(tiny_vit, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    export.check_finite_weights(tiny_vit)  # a sane model passes
    broken = tmp_path / "finetuned"
    shutil.copytree(tiny_vit, broken)
    weights = load_file(str(broken / "model.safetensors"))
    name = next(k for k, v in weights.items() if v.is_floating_point() and v.ndim == 2)
    weights[name][0, 0] = torch.nan
    save_file(weights, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(PipelineError, match=rf"model.safetensors: weight {name} holds non-finite values .*lower train.lr") as failed:
        export.check_finite_weights(broken)
    assert "\n" not in str(failed.value)
    (broken / "model.safetensors").unlink()
    with pytest.raises(PipelineError, match="holds no \\*.safetensors weights"):
        export.check_finite_weights(broken)


def test_export_of_non_finite_weights_writes_nothing(tiny_vit, tmp_path, monkeypatch):
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(tiny_vit, tmp_path / FINETUNED_DIR)
    weights = load_file(str(tmp_path / FINETUNED_DIR / "model.safetensors"))
    weights = {k: torch.full_like(v, torch.inf) if v.is_floating_point() else v for k, v in weights.items()}
    save_file(weights, str(tmp_path / FINETUNED_DIR / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    (tmp_path / PREDICTIONS_FILE).parent.mkdir(parents=True)
    (tmp_path / PREDICTIONS_FILE).write_text("index,actual,predicted,confidence\n")
    (tmp_path / EVAL_FILE).write_text(json.dumps({"accuracy": 0.5, "precision": "fp32"}))
    (tmp_path / FINETUNE_FILE).write_text("{}")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PipelineError, match="non-finite values"):
        export.main()
    assert not (tmp_path / EXPORT_DIR).exists() and not (tmp_path / export.METRICS_FILE).exists()


@pytest.fixture(scope="module")
def lite_three_classes(small_tree, tmp_path_factory):
    """The 3-class folder (18 test images), EfficientNet-Lite0 with a fresh head at 64 px: low-margin predictions."""
    return evaluated_project(tmp_path_factory.mktemp("lite3") / "project", small_tree, efficientnet_lite.NAME, 64)


@pytest.mark.parametrize("check_images", [9, 3])
def test_the_check_holds_on_a_handful_of_images(lite_three_classes, tmp_path, check_images):
    """Judged on the mean probability difference, not on label agreement: one flipped low-margin label
    among 9 images does not fail a correct export, and a wrong processor still fails on as few as 3."""
    project = tmp_path / "project"
    shutil.copytree(lite_three_classes, project)
    set_params(project, export__check_images=check_images)
    check = run_export(project)
    assert check["check_images"] == check_images
    assert check["mean_probability_diff"] <= check["allowed_mean_probability_diff"]
    alter_processor(project / FINETUNED_DIR, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    with pytest.raises(PipelineError, match="class probabilities differ from the evaluated ones"):
        run_export(project)


def trained_project(root, source, mode: str, image_size: int | None, precision: str):
    """EfficientNet-Lite0 trained on `source` by the real stages (preprocess, features, finetune, evaluate)."""
    root.mkdir(parents=True)
    (root / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    set_params(
        root, fraction=1.0, data__source=str(source), data__test_fraction=1.0, model__name=efficientnet_lite.NAME, model__image_size=image_size,
        train__mode=mode, train__epochs=3 if mode == "head" else 1, train__lr=3e-3 if mode == "head" else 1e-4, train__precision=precision,
        export__check_images=100,
    )
    with working_directory(root):
        write_raw(resolve_source(str(source)), str(source))
        preprocess.main()
        for split in ("train", "val", "test"):
            argv, sys.argv = sys.argv, ["features", split]
            try:
                features.main()
            finally:
                sys.argv = argv
        finetune.main()
        evaluate.main()
    return root


@pytest.mark.parametrize("mode, image_size", [("head", None), ("full", 64)], ids=["head-224px", "full-64px"])
def test_the_export_check_passes_a_right_export_and_fails_a_wrong_one_in_either_training_precision(cifar10, tmp_path, mode, image_size):
    """train.precision `auto` is bf16 on GPUs and CPUs with AVX512-BF16 or AMX, fp32 here; forced bf16 is emulated
    here, with the same numbers. Inference (features, evaluate, the export check) is fp32 in either: in head mode
    every result is then the same, and a model trained in bf16 is checked fp32 against fp32. (Ten classes: on the
    3-class folder's 6 validation images the fitted temperature can fall to 0.05, and 20-fold sharper logits
    turn the processors' 1/255 resize rounding into probability differences above the bound.)"""
    projects = {precision: trained_project(tmp_path / precision, cifar10, mode, image_size, precision) for precision in ("fp32", "bf16")}
    finetuned = {precision: json.loads((project / finetune.METRICS_FILE).read_text()) for precision, project in projects.items()}
    assert [finetuned[p]["precision"] for p in projects] == ["fp32", "bf16"]
    same = (projects["bf16"] / PREDICTIONS_FILE).read_bytes() == (projects["fp32"] / PREDICTIONS_FILE).read_bytes()
    assert same == (mode == "head")  # head mode trains the head in fp32 on fp32 features; full mode trains in bf16
    for precision, project in projects.items():
        check = run_export(project)
        assert check["check_images"] == 100 and check["mean_probability_diff"] <= check["allowed_mean_probability_diff"] / 2, precision
        alter_processor(project / FINETUNED_DIR, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
        with pytest.raises(PipelineError, match="class probabilities differ from the evaluated ones"):
            run_export(project)
