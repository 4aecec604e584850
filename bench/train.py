"""Training benchmark: this project's finetune versus the seed recipe's Trainer settings.

Seed: float32 224×224 tensors (what its datasets.map stored), per_device_train_batch_size=4, fp32.
Ours (stages.finetune, train.mode=full): uint8 images resized and normalised per batch,
batch 32, channels-last, bf16 where the hardware runs it natively; at 224 px (same work as the
seed) and at the offline job's 128 px. train.mode=head: the backbone's forward pass once per
image (and its mirror), then only the head trains. Images/s are medians of per-step times after
a warm-up step. `--accuracy` adds a short real run of each recipe (its 5 epochs on 1% of CIFAR-10,
EfficientNet-Lite0), scored on 1,000 test images.
Run: python -m bench.train [--accuracy]   -> bench/results/train.md
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoImageProcessor, AutoModelForImageClassification, Trainer, TrainerCallback, TrainingArguments, set_seed

from bench.common import cifar_images, cifar_work_dir, project_params, run_stage, write_result
from bench.models import ARCHITECTURES, save_model
from stages import efficientnet_lite
from stages.dataformat import TensorSplit, load_split
from stages.features import pooled_features
from stages.finetune import Collate, PixelDataset
from stages.hardware import pick_device_and_precision
from stages.modeling import PixelTransform, forward_batches
from stages.params import load_params

SEED_BATCH, OUR_BATCH = 4, 32


class StepTimes(TrainerCallback):
    def __init__(self):
        self.ends = [time.perf_counter()]

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())


def seed_dataset(model_dir: Path, split: TensorSplit) -> list[dict]:
    """What the seed's datasets.map stored: the processor's float32 224×224 output per image."""
    processor = AutoImageProcessor.from_pretrained(model_dir)
    images = [img.permute(1, 2, 0).numpy() for img in split.pixels]
    pixels = processor(images, return_tensors="pt")["pixel_values"].float()
    return [{"pixel_values": p, "labels": label} for p, label in zip(pixels, split.labels)]


def train(model_dir: Path, dataset, collate, batch: int, steps: int, lr: float, ours: bool, epochs: int = 1) -> tuple[torch.nn.Module, float]:
    """(trained model, median images/s over the steps after the first); `steps` 0 trains `epochs` epochs."""
    set_seed(0)
    model = AutoModelForImageClassification.from_pretrained(model_dir)
    device, precision = pick_device_and_precision("auto" if ours else "fp32")
    if ours:
        model = model.to(memory_format=torch.channels_last)
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=batch, learning_rate=lr, bf16=precision == "bf16",
        use_cpu=device == "cpu", save_strategy="no", report_to="none", remove_unused_columns=False, seed=0, disable_tqdm=True,
        **({"max_steps": steps} if steps else {"num_train_epochs": epochs}),
    )
    timer = StepTimes()
    Trainer(model=model, args=args, train_dataset=dataset, data_collator=collate, callbacks=[timer]).train()
    return model, batch / statistics.median(np.diff(timer.ends[1:]))


def resized(model_dir: Path, size: int) -> Path:
    processor = AutoImageProcessor.from_pretrained(model_dir)
    processor.size = {"height": size, "width": size}
    out = model_dir.with_name(f"{model_dir.name}-{size}")
    AutoModelForImageClassification.from_pretrained(model_dir).save_pretrained(out)
    processor.save_pretrained(out)
    return out


def accuracy(model: torch.nn.Module, model_dir: Path, test: TensorSplit) -> float:
    transform = PixelTransform(AutoImageProcessor.from_pretrained(model_dir))
    logits = torch.cat(list(forward_batches(model, transform, test.pixels, 64, "cpu", "accuracy")))
    return float((logits.argmax(-1) == test.labels).float().mean())


def head_rate(model_dir: Path, split: TensorSplit, epochs: int) -> float:
    """Images/s over `epochs` epochs of head mode: features of each image and its mirror once, then the head."""
    model = AutoModelForImageClassification.from_pretrained(model_dir)
    params = load_params()
    transform = PixelTransform(AutoImageProcessor.from_pretrained(model_dir))
    started = time.perf_counter()
    pooled_features(model, transform, [split.pixels, split.pixels.flip(-1)], params, "features")
    seconds = time.perf_counter() - started
    return epochs * len(split) / seconds  # the head's own training takes well under a second


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--accuracy", action="store_true")
    args = parser.parse_args()
    notes = short_runs() if args.accuracy else []
    split = cifar_images(args.images)
    rows = []
    for arch in ARCHITECTURES:
        model_dir = save_model(arch, Path(tempfile.mkdtemp()) / arch)
        seed_steps = max(3, args.images // SEED_BATCH)
        _, seed = train(model_dir, seed_dataset(model_dir, split), None, SEED_BATCH, seed_steps, 5e-5, ours=False)
        row = {"model": arch, "seed (224 px, batch 4, fp32) img/s": f"{seed:.1f}"}
        for size in (224, 128):
            if size != 224 and arch != efficientnet_lite.NAME:  # ViT-B/16's position embeddings are for 224 px
                row[f"ours full {size} px img/s"] = "n/a"
                continue
            sized = resized(model_dir, size)
            collate = Collate(PixelTransform(AutoImageProcessor.from_pretrained(sized)))
            _, ours = train(sized, PixelDataset(split, "flip"), collate, OUR_BATCH, 3, 5e-4, ours=True)
            row[f"ours full {size} px img/s"] = f"{ours:.1f} (**{ours / seed:.1f}×**)"
        head = head_rate(resized(model_dir, 224), split, epochs=5)
        row["ours head 224 px, 5 epochs, img/s"] = f"{head:.1f} (**{head / seed:.1f}×**)"
        rows.append(row)
        print(row, flush=True)
    notes.insert(0, f"{args.images} CIFAR-10 train images; per-step medians after one warm-up step (seed: {max(3, args.images // SEED_BATCH)} steps, ours: 3 steps of 32).")
    write_result("train", "Training throughput: seed recipe versus this project", rows, notes)


def short_runs() -> list[str]:
    """The seed recipe and this project's full-mode offline recipe, each trained for its 5 epochs on the
    same 1% share of CIFAR-10 (EfficientNet-Lite0) and scored on the same 1,000 test images. Ours is
    the real preprocess, finetune and evaluate stages; the seed trains on the images they drew."""
    work = cifar_work_dir()
    params = project_params()
    params.update(fraction=0.01, seed=42)
    params["data"]["test_fraction"] = 0.1
    params["model"].update(name=efficientnet_lite.NAME, image_size=128)
    params["train"].update(mode="full", lr=5e-4, epochs=5)
    for stage in ("preprocess", "finetune", "evaluate"):
        run_stage(stage, params, work)
    ours = json.loads((work / "metrics/eval.json").read_text())["accuracy"]

    train_split, test = load_split("train", work / "data/processed"), load_split("test", work / "data/processed")
    model_dir = save_model(efficientnet_lite.NAME, Path(tempfile.mkdtemp()) / "lite0")
    seed_model, _ = train(model_dir, seed_dataset(model_dir, train_split), None, SEED_BATCH, 0, 5e-5, ours=False, epochs=5)
    return [
        f"Short real run, 5 epochs on the same {len(train_split)} CIFAR-10 train images (1%, seed 42), EfficientNet-Lite0, "
        f"scored on the same {len(test):,} test images: seed recipe (224 px, batch 4, fp32, lr 5e-5) accuracy "
        f"**{accuracy(seed_model, model_dir, test):.3f}**; ours (the pipeline's own stages, full mode, 128 px, batch 32, lr 5e-4, "
        f"warm-up and cosine, flips) **{ours:.3f}**. Head mode's accuracy per share (three seeds, 10,000 test images) is in accuracy.md."
    ]


if __name__ == "__main__":
    main()
