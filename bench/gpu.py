"""GPU training benchmark: ViT-B/16 at bf16, fed uint8 CIFAR-10 batches resized and normalised on
the GPU (stages.modeling.PixelTransform), as the finetune stage feeds it.

Reports training images/s, the achieved TFLOP/s (3 × 17.6 GFLOP per training image: forward plus
a backward of twice its cost) as a share of the card's dense bf16 peak, and the input pipeline's
own images/s, to show it is not the bottleneck. Run on a GPU machine (one command, ~2 minutes):
    python -m bench.gpu            -> bench/results/gpu.md
`--device cpu --batch 4 --steps 2` only checks that the script runs.
"""
from __future__ import annotations

import argparse
import time

import torch
from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

from bench.common import cifar_images, write_result
from stages.modeling import PixelTransform

FLOP_PER_TRAINING_IMAGE = 3 * 17.6e9
DENSE_BF16_PEAK_TFLOPS = {"H100 PCIe": 756, "H100": 989, "H200": 989, "A100": 312, "L4": 121}


def peak_tflops(name: str) -> float | None:
    return next((peak for key, peak in DENSE_BF16_PEAK_TFLOPS.items() if key in name), None)


def timed(step, steps: int, device: str) -> float:
    """Seconds per call of `step`, after 5 warm-up calls."""
    for _ in range(5):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / steps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA GPU here; run on a GPU machine (or --device cpu to check the script)")
    device = args.device
    images = cifar_images(4096)
    pixels, labels = images.pixels.to(device), images.labels.to(device)
    transform = PixelTransform(ViTImageProcessor())  # 224×224, mean = std = 0.5
    model = ViTForImageClassification(ViTConfig(num_labels=10)).to(device).train()
    forward = torch.compile(model) if args.compile else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
    generator = torch.Generator(device=device).manual_seed(0)

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        picked = torch.randint(len(pixels), (args.batch,), device=device, generator=generator)
        return transform(pixels[picked]), labels[picked]

    def train_step() -> None:
        x, y = batch()
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = forward(pixel_values=x, labels=y).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step_s, input_s = timed(train_step, args.steps, device), timed(batch, args.steps, device)
    rate, input_rate = args.batch / step_s, args.batch / input_s
    name = torch.cuda.get_device_name(0) if device == "cuda" else "CPU"
    peak = peak_tflops(name)
    achieved = rate * FLOP_PER_TRAINING_IMAGE / 1e12
    row = {
        "device": name,
        "batch": args.batch,
        "training images/s (bf16)": f"{rate:,.0f}",
        "TFLOP/s": f"{achieved:,.0f}",
        "share of dense bf16 peak": f"{achieved / peak:.0%} of {peak}" if peak else "unknown peak",
        "input pipeline alone, images/s": f"{input_rate:,.0f}",
        "input share of a step": f"{input_s / step_s:.0%}",
    }
    print(row)
    if device == "cuda":
        notes = [f"ViT-B/16 from its config (random weights), torch.compile={args.compile}, fused AdamW, {args.steps} timed steps after 5 warm-up steps."]
        write_result("gpu", "ViT-B/16 training on a GPU", [row], notes)


if __name__ == "__main__":
    main()
