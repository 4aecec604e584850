"""Stage 4: test accuracy with its 95% interval, per-class precision/recall/F1, confusion matrix, calibration.

Writes metrics/eval.json (accuracy 0-1, the number of test images, and how far the class
probabilities can be trusted: `ece`, `nll`, `brier` with finetune's temperature folded in, the
`temperature` and `ece_at_temperature_1`, as the model was before), metrics/eval_speed.json
(images per second, apart: it differs run to run), metrics/eval_per_class.csv,
metrics/test_predictions.csv (one row per test image: raw index, actual and predicted label, the
predicted label's probability and every class's probability `prob_<class>`; the DVC confusion
plot and the export check read it), metrics/confusion_matrix.png and metrics/misclassified.png (the most confidently wrong
test images with their true and predicted labels), metrics/reliability.png (accuracy against confidence,
before and after temperature scaling).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
import torch
from scipy.stats import binomtest
from sklearn.metrics import classification_report
from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification

import stages.efficientnet_lite  # noqa: F401  (registers EfficientNet-Lite, should the model be one)
from stages import figures
from stages.calibration import CONFIG_KEY, calibration, expected_calibration_error, reliability_bins
from stages.dataformat import EVAL_FILE, FINETUNED_DIR, PREDICTIONS_FILE, TensorSplit, load_split, probability_column, read_json
from stages.errors import PipelineError, run_stage
from stages.hardware import pick_device
from stages.inputsize import PROCESSOR_FILE
from stages.modeling import PixelTransform, quiet_transformers, runtime_batches, split_logits
from stages.params import Params, load_params
from stages.runtime import ONNX_FILE

METRICS_FILE = EVAL_FILE
SPEED_FILE = Path("metrics/eval_speed.json")  # apart, so that eval.json of a deterministic run is deterministic
PER_CLASS_FILE = Path("metrics/eval_per_class.csv")
CONFUSION_PNG = Path("metrics/confusion_matrix.png")
MISCLASSIFIED_PNG = Path("metrics/misclassified.png")
RELIABILITY_PNG = Path("metrics/reliability.png")


def uses_runtime(params: Params) -> bool:
    return params.train.mode != "head" and pick_device() == "cpu"


def logits_on(test: TensorSplit, params: Params) -> torch.Tensor:
    """Logits N×classes of every test image by models/finetuned: from the cached features in head mode, else
    on the CPU by its ONNX graph in ONNX Runtime, on a GPU by PyTorch."""
    if uses_runtime(params):
        transform = PixelTransform(read_json(FINETUNED_DIR / PROCESSOR_FILE))
        return torch.cat(list(runtime_batches(FINETUNED_DIR / ONNX_FILE, transform, test.pixels, params.evaluate.batch_size, "test")))
    model = AutoModelForImageClassification.from_pretrained(FINETUNED_DIR)
    processor = AutoImageProcessor.from_pretrained(FINETUNED_DIR)
    return split_logits(model, processor, "test", test, params, params.evaluate.batch_size)


def folded_temperature() -> float:
    """The temperature finetune folded into models/finetuned's classifier; 1 for a model saved otherwise."""
    return float(getattr(AutoConfig.from_pretrained(FINETUNED_DIR), CONFIG_KEY, 1.0))


def main() -> None:
    params = load_params()
    if not (FINETUNED_DIR / "config.json").exists():
        raise PipelineError(f"{FINETUNED_DIR} holds no model; run the finetune stage first (dvc repro finetune)")
    quiet_transformers()
    test = load_split("test")
    started = time.perf_counter()
    logits = logits_on(test, params)
    seconds = time.perf_counter() - started
    temperature = folded_temperature()
    probs = logits.softmax(-1)
    calibrated = probs.numpy()
    unscaled = (logits * temperature).softmax(-1).numpy()  # as the model was before finetune folded the temperature in
    confidences, preds = probs.max(-1)
    labels = test.labels.numpy()

    correct = int((preds == test.labels).sum())
    n = len(test)
    interval = binomtest(correct, n).proportion_ci(confidence_level=0.95, method="wilson")
    actual = [test.classes[i] for i in test.labels.tolist()]
    predicted = [test.classes[i] for i in preds.tolist()]
    report = classification_report(actual, predicted, labels=test.classes, output_dict=True, zero_division=0)
    metrics = {
        "accuracy": correct / n,
        "accuracy_ci95_low": interval.low,
        "accuracy_ci95_high": interval.high,
        "test_images": n,
        "macro_f1": report["macro avg"]["f1-score"],
    }
    metrics |= calibration(calibrated, labels).as_dict()
    metrics |= {"temperature": temperature, "ece_at_temperature_1": expected_calibration_error(unscaled, labels)}
    speed = {"eval_images_per_second": round(n / seconds, 2)}

    METRICS_FILE.parent.mkdir(parents=True, exist_ok=True)
    METRICS_FILE.write_text(json.dumps(metrics, indent=2) + "\n")
    SPEED_FILE.write_text(json.dumps(speed, indent=2) + "\n")
    per_class = pd.DataFrame(report).T.loc[test.classes].rename_axis("class").reset_index()
    per_class.to_csv(PER_CLASS_FILE, index=False)
    per_label = {probability_column(label): probs[:, i].numpy() for i, label in enumerate(test.classes)}
    pd.DataFrame({"index": test.index.numpy(), "actual": actual, "predicted": predicted, "confidence": confidences.numpy()} | per_label).to_csv(
        PREDICTIONS_FILE, index=False
    )
    figures.save(figures.confusion(actual, predicted, test.classes), CONFUSION_PNG)
    figures.save(figures.most_confidently_wrong(test.pixels, actual, predicted, confidences), MISCLASSIFIED_PNG)
    figures.save(figures.reliability(reliability_bins(unscaled, labels), reliability_bins(calibrated, labels), temperature), RELIABILITY_PNG)
    print(
        f"evaluate: accuracy {metrics['accuracy']:.4f} (95% CI {interval.low:.4f}-{interval.high:.4f}) on {n} test images; "
        f"ECE {metrics['ece']:.4f} at temperature {temperature:.3f} ({metrics['ece_at_temperature_1']:.4f} at 1)"
    )


if __name__ == "__main__":
    run_stage(main, "evaluate")
