"""Inference benchmark, side by side on the same images in one run: the seed recipe's `pipeline()` called
image by image, PyTorch eager on batches of stored uint8 pixels (the stages before ONNX Runtime, and still
the GPU path), and ONNX Runtime on the same batches (the stages on a CPU: features, evaluate, the export
check, image-predict, the served model); OpenVINO on the same graph too, when it is installed, for the
choice of runtime (`pip install openvino`; the project does not depend on it).

Run: python -m bench.inference [--images 64]   -> bench/results/inference.md
"""
from __future__ import annotations

import argparse
import io
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline

import stages.efficientnet_lite  # noqa: F401  (registers EfficientNet-Lite with the Auto classes)
from bench.common import cifar_images, cifar_work_dir, median_seconds, write_result
from bench.models import ARCHITECTURES, TINY_VIT, save_model
from stages import runtime
from stages.dataformat import read_raw
from stages.modeling import PixelTransform, forward_batches, runtime_batches


def openvino_model(graph: Path):
    """The graph compiled by OpenVINO for the CPU in fp32 (on CPUs with bf16 it would otherwise pick bf16); None without OpenVINO."""
    try:
        import openvino
    except ImportError:
        return None
    return openvino.Core().compile_model(str(graph), "CPU", {"PERFORMANCE_HINT": "THROUGHPUT", "INFERENCE_PRECISION_HINT": "f32"})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    n, batch = args.images, args.batch_size
    split = cifar_images(n, "test")
    files = [Image.open(io.BytesIO(data)).convert("RGB") for data in read_raw("test", cifar_work_dir() / "data/raw")["image"][:n]]
    rows = []
    for arch in (TINY_VIT, *ARCHITECTURES):
        model_dir = save_model(arch, Path(tempfile.mkdtemp()) / arch)
        classify = pipeline("image-classification", model=str(model_dir), device="cpu")
        model = AutoModelForImageClassification.from_pretrained(model_dir)
        transform = PixelTransform(AutoImageProcessor.from_pretrained(model_dir))
        graph = model_dir / runtime.ONNX_FILE
        compiled = openvino_model(graph)

        def seed() -> None:
            for image in files:
                classify(image)

        def eager() -> torch.Tensor:
            return torch.cat(list(forward_batches(model, transform, split.pixels, batch, "cpu", arch)))

        def onnxruntime() -> torch.Tensor:
            return torch.cat(list(runtime_batches(graph, transform, split.pixels, batch, arch)))

        def openvino() -> np.ndarray:
            return np.concatenate([compiled(transform(split.pixels[i : i + batch]).numpy())[0] for i in range(0, n, batch)])

        parity = float((eager() - onnxruntime()).abs().max())
        seconds = {"seed": median_seconds(seed), "eager": median_seconds(eager), "runtime": median_seconds(onnxruntime)}
        openvino_cell = "not installed"
        if compiled is not None:
            openvino_cell = f"{n / median_seconds(openvino):.1f} (max logit diff {np.abs(eager().numpy() - openvino()).max():.1e})"
        rows.append({
            "model": f"{arch} ({transform.size[0]} px)",
            "seed: pipeline() per image": f"{n / seconds['seed']:.1f}",
            "PyTorch eager, batched": f"{n / seconds['eager']:.1f}",
            "**ONNX Runtime**, batched": f"**{n / seconds['runtime']:.1f}**",
            "runtime / eager": f"{seconds['eager'] / seconds['runtime']:.1f}×",
            "runtime / seed": f"{seconds['seed'] / seconds['runtime']:.1f}×",
            "max logit diff, runtime vs eager": f"{parity:.1e}",
            "OpenVINO, batched": openvino_cell,
        })
    notes = [
        f"Images per second, {n} CIFAR-10 test images (the JPEG files for pipeline(), the stored uint8 tensors resized in torch for the batched runs), "
        f"batch {batch}, fp32, CPU; median of 3 runs after a warm-up, each runtime with its own default threads (one per core). "
        "The batched runs time what the stages time: the uint8 -> float transform and the forward pass."
    ]
    write_result("inference", "Inference throughput: the seed recipe, PyTorch eager and ONNX Runtime", rows, notes)


if __name__ == "__main__":
    main()
