"""Building the model to fine-tune, and turning stored uint8 pixels into what it expects.

`model.name` is one of:
- `efficientnet-lite0`, `-lite1`, `-lite2`: the embedded ImageNet backbones (stages/efficientnet_lite.py);
- a local directory written by `save_pretrained` (the offline twin of a Hub model);
- a Hugging Face Hub id such as `google/vit-base-patch16-224`.
The last two take the same `from_pretrained` path, with the classifier head replaced.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
from contextlib import contextmanager
import warnings
from pathlib import Path
from typing import Iterator

import torch
from torch.nn import functional as F
from tqdm import tqdm
from transformers import AutoImageProcessor, AutoModelForImageClassification, PreTrainedModel

from stages import efficientnet_lite, runtime
from stages.dataformat import TensorSplit, load_features
from stages.errors import PipelineError
from stages.hardware import pick_device
from stages.hub import check_on_hub, local_path, looks_like_hub_id, missing_path
from stages.inputsize import processor_resample, processor_size
from stages.modelfolder import check_local_model
from stages.params import EMBEDDED_CHOICES, EMBEDDED_MODELS, Params

OFFLINE_HINT = f"use model.name={EMBEDDED_CHOICES} or a local directory saved with save_pretrained"


def quiet_transformers() -> None:
    """No progress bars of transformers' own (loading and writing a model's tensors: a second's work,
    not the stage's progress); the Hub's download bars and the stages' own bars stay."""
    from transformers.utils import logging

    logging.set_tqdm_hook(lambda _factory, args, kwargs: logging.EmptyTqdm(*args, **kwargs))


def check_model_name(name: str) -> None:
    """Fail in seconds on a model that cannot be loaded, before any data is read."""
    if name in EMBEDDED_MODELS:
        return
    path = local_path(name)
    if path.is_dir():
        check_local_model(path, name)
        return
    if not looks_like_hub_id(name):
        raise missing_path("model.name", name, "directory")
    if not _in_local_cache(name):
        check_on_hub(name, "model", "model.name", OFFLINE_HINT)


def _in_local_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def base_model_revision(name: str) -> str | None:
    """The commit of a Hub model that from_pretrained resolved (its snapshot in the Hugging Face cache);
    None for a local directory or the embedded model, whose contents the inputs stage digests."""
    if name in EMBEDDED_MODELS or not looks_like_hub_id(name):
        return None
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(name, "config.json")
    return Path(cached).parent.name if isinstance(cached, str) else None


def load_pretrained(name: str, classes: list[str], image_size: int | None = None) -> tuple[PreTrainedModel, object]:
    """(model with a fresh `len(classes)`-way head, its image processor, resized to `image_size` if given)."""
    id2label = dict(enumerate(classes))
    if name in EMBEDDED_MODELS:
        model, processor = efficientnet_lite.from_imagenet(name, id2label), efficientnet_lite.image_processor(name)
    else:
        path = local_path(name)
        if path.is_dir():
            check_local_model(path, name)
        source = str(path) if path.is_dir() else name  # a Hub id
        model = AutoModelForImageClassification.from_pretrained(
            source, num_labels=len(classes), id2label=id2label, label2id={c: i for i, c in id2label.items()}, ignore_mismatched_sizes=True
        )
        processor = AutoImageProcessor.from_pretrained(source)
    if image_size:
        # Saved with the model, so the exported processor feeds it the size it was trained at.
        processor.size = {"height": image_size, "width": image_size}
        processor.do_center_crop = False
    return model, processor


class PixelTransform:
    """uint8 N×3×H×W -> float N×3×h×w as the model's own image processor would make it, in one batch.

    Reads the processor's settings (size, resample, rescale, mean/std) instead of calling it
    image by image, so resizing and normalising run batched on whatever device holds the batch.
    """

    _MODES = {0: "nearest", 2: "bilinear", 3: "bicubic"}  # PIL resample codes

    def __init__(self, processor: object):
        cfg = processor.to_dict() if hasattr(processor, "to_dict") else dict(processor)
        self.size = processor_size(cfg)
        self.mode = self._MODES.get(processor_resample(cfg), "bilinear")
        self.scale = cfg.get("rescale_factor", 1 / 255) if cfg.get("do_rescale", True) else 1.0
        normalize = cfg.get("do_normalize", True)
        self.mean = torch.tensor(cfg.get("image_mean", [0.0] * 3) if normalize else [0.0] * 3).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg.get("image_std", [1.0] * 3) if normalize else [1.0] * 3).view(1, 3, 1, 1)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.float()
        if self.size is not None and tuple(x.shape[-2:]) != self.size:
            kwargs = {"align_corners": False, "antialias": True} if self.mode != "nearest" else {}
            # antialiased bilinear is PIL's filter; rounding gives whole pixel values, as PIL does
            x = F.interpolate(x, size=self.size, mode=self.mode, **kwargs).clamp_(0, 255).round_()
        x = x * self.scale
        return (x - self.mean.to(x.device)) / self.std.to(x.device)


