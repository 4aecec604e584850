"""Stage 5: write models/export/, a self-contained model directory with its model card, and prove it.

The directory holds the ONNX graph `model.onnx` (stages/runtime.py: what `image-predict` and the
registered MLflow model run, without PyTorch), safetensors weights, a config with the label names, the
image processor's config, and README.md, the model card. `pipeline("image-classification",
model="models/export")` also runs it (an EfficientNet-Lite after `import stages.efficientnet_lite`).
The proof: the exported directory, loaded as a user loads it (ONNX Runtime, its image processor's
settings, from the original image files), gives a batch of test images class probabilities that differ
from those the evaluate stage recorded by at most `export.max_mean_probability_diff` on average. The
export resizes in PIL, evaluate in torch: a correct export differs by rounding, which a confident model
may amplify on the odd image (the largest difference is recorded, not judged), while a wrong
normalisation or input size moves the probabilities of most images.
metrics/export.json records the check and whether the model may be aliased `candidate` in the
registry (the track stage registers it): only when its test accuracy (metrics/eval.json) is above
chance (1/classes). A model with non-finite weights (diverged training) fails before anything is written.
Imports neither torch nor transformers.
"""
from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from PIL import Image

from stages.dataformat import (
    EVAL_FILE, EXPORT_DIR, EXPORT_FILE, FINETUNE_FILE, FINETUNED_DIR, PREDICTIONS_FILE, RAW_DIR, SOURCE_INPUT, decode_rgb, load_split, probability_column, read_json, read_raw,
)
from stages.errors import PipelineError, run_stage
from stages.inputsize import PROCESSOR_FILE, processor_size
from stages.params import Params, load_params
from stages.runtime import ONNX_FILE, ImageClassifier

METRICS_FILE = EXPORT_FILE


def write_export(source: Path, target: Path) -> None:
    """finetune saved the model with save_pretrained (safetensors, config with id2label, the image
    processor's config) and its ONNX graph: the export is those files, byte for byte."""
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target)


def temperature_note(trained: dict) -> str:
    """Where the model card's temperature came from, as finetune chose it (metrics/finetune.json)."""
    if "fitted_temperature" not in trained:
        return "the model has no `classifier` head to fold one into"
    if trained["temperature"] == 1.0:
        return (f"left at 1: the {trained['fitted_temperature']:.3f} fitted on the validation split lowered its NLL only from "
                f"{trained['val_nll']:.4f} to {trained['val_nll_fitted']:.4f}")
    return f"fitted on the validation split: its NLL {trained['val_nll']:.4f} at temperature 1, {trained['val_nll_fitted']:.4f} at this one"


