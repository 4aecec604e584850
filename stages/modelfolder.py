"""Whether a local folder holds an image classifier saved with save_pretrained, told without torch.

The inputs stage asks before DVC removes any output, so it must answer in well under a second:
transformers' list of image-classification model types costs seconds of imports (torch among them),
so it is kept in .dvc/tmp per transformers version, as DVC keeps its own state there.
"""
from __future__ import annotations

import json
from importlib.metadata import version
from pathlib import Path

from stages.errors import PipelineError
from stages.params import EMBEDDED_CHOICES

EMBEDDED_MODEL_TYPE = "efficientnet_lite"  # config.json model_type of the embedded EfficientNet-Lite
WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin", "*.safetensors.index.json", "pytorch_model.bin.index.json")
TYPES_CACHE = Path(".dvc/tmp/image-model-types.json")


def image_model_types() -> set[str]:
    """The `model_type`s AutoModelForImageClassification builds: transformers' own and the embedded EfficientNet-Lite."""
    transformers_version = version("transformers")
    try:
        cached = json.loads(TYPES_CACHE.read_text())
        if cached["transformers"] == transformers_version:
            return set(cached["types"])
    except (OSError, ValueError, KeyError):
        pass
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

    types = set(MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES) | {EMBEDDED_MODEL_TYPE}
    if TYPES_CACHE.parent.is_dir():
        TYPES_CACHE.write_text(json.dumps({"transformers": transformers_version, "types": sorted(types)}))
    return types


def check_local_model(path: Path, name: str) -> None:
    """A save_pretrained folder of an image classifier, with its weights: else one line, before
    transformers' long errors ("Unrecognized configuration class ...", "no file named ...")."""
    config_file = path / "config.json"
    if not config_file.exists():
        raise PipelineError(f"model.name={name!r} is a folder without config.json; give a directory written by save_pretrained")
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (json.JSONDecodeError, AttributeError, UnicodeDecodeError) as err:
        raise PipelineError(f"model.name={name!r}: {config_file} is not a JSON object ({err}); re-save the model with save_pretrained") from None
    if model_type not in image_model_types():
        raise PipelineError(
            f"model.name={name!r} is not an image-classification model (model_type {model_type}); "
            f"give an image model (ViT, ConvNeXt, ResNet, ... saved with save_pretrained) or {EMBEDDED_CHOICES}"
        )
    if not any(any(path.glob(pattern)) for pattern in WEIGHT_FILES):
        raise PipelineError(
            f"model.name={name!r}: the folder has config.json but no weights (model.safetensors or pytorch_model.bin); "
            "save the whole model there with save_pretrained"
        )