def classifier_head(model: PreTrainedModel, name: str) -> torch.nn.Module:
    """The module that turns pooled features into logits (`classifier` in transformers' image models)."""
    head = getattr(model, "classifier", None)
    if not isinstance(head, torch.nn.Module):
        raise PipelineError(f"train.mode=head needs a model with a `classifier` head; {name!r} ({type(model).__name__}) has none: use train.mode=full")
    return head


@torch.inference_mode()
def forward_batches(model: PreTrainedModel, transform: PixelTransform, pixels: torch.Tensor, batch_size: int, device: str, desc: str) -> Iterator[torch.Tensor]:
    """Float32 logits of `pixels` (uint8 N×3×H×W), one batch at a time.

    Always in fp32, whatever train.precision: the features, the test metrics and the export check then
    do not depend on whether the machine runs bf16 natively, and the export check, which runs the
    exported model as a user loads it (fp32), compares like with like.
    """
    model = model.to(device, memory_format=torch.channels_last).eval()
    for start in tqdm(range(0, len(pixels), batch_size), desc=desc, unit="batch"):
        batch = transform(pixels[start : start + batch_size].to(device))
        yield model(pixel_values=batch).logits.float()


class _Logits(torch.nn.Module):
    """The model as its ONNX graph computes it: pixel_values in, logits out (no output object)."""

    def __init__(self, model: PreTrainedModel):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).logits


def save_onnx(model: PreTrainedModel, path: Path, size: tuple[int, int]) -> None:
    """Write the model's fp32 ONNX graph (runtime.py's layout; any batch size) with torch's exporter, on the CPU."""
    model = model.to("cpu", memory_format=torch.contiguous_format).eval()
    example = torch.zeros(2, 3, *size)
    # Quiet: torch.export's deprecation notices about its own internals, and the exporter's log lines
    # about torchvision operators it skips (the project uses none).
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.onnx.export(
            _Logits(model).eval(), (example,), str(path), input_names=[runtime.INPUT], output_names=[runtime.OUTPUT],
            dynamic_shapes=({0: torch.export.Dim("batch")},), dynamo=True, external_data=False, verbose=False,
        )


@torch.inference_mode()
def runtime_batches(graph: Path, transform: PixelTransform, pixels: torch.Tensor, batch_size: int, desc: str) -> Iterator[torch.Tensor]:
    """forward_batches through ONNX Runtime on the CPU, of the model whose graph is `graph`."""
    runner = runtime.session(graph)
    for start in tqdm(range(0, len(pixels), batch_size), desc=desc, unit="batch"):
        yield torch.from_numpy(runtime.logits(runner, transform(pixels[start : start + batch_size]).numpy()))


def save_model(model: PreTrainedModel, processor: object, folder: Path, stored_size: tuple[int, int]) -> None:
    """Write `folder` anew: the model and its image processor (save_pretrained) and the model's ONNX graph,
    at the size the processor resizes to (`stored_size`, the images' own, when it does not resize)."""
    if folder.exists():
        shutil.rmtree(folder)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    save_onnx(model, folder / runtime.ONNX_FILE, processor_size(processor.to_dict()) or stored_size)


@contextmanager
def temporary_graph(model: PreTrainedModel, size: tuple[int, int]) -> Iterator[Path]:
    """The model's ONNX graph in a temporary file, for runtime_batches."""
    with tempfile.TemporaryDirectory() as folder:
        graph = Path(folder) / runtime.ONNX_FILE
        save_onnx(model, graph, size)
        yield graph


@torch.inference_mode()
def split_logits(model: PreTrainedModel, processor: object, split_name: str, split: TensorSplit, params: Params, batch_size: int) -> torch.Tensor:
    """Float32 logits N×classes of every image of a processed split.

    With train.mode=head the backbone is the pretrained one the features stage ran, so the head is
    applied to the cached features instead of running the backbone again.
    """
    if params.train.mode == "head":
        cached = load_features(split_name, split.labels)
        return classifier_head(model, params.model.name).eval()(cached["features"]).float()
    batches = forward_batches(model, PixelTransform(processor), split.pixels, batch_size, pick_device(), split_name)
    return torch.cat([batch.cpu() for batch in batches])
