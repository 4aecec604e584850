"""Stage 5: write models/export/, a self-contained Hugging Face model directory, and prove it.

The directory holds safetensors weights, a config with the label names and the image processor's
config, so `pipeline("image-classification", model="models/export")` runs it on a PIL image.
A ViT export needs only transformers; an EfficientNet-Lite export needs `import stages.efficientnet_lite` first
(which registers it with the Auto classes). The proof: the exported model, fed through its own
image processor from the original image files, gives a batch of test images class probabilities
that differ from those the evaluate stage recorded by at most `export.max_mean_probability_diff` on
average. The processor resizes in PIL, evaluate in torch: a correct export differs by rounding, which
a confident model may amplify on the odd image (the largest difference is recorded, not judged),
while a wrong normalisation or input size moves the probabilities of most images.
Once proven, the model is logged to the run with MLflow's transformers flavour and registered as
`tracking.registered_model`, its newest version aliased `candidate`.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification, pipeline

import stages.efficientnet_lite  # noqa: F401  (registers EfficientNet-Lite, should the model be one)
from stages import tracking
from stages.dataformat import EVAL_FILE, EXPORT_DIR, FINETUNED_DIR, PREDICTIONS_FILE, decode_rgb, load_split, probability_column, read_raw
from stages.errors import PipelineError
from stages.hardware import pick_device_and_precision
from stages.inputsize import processor_size
from stages.params import load_params

METRICS_FILE = Path("metrics/export.json")


def write_export(source: Path, target: Path) -> None:
    model = AutoModelForImageClassification.from_pretrained(source)
    processor = AutoImageProcessor.from_pretrained(source)
    if target.exists():
        shutil.rmtree(target)
    model.save_pretrained(target)  # safetensors, config with id2label
    processor.save_pretrained(target)


def check_images(evaluated: pd.DataFrame, model_size: tuple[int, int] | None) -> tuple[list[Image.Image], str]:
    """The evaluated test images as the pipeline should see them, and where they came from.

    The original files, when preprocess kept them at their size or stored them at the model's
    input size (what the image processor makes of the file anyway); the stored pixels when an
    explicit `data.storage_size` resized them to another size, which evaluate saw instead.
    """
    raw = read_raw("test")
    originals = [decode_rgb(raw["image"].iloc[i], raw["path"].iloc[i]) for i in evaluated["index"]]
    stored = load_split("test")
    row_of = {int(index): row for row, index in enumerate(stored.index.tolist())}
    height, width = stored.pixels.shape[-2:]
    if all(img.size == (width, height) for img in originals) or model_size == (height, width):
        return originals, "original files"
    pixels = stored.pixels[[row_of[int(i)] for i in evaluated["index"]]].permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(p) for p in pixels], f"stored {width}x{height} pixels (data.storage_size)"


def check_export(target: Path, n_images: int, batch_size: int) -> dict:
    """Class probabilities of the first `n_images` evaluated test images through `pipeline(...)` and the
    exported model, against the probabilities the evaluate stage recorded for them."""
    evaluated = pd.read_csv(PREDICTIONS_FILE).head(n_images)
    labels = list(AutoConfig.from_pretrained(target).id2label.values())
    columns = [probability_column(label) for label in labels]
    if not set(columns) <= set(evaluated.columns):
        raise PipelineError(f"{PREDICTIONS_FILE} holds no probability for every class ({', '.join(columns)}); re-run the evaluate stage (dvc repro -f evaluate)")
    processor = AutoImageProcessor.from_pretrained(target)
    images, source = check_images(evaluated, processor_size(processor.to_dict()))
    device, _ = pick_device_and_precision("fp32")
    classify = pipeline("image-classification", model=str(target), device=device)
    try:
        results = classify(images, batch_size=batch_size, top_k=len(labels))
    except Exception as err:  # e.g. a ViT fed another size than its position embeddings take
        raise PipelineError(
            f"the exported model cannot classify test images through pipeline() ({type(err).__name__}: {str(err).splitlines()[0]}); "
            f"{FINETUNED_DIR}'s preprocessor_config.json does not fit the model: use the one it was trained with, and re-run finetune"
        ) from None
    exported = np.array([[{r["label"]: r["score"] for r in result}[label] for label in labels] for result in results])
    diff = np.abs(exported - evaluated[columns].to_numpy())
    worst = int(diff.max(axis=1).argmax())
    predicted = [labels[i] for i in exported.argmax(axis=1)]
    return {
        "check_images": len(images),
        "images_from": source,
        "max_probability_diff": float(diff.max()),
        "mean_probability_diff": float(diff.mean()),
        "worst_index": int(evaluated["index"].iloc[worst]),
        "agreement": float((evaluated["predicted"] == predicted).mean()),
        "pipeline_accuracy": float((evaluated["actual"] == predicted).mean()),
        "evaluated_accuracy": float((evaluated["actual"] == evaluated["predicted"]).mean()),
    }


def main() -> None:
    params = load_params()
    if not (FINETUNED_DIR / "config.json").exists():
        raise PipelineError(f"{FINETUNED_DIR} holds no model; run the finetune stage first (dvc repro finetune)")
    if not PREDICTIONS_FILE.exists():
        raise PipelineError(f"{PREDICTIONS_FILE} not found; run the evaluate stage first (dvc repro evaluate)")
    write_export(FINETUNED_DIR, EXPORT_DIR)
    check = check_export(EXPORT_DIR, params.export.check_images, params.evaluate.batch_size)
    evaluate_precision = json.loads(EVAL_FILE.read_text()).get("precision", "fp32") if EVAL_FILE.exists() else "fp32"
    check |= {"evaluate_precision": evaluate_precision, "allowed_mean_probability_diff": params.export.max_mean_probability_diff}
    METRICS_FILE.parent.mkdir(parents=True, exist_ok=True)
    METRICS_FILE.write_text(json.dumps(check, indent=2) + "\n")
    print(
        f"export: {EXPORT_DIR}/ classified {check['check_images']} test images ({check['images_from']}) through pipeline(): "
        f"mean probability difference from evaluate {check['mean_probability_diff']:.2e} (allowed {check['allowed_mean_probability_diff']:.2e}; "
        f"largest {check['max_probability_diff']:.2e}; evaluated in {evaluate_precision}); accuracy {check['pipeline_accuracy']:.4f} vs evaluated {check['evaluated_accuracy']:.4f}"
    )
    tracking.log_metrics({f"export_{k}": v for k, v in check.items() if isinstance(v, (int, float))})
    if check["mean_probability_diff"] > check["allowed_mean_probability_diff"]:
        raise PipelineError(
            f"the exported model's class probabilities differ from the evaluated ones by {check['mean_probability_diff']:.4f} on average "
            f"(allowed {check['allowed_mean_probability_diff']:.4f}, export.max_mean_probability_diff; up to {check['max_probability_diff']:.4f} on test image {check['worst_index']}): "
            f"models/export does not compute what was evaluated; check that {FINETUNED_DIR}'s preprocessor_config.json (size, resample, "
            f"image_mean/image_std) is the one it was trained with, and re-run finetune and evaluate (see {METRICS_FILE})"
        )
    example = read_raw("test")["image"].iloc[int(pd.read_csv(PREDICTIONS_FILE)["index"].iloc[0])]
    tracking.log_model(EXPORT_DIR, params.tracking.registered_model, example, params.model.name)


if __name__ == "__main__":
    tracking.run_tracked_stage("export", main)
