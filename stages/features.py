"""Stage 3: the frozen backbone's pooled features of one processed split, for the modes that train a head on them.

Run once per split (`python -m stages.features train|val|test`, a DVC `foreach` stage), so DVC
caches each split's features by model and data: a learning-rate change re-trains the head in
seconds, and a new `fraction` or `seed` recomputes train and val but restores the unchanged test
split's features from the run-cache. The features are what the model's `classifier` receives,
the output of the model with its head removed, so they match the exported model exactly. train.mode=head needs every split's;
head-then-full trains its head phase on train and val, and evaluates the whole model. Where no
features are needed the file only records that.
"""
from __future__ import annotations

import json
import sys

import torch
from safetensors.torch import save_file

from stages.dataformat import PROCESSED_SPLITS, features_path, load_split
from stages.errors import PipelineError, run_stage
from stages.hardware import pick_device
from stages.modeling import PixelTransform, check_model_name, classifier_head, forward_batches, load_pretrained, quiet_transformers, runtime_batches, temporary_graph
from stages.params import Params, load_params


def pooled_features(model: torch.nn.Module, transform: PixelTransform, pixel_sets: list[torch.Tensor], params: Params, desc: str) -> list[torch.Tensor]:
    """Float32 N×D of each set of pixels: the input of the model's classifier head for every image. The
    model without its head runs on a GPU in PyTorch, on the CPU as its ONNX graph in ONNX Runtime."""
    head = classifier_head(model, params.model.name)
    model.classifier = torch.nn.Identity()
    device, batch_size = pick_device(), params.evaluate.batch_size
    try:
        if device != "cpu":
            return [torch.cat([b.cpu() for b in forward_batches(model, transform, pixels, batch_size, device, desc)]) for pixels in pixel_sets]
        with temporary_graph(model, transform.size or tuple(pixel_sets[0].shape[-2:])) as graph:
            return [torch.cat(list(runtime_batches(graph, transform, pixels, batch_size, desc))) for pixels in pixel_sets]
    finally:
        model.classifier = head


def features_needed(mode: str, split: str) -> bool:
    return mode == "head" or (mode == "head-then-full" and split != "test")


def main() -> None:
    if len(sys.argv) != 2 or sys.argv[1] not in PROCESSED_SPLITS:
        raise PipelineError(f"usage: python -m stages.features {{{'|'.join(PROCESSED_SPLITS)}}}")
    name = sys.argv[1]
    params = load_params()
    out = features_path(name)
    out.parent.mkdir(parents=True, exist_ok=True)
    # One key: safetensors writes several in a random order, and DVC would see a changed file.
    metadata = {"made_by": json.dumps({"mode": params.train.mode, "model": params.model.name, "image_size": params.model.image_size})}
    if not features_needed(params.train.mode, name):
        save_file({}, str(out), metadata=metadata)
        print(f"features {name}: train.mode={params.train.mode} needs no features of the {name} split")
        return

    check_model_name(params.model.name)
    quiet_transformers()
    split = load_split(name)
    model, processor = load_pretrained(params.model.name, split.classes, params.model.image_size)
    transform = PixelTransform(processor)
    # Random flips in training become a choice between two cached feature rows.
    pixel_sets = [split.pixels, split.pixels.flip(-1)] if name == "train" else [split.pixels]
    features = pooled_features(model, transform, pixel_sets, params, f"features {name}")
    tensors = {"features": features[0], "labels": split.labels}
    if name == "train":
        tensors["flipped"] = features[1]
    save_file(tensors, str(out), metadata=metadata)
    print(f"features {name}: {tuple(tensors['features'].shape)} pooled features -> {out}")


if __name__ == "__main__":
    run_stage(main, f"features_{(sys.argv[1:] or ['split'])[0]}")
