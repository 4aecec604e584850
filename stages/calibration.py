"""How far to trust a model's probabilities, and temperature scaling to make them trustworthy.

Temperature scaling (Guo et al., ICML 2017, "On Calibration of Modern Neural Networks") divides the
logits by one number T fitted on the validation split to minimise the negative log-likelihood. It
never changes which class has the largest logit, so accuracy stays as it was. Here T is folded into
the classifier's last linear layer (weight/T, bias/T): the saved and exported model then gives the
calibrated probabilities through any loader, `pipeline()` included, with no custom code.

On a validation split of a few dozen images a fitted T is noisy, and one that lowers those images' NLL
a little can raise the test split's calibration error. So T is only applied when it lowers the
validation NLL by MIN_NLL_GAIN or more (choose_temperature); otherwise the model keeps T = 1.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from scipy.optimize import minimize_scalar
from torch.nn import functional as F

ECE_BINS = 15
CONFIG_KEY = "calibration_temperature"  # config.json of a model whose classifier has T folded in
MIN_NLL_GAIN = 0.05  # share of the validation NLL at T = 1 that a fitted T must remove to be applied


@dataclass(frozen=True)
class Calibration:
    ece: float  # expected calibration error: the confidence-weighted gap between confidence and accuracy
    nll: float  # mean negative log-likelihood of the true class
    brier: float  # mean squared distance of the probability vector from the one-hot label (0-2)

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def reliability_bins(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> list[dict]:
    """Per equal-width confidence bin (top-class probability): its edges, images, mean confidence and accuracy."""
    confidence, correct = probs.max(1), probs.argmax(1) == labels
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)  # (lo, hi]; 0 goes to the first
    rows = []
    for b in range(bins):
        inside = which == b
        n = int(inside.sum())
        rows.append({
            "low": float(edges[b]), "high": float(edges[b + 1]), "images": n,
            "confidence": float(confidence[inside].mean()) if n else float("nan"),
            "accuracy": float(correct[inside].mean()) if n else float("nan"),
        })
    return rows


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    rows = reliability_bins(probs, labels, bins)
    return float(sum(r["images"] * abs(r["accuracy"] - r["confidence"]) for r in rows if r["images"]) / len(labels))


def calibration(probs: np.ndarray, labels: np.ndarray) -> Calibration:
    """ECE, NLL and Brier score of class probabilities N×classes against integer labels."""
    n = len(labels)
    true_class = probs[np.arange(n), labels]
    onehot = np.eye(probs.shape[1])[labels]
    return Calibration(
        ece=expected_calibration_error(probs, labels),
        nll=float(-np.log(np.clip(true_class, 1e-12, None)).mean()),
        brier=float(((probs - onehot) ** 2).sum(1).mean()),
    )


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The T > 0 minimising the NLL of softmax(logits / T), searched over log T in [-3, 3] (T from 0.05 to 20)."""
    logits, labels = logits.double(), labels.long()

    def nll(log_t: float) -> float:
        return float(F.cross_entropy(logits / np.exp(log_t), labels))

    return float(np.exp(minimize_scalar(nll, bounds=(-3.0, 3.0), method="bounded", options={"xatol": 1e-6}).x))


@dataclass(frozen=True)
class TemperatureChoice:
    temperature: float  # applied: the fitted one, or 1 where it does not lower the validation NLL enough
    fitted_temperature: float  # the NLL-minimising T on the validation split
    val_nll: float  # validation NLL at T = 1
    val_nll_fitted: float  # at fitted_temperature

    @property
    def applied(self) -> bool:
        return self.temperature != 1.0

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def choose_temperature(logits: torch.Tensor, labels: torch.Tensor) -> TemperatureChoice:
    """fit_temperature, applied only when it lowers the validation NLL by at least MIN_NLL_GAIN of it."""
    fitted = fit_temperature(logits, labels)
    logits, labels = logits.double(), labels.long()
    before, after = float(F.cross_entropy(logits, labels)), float(F.cross_entropy(logits / fitted, labels))
    temperature = fitted if after <= before * (1 - MIN_NLL_GAIN) else 1.0
    return TemperatureChoice(temperature, fitted, before, after)


def fold_temperature(head: torch.nn.Module, temperature: float) -> None:
    """Divide the last linear layer of `head` by `temperature`, so the model's logits come out divided by it."""
    linear = [m for m in head.modules() if isinstance(m, torch.nn.Linear)]
    if not linear:
        raise TypeError(f"no linear layer in the classifier head {type(head).__name__} to fold a temperature into")
    with torch.no_grad():
        linear[-1].weight.div_(temperature)
        if linear[-1].bias is not None:
            linear[-1].bias.div_(temperature)