def model_card(params: Params, check: dict, evaluated: dict, n_classes: int) -> str:
    """models/export/README.md: what the model is, what it was trained on and how, how good it is, how to use it.
    `evaluated`: metrics/eval.json."""
    trained = read_json(FINETUNE_FILE)
    source = (read_json(SOURCE_INPUT) or {}) | (read_json(RAW_DIR / "source.json") or {})  # a local source's digest; a Hub one's revision
    data_digest = f"sha256 {source['sha256']}" if source.get("sha256") else f"Hub revision {source['revision']}" if source.get("revision") else "no digest recorded"
    meta = {"base_model": params.model.name, "pipeline_tag": "image-classification", "library_name": "transformers", "tags": ["onnx", "dvc"]}
    meta["model-index"] = [{"name": EXPORT_DIR.name, "results": [{"task": {"type": "image-classification"}, "metrics": [{"type": "accuracy", "value": evaluated["accuracy"]}]}]}]
    kept_by = params.train.keep_epoch + ("" if params.train.keep_epoch == trained["keep_epoch"] else f": {trained['keep_epoch']}")  # auto: the rule it stood for
    epochs = f"{trained['epochs']} epochs" + (f" after a head phase of {trained['head_epochs']} at lr {trained['head_lr']}" if "head_epochs" in trained else "")
    return f"""---
{yaml.safe_dump(meta, sort_keys=False)}---
# {params.model.name}, fine-tuned on {n_classes} classes of `{params.data.source}`

- **Base model:** `{params.model.name}`, revision {trained.get("base_model_revision") or "as shipped (local or embedded: its digest is in data/inputs/model.json)"}.
- **Data:** `{params.data.source}` ({data_digest}); a stratified share `fraction` = {params.fraction} of its train split
  (seed {params.seed}): {trained["train_images"]} training and {trained["val_images"]} validation images.
- **Recipe:** `train.mode` = {params.train.mode}, {epochs}, lr {trained["lr"]}, batch {params.train.batch_size},
  {trained["precision"]} on {trained["device"]}; epoch {trained["kept_epoch"]} kept by `train.keep_epoch` = {kept_by} (validation accuracy {trained["kept_val_accuracy"]:.4f}, NLL {trained["kept_val_loss"]:.4f});
  augmentation {params.train.augment}, label smoothing {params.train.label_smoothing}, mixup {params.train.mixup}.
- **Test accuracy:** {evaluated["accuracy"]:.4f} (95% interval {evaluated["accuracy_ci95_low"]:.4f}-{evaluated["accuracy_ci95_high"]:.4f})
  on {evaluated["test_images"]} test images; macro F1 {evaluated["macro_f1"]:.4f}.
- **Calibration:** temperature {evaluated["temperature"]:.3f}, folded into the classifier ({temperature_note(trained)}):
  expected calibration error {evaluated["ece"]:.4f} (at temperature 1: {evaluated["ece_at_temperature_1"]:.4f}).
- **Export check:** {check["check_images"]} test images through `{ONNX_FILE}` from {check["images_from"]}: mean probability
  difference from the evaluated model {check["mean_probability_diff"]:.2e}.

## Intended use
Classifying images like those it was trained on, into these classes only: a baseline or a starting point
for transfer learning, not a model for decisions about people. Its accuracy holds for images drawn as the
test split was; a small share of training data makes it less reliable on anything else.

## Use
`{ONNX_FILE}` takes `pixel_values` (N×3×h×w float32, made by `{PROCESSOR_FILE}`) and gives `logits`.
Without PyTorch: `image-predict --model {EXPORT_DIR} photo.jpg`, or `stages.runtime.ImageClassifier.load(...)`;
with transformers: `pipeline("image-classification", model="{EXPORT_DIR}")` (an EfficientNet-Lite after `import stages.efficientnet_lite`).
"""


def check_images(evaluated: pd.DataFrame, model_size: tuple[int, int] | None) -> tuple[list[Image.Image], str]:
    """The evaluated test images as a user would give them, and where they came from.

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
    """Class probabilities of the first `n_images` evaluated test images by the exported model, against
    the probabilities the evaluate stage recorded for them."""
    evaluated = pd.read_csv(PREDICTIONS_FILE).head(n_images)
    classifier = ImageClassifier.load(target)
    labels = classifier.labels
    columns = [probability_column(label) for label in labels]
    if not set(columns) <= set(evaluated.columns):
        raise PipelineError(f"{PREDICTIONS_FILE} holds no probability for every class ({', '.join(columns)}); re-run the evaluate stage (dvc repro -f evaluate)")
    resized_to = processor_size(classifier.settings)
    if classifier.input_size and resized_to and classifier.input_size != resized_to:
        raise PipelineError(
            f"the exported model takes {'x'.join(map(str, classifier.input_size))} images, but {FINETUNED_DIR}'s {PROCESSOR_FILE} resizes to "
            f"{'x'.join(map(str, resized_to))}: use the image processor it was trained with, and re-run finetune"
        )
    images, source = check_images(evaluated, resized_to)
    try:
        exported = classifier.probabilities(images, batch_size)
    except Exception as err:  # e.g. a ViT fed another size than its position embeddings take
        raise PipelineError(
            f"the exported model cannot classify test images ({type(err).__name__}: {str(err).splitlines()[0]}); "
            f"{FINETUNED_DIR}'s preprocessor_config.json does not fit the model: use the one it was trained with, and re-run finetune"
        ) from None
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
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise PipelineError(f"{model_dir} holds no *.safetensors weights; re-run the finetune stage (dvc repro -f finetune)")
    for file in files:
        with safe_open(str(file), framework="np") as fh:
            for name in fh.keys():
                tensor = fh.get_tensor(name)
                if np.issubdtype(tensor.dtype, np.floating) and not np.isfinite(tensor).all():
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
    params = load_params()
    if not (FINETUNED_DIR / "config.json").exists():
        raise PipelineError(f"{FINETUNED_DIR} holds no model; run the finetune stage first (dvc repro finetune)")
    for path in (PREDICTIONS_FILE, EVAL_FILE, FINETUNE_FILE):
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
    (EXPORT_DIR / "README.md").write_text(model_card(params, check, evaluation, n_classes))
    print(
        f"export: {EXPORT_DIR}/ classified {check['check_images']} test images ({check['images_from']}) through ONNX Runtime: "
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
