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
metrics/export.json records the check and whether the model may be aliased `candidate` in the
registry (the track stage registers it): only when its test accuracy (metrics/eval.json) is above
chance (1/classes). A model with non-finite weights (diverged training) fails before anything is written.
The model is loaded once, by the check, from the exported directory as a user loads it.
"""
from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from transformers import pipeline

import stages.efficientnet_lite  # noqa: F401  (registers EfficientNet-Lite, should the model be one)
from stages.dataformat import EVAL_FILE, EXPORT_DIR, EXPORT_FILE, FINETUNED_DIR, PREDICTIONS_FILE, decode_rgb, load_split, probability_column, read_json, read_raw
from stages.errors import PipelineError, run_stage
from stages.hardware import pick_device
from stages.inputsize import processor_size
from stages.modeling import quiet_transformers
from stages.params import load_params

METRICS_FILE = EXPORT_FILE


def write_export(source: Path, target: Path) -> None:
    """finetune saved the model with save_pretrained (safetensors, config with id2label, the image
    processor's config): the export is those files, byte for byte."""
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target)


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
    labels = [label for _, label in sorted(read_json(target / "config.json")["id2label"].items(), key=lambda item: int(item[0]))]
    columns = [probability_column(label) for label in labels]
    if not set(columns) <= set(evaluated.columns):
        raise PipelineError(f"{PREDICTIONS_FILE} holds no probability for every class ({', '.join(columns)}); re-run the evaluate stage (dvc repro -f evaluate)")
    images, source = check_images(evaluated, processor_size(read_json(target / "preprocessor_config.json")))
    classify = pipeline("image-classification", model=str(target), device=pick_device())
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


def check_finite_weights(model_dir: Path) -> None:
    """Fail on weights holding NaN or inf (training diverged): such a model is never exported or registered."""
    import torch
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise PipelineError(f"{model_dir} holds no *.safetensors weights; re-run the finetune stage (dvc repro -f finetune)")
    for file in files:
        with safe_open(str(file), framework="pt") as fh:
            for name in fh.keys():
                tensor = fh.get_tensor(name)
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                    raise PipelineError(
                        f"{file}: weight {name} holds non-finite values (NaN or inf), so training diverged; nothing was exported or registered: "
                        "re-run finetune with a lower train.lr (or train.lr: auto)"
                    )


def candidate_verdict(accuracy: float, n_classes: int) -> str | None:
    """None when the model may be aliased `candidate`; else why not: a test accuracy at or below chance."""
    chance = 1 / n_classes
    if not math.isfinite(accuracy) or accuracy <= chance * (1 + 1e-9):
        return f"its test accuracy {accuracy:.4f} (metrics/eval.json) is at or below chance (1/{n_classes} = {chance:.4f})"
    return None


def main() -> None:
    quiet_transformers()
    params = load_params()
    if not (FINETUNED_DIR / "config.json").exists():
        raise PipelineError(f"{FINETUNED_DIR} holds no model; run the finetune stage first (dvc repro finetune)")
    for path in (PREDICTIONS_FILE, EVAL_FILE):
        if not path.exists():
            raise PipelineError(f"{path} not found; run the evaluate stage first (dvc repro evaluate)")
    check_finite_weights(FINETUNED_DIR)
    evaluation = json.loads(EVAL_FILE.read_text())
    n_classes = len(read_json(FINETUNED_DIR / "config.json")["id2label"])
    not_candidate = candidate_verdict(float(evaluation["accuracy"]), n_classes)
    write_export(FINETUNED_DIR, EXPORT_DIR)
    check = check_export(EXPORT_DIR, params.export.check_images, params.evaluate.batch_size)
    check |= {"allowed_mean_probability_diff": params.export.max_mean_probability_diff}
    check |= {"candidate": not_candidate is None, "not_candidate_because": not_candidate or ""}
    METRICS_FILE.parent.mkdir(parents=True, exist_ok=True)
    METRICS_FILE.write_text(json.dumps(check, indent=2) + "\n")
    print(
        f"export: {EXPORT_DIR}/ classified {check['check_images']} test images ({check['images_from']}) through pipeline(): "
        f"mean probability difference from evaluate {check['mean_probability_diff']:.2e} (allowed {check['allowed_mean_probability_diff']:.2e}; "
        f"largest {check['max_probability_diff']:.2e}); accuracy {check['pipeline_accuracy']:.4f} vs evaluated {check['evaluated_accuracy']:.4f}"
    )
    if check["mean_probability_diff"] > check["allowed_mean_probability_diff"]:
        raise PipelineError(
            f"the exported model's class probabilities differ from the evaluated ones by {check['mean_probability_diff']:.4f} on average "
            f"(allowed {check['allowed_mean_probability_diff']:.4f}, export.max_mean_probability_diff; up to {check['max_probability_diff']:.4f} on test image {check['worst_index']}): "
            f"models/export does not compute what was evaluated; check that {FINETUNED_DIR}'s preprocessor_config.json (size, resample, "
            f"image_mean/image_std) is the one it was trained with, and re-run finetune and evaluate (see {METRICS_FILE})"
        )
    if not_candidate:
        print(f"warning: export: {EXPORT_DIR} will be registered without the alias @candidate: {not_candidate}", file=sys.stderr)


if __name__ == "__main__":
    run_stage(main, "export")
