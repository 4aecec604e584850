"""The architectures the benchmarks compare, saved as finetune saves a model (with its ONNX graph).

ViT-B/16 is built from its config with random weights (google/vit-base-patch16-224's shape and
processor settings; speed does not depend on the weights); EfficientNet-Lite0 is the embedded
ImageNet model; the tiny ViT is the tests' (32 px). Each gets a 10-class head, as the pipeline gives them.
"""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessorPil

from stages import efficientnet_lite, modeling

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
ARCHITECTURES = ("vit-base-patch16-224", efficientnet_lite.NAME)
TINY_VIT = "tiny-vit"


def save_model(arch: str, out: Path) -> Path:
    id2label = dict(enumerate(CLASSES))
    if arch == efficientnet_lite.NAME:
        model, processor = efficientnet_lite.from_imagenet(arch, id2label), efficientnet_lite.image_processor(arch)
    else:
        torch.manual_seed(0)
        tiny = dict(image_size=32, patch_size=8, hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=96) if arch == TINY_VIT else {}
        model = ViTForImageClassification(ViTConfig(num_labels=10, id2label=id2label, label2id={c: i for i, c in id2label.items()}, **tiny))
        processor = ViTImageProcessorPil(size={"height": 32, "width": 32}) if arch == TINY_VIT else ViTImageProcessorPil()
    modeling.save_model(model, processor, out, (32, 32))
    return out
