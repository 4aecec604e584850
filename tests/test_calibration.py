"""Calibration metrics against hand-worked values, the temperature fit, and folding it into real models."""
import numpy as np
import pytest
import torch
from transformers import AutoModelForImageClassification

from stages import efficientnet_lite
from stages.calibration import CONFIG_KEY, MIN_NLL_GAIN, calibration, choose_temperature, expected_calibration_error, fit_temperature, fold_temperature, reliability_bins
from stages.modeling import PixelTransform, classifier_head, load_pretrained
from tests.test_modeling import cifar_images


def test_metrics_match_hand_worked_values():
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.8, 0.2]])
    labels = np.array([0, 1, 1, 0])
    # bins (0.8, 0.867] and (0.867, 0.933]: confidences 0.8 (right) and 0.9 (right); (0.533, 0.6]: 0.6 (wrong); (0.667, 0.733]: 0.7 (right)
    expected_ece = (abs(1 - 0.9) + abs(0 - 0.6) + abs(1 - 0.7) + abs(1 - 0.8)) / 4
    metrics = calibration(probs, labels)
    assert metrics.ece == pytest.approx(expected_ece)
    assert metrics.nll == pytest.approx(-np.mean(np.log([0.9, 0.4, 0.7, 0.8])))
    assert metrics.brier == pytest.approx(np.mean([2 * 0.1**2, 2 * 0.6**2, 2 * 0.3**2, 2 * 0.2**2]))
    bins = reliability_bins(probs, labels)
    assert len(bins) == 15 and sum(b["images"] for b in bins) == 4
    assert expected_calibration_error(np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([0, 1])) == 0  # confidence 1 lands in the last bin


def test_the_fitted_temperature_is_the_one_the_labels_were_drawn_with():
    generator = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(20_000, 10, generator=generator)
    labels = torch.multinomial((logits / 2.5).softmax(-1), 1, generator=generator).squeeze(1)
    assert fit_temperature(logits, labels) == pytest.approx(2.5, rel=0.04)
    # an overconfident model is scaled down: its ECE falls
    probs = logits.softmax(-1).numpy()
    scaled = (logits / fit_temperature(logits, labels)).softmax(-1).numpy()
    assert expected_calibration_error(scaled, labels.numpy()) < expected_calibration_error(probs, labels.numpy()) / 3


def test_a_temperature_is_applied_only_where_it_lowers_the_validation_nll_enough():
    generator = torch.Generator().manual_seed(1)
    logits = 3 * torch.randn(200, 10, generator=generator)
    for drawn_with, applied in ((2.5, True), (1.0, False)):  # overconfident: T fits far from 1; calibrated: near 1
        labels = torch.multinomial((logits / drawn_with).softmax(-1), 1, generator=generator).squeeze(1)
        choice = choose_temperature(logits, labels)
        assert choice.fitted_temperature == pytest.approx(fit_temperature(logits, labels))
        assert choice.val_nll == pytest.approx(float(torch.nn.functional.cross_entropy(logits.double(), labels)))
        gain = 1 - choice.val_nll_fitted / choice.val_nll
        assert choice.applied is applied and (gain >= MIN_NLL_GAIN) is applied
        assert choice.temperature == (choice.fitted_temperature if applied else 1.0)


@pytest.mark.parametrize("name", ["tiny-vit", efficientnet_lite.NAME])
def test_a_folded_temperature_divides_the_logits_and_changes_no_prediction(small_tree, tiny_vit, name, tmp_path):
    vit = name == "tiny-vit"
    model, processor = load_pretrained(str(tiny_vit) if vit else name, ["cat", "dog", "ship"], image_size=None if vit else 32)
    model.eval()
    pixels = torch.stack([torch.from_numpy(np.array(img)).permute(2, 0, 1) for img in cifar_images(small_tree, 8)])
    inputs = PixelTransform(processor)(pixels)
    with torch.no_grad():
        before = model(pixel_values=inputs).logits
        fold_temperature(classifier_head(model, name), 1.7)
        after = model(pixel_values=inputs).logits
    torch.testing.assert_close(after, before / 1.7)
    assert torch.equal(after.argmax(-1), before.argmax(-1))
    # what finetune saves carries both the scaled weights and the temperature
    setattr(model.config, CONFIG_KEY, 1.7)
    model.save_pretrained(tmp_path)
    back = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    assert getattr(back.config, CONFIG_KEY) == 1.7
    with torch.no_grad():
        torch.testing.assert_close(back(pixel_values=inputs).logits, after)
