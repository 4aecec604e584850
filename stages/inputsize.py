"""The input size a model takes and the filter its image processor resizes with, read from settings alone.

`model.image_size` wins when set; else the size comes from the model's own image-processor settings
(`preprocessor_config.json` of a saved or Hub model, the embedded EfficientNet-Lite's processor),
the size the model was trained at. Loads no weights and imports neither torch nor transformers
itself, so preprocess can store images at the model's size without building the model.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from stages.errors import PipelineError
from stages.hub import check_on_hub, local_path, looks_like_hub_id, missing_path, offline
from stages.params import EMBEDDED_CHOICES, EMBEDDED_MODELS

PROCESSOR_FILE = "preprocessor_config.json"
BILINEAR = 2  # PIL's code; transformers' image processors default to it


def processor_size(cfg: dict) -> tuple[int, int] | None:
    """(height, width) an image processor with settings `cfg` resizes to; None when it does not resize.

    `shortest_edge` without a crop keeps the aspect ratio: exact for square images, which is how
    the stages store and resize them.
    """
    size = cfg.get("size") or {}
    if not cfg.get("do_resize", True):
        return None
    if "height" in size and "width" in size:
        return (size["height"], size["width"])
    if "shortest_edge" in size and cfg.get("do_center_crop"):
        crop = cfg["crop_size"]
        return (crop["height"], crop["width"])
    if "shortest_edge" in size:
        return (size["shortest_edge"], size["shortest_edge"])
    raise PipelineError(f"image processor size {size} is not supported; use a model whose processor sets height/width or shortest_edge")


def processor_resample(cfg: dict) -> int:
    """PIL resample code of the processor's resize (transformers may save it as an int or an enum's value)."""
    value = cfg.get("resample", BILINEAR)
    return int(getattr(value, "value", value)) if value is not None else BILINEAR


def processor_settings(name: str) -> dict:
    """The image-processor settings of `model.name`, as `save_pretrained` writes them."""
    if name in EMBEDDED_MODELS:
        from stages import efficientnet_lite  # torch and transformers: only for the embedded model

        return efficientnet_lite.image_processor(name).to_dict()
    path = local_path(name)
    if path.is_dir():
        if (path / PROCESSOR_FILE).is_file():
            return json.loads((path / PROCESSOR_FILE).read_text())
        raise PipelineError(f"model.name={name!r} has no {PROCESSOR_FILE}; give a directory where the model's image processor was saved too (save_pretrained)")
    if not looks_like_hub_id(name):
        raise missing_path("model.name", name, "directory")
    return json.loads(Path(_hub_file(name, PROCESSOR_FILE)).read_text())


def _hub_file(repo_id: str, filename: str) -> str:
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, filename)
    if isinstance(cached, str):
        return cached
    hint = f"use model.name={EMBEDDED_CHOICES} or a local directory saved with save_pretrained"
    check_on_hub(repo_id, "model", "model.name", hint)  # fails in seconds when the Hub is out of reach
    try:
        return hf_hub_download(repo_id, filename)
    except Exception as err:
        where = "the Hugging Face cache (HF_HUB_OFFLINE=1)" if offline() else "the Hugging Face Hub"
        raise PipelineError(f"model.name={repo_id!r}: {filename} not found in {where} ({type(err).__name__}); {hint}") from None


@dataclass(frozen=True)
class ModelInput:
    height: int
    width: int
    resample: int  # PIL filter code of the processor's resize


def model_input(name: str, image_size: int | None) -> ModelInput:
    """The size the model takes and how its processor resizes to it."""
    cfg = processor_settings(name)
    size = (image_size, image_size) if image_size else processor_size(cfg)
    if size is None:
        raise PipelineError(f"model.name={name!r}: its image processor does not resize, so it takes no one size; set model.image_size")
    return ModelInput(*size, processor_resample(cfg))
