"""Stage 5: write models/export/, a self-contained Hugging Face model directory, and prove it.

The directory holds safetensors weights, a config with the label names and the image processor's
config, so `pipeline("image-classification", model="models/export")` runs it on a PIL image.
A ViT export needs only transformers; an EfficientNet-Lite export needs `import stages.efficientnet_lite` first
(which registers it with the Auto classes). The proof: the exported model, fed through its own
image processor from the original image files, re-classifies a batch of test images; it must give
the labels the evaluate stage gave (up to `export.min_agreement`: the processor resizes in PIL,
which rounds to whole pixel values), and so reproduce the accuracy measured on those images.
Once proven, the model is logged to the run with MLflow's transformers flavour and registered as
`tracking.registered_model`, its newest version aliased `candidate`.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline

import stages.efficientnet_lite  # noqa: F401  (registers EfficientNet-Lite, should the model be one)
from stages import tracking
from stages.dataformat import EXPORT_DIR, FINETUNED_DIR, PREDICTIONS_FILE, decode_rgb, read_raw
from stages.errors import PipelineError
from stages.hardware import pick_device_and_precision
from stages.params import load_params

METRICS_FILE = Path("metrics/export.json")


def write_export(source: Path, target: Path) -> None:
    model = AutoModelForImageClassification.from_pretrained(source)
    processor = AutoImageProcessor.from_pretrained(source)
    if target.exists():
        shutil.rmtree(target)
    model.save_pretrained(target)  # safetensors, config with id2label
    processor.save_pretrained(target)


def check_export(target: Path, n_images: int, batch_size: int) -> dict:
    """Re-classify the first `n_images` evaluated test images from their original files."""
    evaluated = pd.read_csv(PREDICTIONS_FILE).head(n_images)
    raw = read_raw("test")
    images = [decode_rgb(raw["image"].iloc[i], raw["path"].iloc[i]) for i in evaluated["index"]]
    device, _ = pick_device_and_precision("fp32")
    classify = pipeline("image-classification", model=str(target), device=device)
    labels = [result[0]["label"] for result in classify(images, batch_size=batch_size, top_k=1)]
    return {
        "check_images": len(images),
        "pipeline_accuracy": float((evaluated["actual"] == labels).mean()),
        "evaluated_accuracy": float((evaluated["actual"] == evaluated["predicted"]).mean()),
        "agreement": float((evaluated["predicted"] == labels).mean()),
    }


def main() -> None:
    params = load_params()
    if not (FINETUNED_DIR / "config.json").exists():
        raise PipelineError(f"{FINETUNED_DIR} holds no model; run the finetune stage first (dvc repro finetune)")
    if not PREDICTIONS_FILE.exists():
        raise PipelineError(f"{PREDICTIONS_FILE} not found; run the evaluate stage first (dvc repro evaluate)")
    write_export(FINETUNED_DIR, EXPORT_DIR)
    check = check_export(EXPORT_DIR, params.export.check_images, params.evaluate.batch_size)
    METRICS_FILE.parent.mkdir(parents=True, exist_ok=True)
    METRICS_FILE.write_text(json.dumps(check, indent=2) + "\n")
    print(
        f"export: {EXPORT_DIR}/ re-classified {check['check_images']} test images from the original files: "
        f"accuracy {check['pipeline_accuracy']:.4f} vs evaluated {check['evaluated_accuracy']:.4f}, agreement {check['agreement']:.4f}"
    )
    tracking.log_metrics({f"export_{k}": v for k, v in check.items()})
    if check["agreement"] < params.export.min_agreement:
        raise PipelineError(
            f"the exported model agrees with the evaluated predictions on only {check['agreement']:.2%} of {check['check_images']} "
            f"test images (export.min_agreement={params.export.min_agreement}): its image processor does not match training; see {METRICS_FILE}"
        )
    example = read_raw("test")["image"].iloc[int(pd.read_csv(PREDICTIONS_FILE)["index"].iloc[0])]
    tracking.log_model(EXPORT_DIR, params.tracking.registered_model, example, params.model.name)


if __name__ == "__main__":
    tracking.run_tracked_stage("export", main)
