"""The two architectures the benchmarks compare, saved as model directories with their processors.

ViT-B/16 is built from its config with random weights (google/vit-base-patch16-224's shape and
processor settings; speed does not depend on the weights); EfficientNet-Lite0 is the embedded
ImageNet model. Both get a 10-class head, as the pipeline gives them.
"""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

from stages import efficientnet_lite

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
ARCHITECTURES = ("vit-base-patch16-224", efficientnet_lite.NAME)


def save_model(arch: str, out: Path) -> Path:
    id2label = dict(enumerate(CLASSES))
    if arch == efficientnet_lite.NAME:
        model, processor = efficientnet_lite.from_imagenet(arch, id2label), efficientnet_lite.image_processor(arch)
    else:
        torch.manual_seed(0)
        model = ViTForImageClassification(ViTConfig(num_labels=10, id2label=id2label, label2id={c: i for i, c in id2label.items()}))
        processor = ViTImageProcessor()
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out

