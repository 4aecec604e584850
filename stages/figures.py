"""The PNGs people look at: learning curves, confusion matrix, the most confidently wrong test images."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import pandas as pd
import torch
from matplotlib.figure import Figure
from sklearn.metrics import ConfusionMatrixDisplay

GALLERY_SIZE = 16


def learning_curves(epochs: pd.DataFrame) -> Figure:
    """Loss (train and validation) and validation accuracy per epoch, from metrics/finetune_epochs.csv."""
    fig, (loss, accuracy) = plt.subplots(1, 2, figsize=(9, 3.5))
    loss.plot(epochs["epoch"], epochs["train_loss"], "o-", label="train")
    loss.plot(epochs["epoch"], epochs["val_loss"], "o-", label="validation")
    loss.set(title="Loss per epoch", xlabel="epoch", ylabel="cross-entropy")
    loss.legend()
    accuracy.plot(epochs["epoch"], epochs["val_accuracy"], "o-", color="tab:green")
    accuracy.set(title="Validation accuracy per epoch", xlabel="epoch", ylabel="accuracy", ylim=(0, 1))
    for ax in (loss, accuracy):
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.tight_layout()
    return fig


def save(fig: Figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def confusion(actual: list[str], predicted: list[str], classes: list[str]) -> Figure:
    fig, ax = plt.subplots(figsize=(1 + 0.7 * len(classes), 1 + 0.6 * len(classes)))
    ConfusionMatrixDisplay.from_predictions(actual, predicted, labels=classes, ax=ax, xticks_rotation=45, colorbar=False)
    ax.set_title("Test confusion matrix")
    fig.tight_layout()
    return fig


def most_confidently_wrong(pixels: torch.Tensor, actual: list[str], predicted: list[str], confidence: torch.Tensor) -> Figure:
    """Up to GALLERY_SIZE misclassified images (uint8 N×3×H×W), most confident first, with both labels."""
    wrong = [i for i in range(len(actual)) if actual[i] != predicted[i]]
    shown = sorted(wrong, key=lambda i: -float(confidence[i]))[:GALLERY_SIZE]
    columns = 4
    rows = max(1, -(-len(shown) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(2.2 * columns, 2.4 * rows + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, shown):
        ax.imshow(pixels[i].permute(1, 2, 0).numpy())
        ax.set_title(f"true: {actual[i]}\npredicted: {predicted[i]} ({float(confidence[i]):.0%})", fontsize=8)
    title = f"Most confidently wrong test images ({len(shown)} of {len(wrong)} wrong)" if wrong else "No test image was misclassified"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def reliability(before: list[dict], after: list[dict], temperature: float) -> Figure:
    """Reliability diagram: accuracy against confidence per bin (stages/calibration.py), before and after
    temperature scaling; a calibrated model lies on the diagonal. Marker areas follow the bins' image counts."""
    fig, ax = plt.subplots(figsize=(4.8, 4.4))
    ax.plot([0, 1], [0, 1], "--", color="grey", label="calibrated")
    for bins, label, color in ((before, "temperature 1", "tab:red"), (after, f"temperature {temperature:.2f}", "tab:blue")):
        used = [b for b in bins if b["images"]]
        total = sum(b["images"] for b in used)
        confidence, accuracy = [b["confidence"] for b in used], [b["accuracy"] for b in used]
        ax.plot(confidence, accuracy, "-", color=color, alpha=0.6)
        ax.scatter(confidence, accuracy, s=[4 + 400 * b["images"] / total for b in used], color=color, label=label)
    ax.set(title="Reliability on the test split", xlabel="confidence (top-class probability)", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1))
    ax.legend(loc="upper left")
    fig.tight_layout()
    return fig
