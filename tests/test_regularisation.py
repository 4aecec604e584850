"""train.augment on real CIFAR images, and the training loss with label smoothing and mixup."""
import numpy as np
import pytest
import torch
from torch.nn import functional as F

from stages.regularisation import Augment, TrainingLoss
from tests.test_modeling import cifar_images


@pytest.fixture(scope="module")
def images(small_tree):
    return [torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous() for img in cifar_images(small_tree, 16)]


def augmented(name: str, images: list[torch.Tensor], seed: int) -> list[torch.Tensor]:
    torch.manual_seed(seed)
    augment = Augment(name)
    return [augment(image) for image in images]


def test_none_leaves_images_and_flip_mirrors_about_half(images):
    assert all(torch.equal(a, b) for a, b in zip(augmented("none", images, 0), images))
    flipped = augmented("flip", images * 4, 0)
    mirrored = [torch.equal(a, b.flip(-1)) for a, b in zip(flipped, images * 4)]
    kept = [torch.equal(a, b) for a, b in zip(flipped, images * 4)]
    assert all(m or k for m, k in zip(mirrored, kept)) and 16 <= sum(mirrored) <= 48


@pytest.mark.parametrize("name", ["trivialaugment", "randaugment"])
def test_policies_change_most_images_keep_their_form_and_repeat_with_the_seed(images, name):
    out = augmented(name, images, 0)
    assert all(a.dtype == torch.uint8 and a.shape == b.shape for a, b in zip(out, images))
    changed = [not torch.equal(a, b) and not torch.equal(a, b.flip(-1)) for a, b in zip(out, images)]
    assert sum(changed) >= len(images) // 2  # TrivialAugment's identity op and zero strengths leave a few as they were
    assert all(torch.equal(a, b) for a, b in zip(out, augmented(name, images, 0)))
    assert not all(torch.equal(a, b) for a, b in zip(out, augmented(name, images, 1)))


def test_the_loss_is_cross_entropy_with_smoothing_and_a_blend_under_mixup():
    generator = torch.Generator().manual_seed(0)
    inputs, labels = torch.randn(32, 8, generator=generator), torch.randint(0, 4, (32,), generator=generator)
    head = torch.nn.Linear(8, 4)
    with torch.no_grad():
        assert float(TrainingLoss(0.0, 0.0)(head, inputs, labels)) == pytest.approx(float(F.cross_entropy(head(inputs), labels)))
        assert float(TrainingLoss(0.1, 0.0)(head, inputs, labels)) == pytest.approx(float(F.cross_entropy(head(inputs), labels, label_smoothing=0.1)))
    torch.manual_seed(3)
    mixed = TrainingLoss(0.1, 0.4)(head, inputs, labels)
    torch.manual_seed(3)  # the same draws: lam, then the partner of each row
    lam = float(torch.distributions.Beta(0.4, 0.4).sample())
    order = torch.randperm(32)
    with torch.no_grad():
        logits = head(lam * inputs + (1 - lam) * inputs[order])
        expected = lam * F.cross_entropy(logits, labels, label_smoothing=0.1) + (1 - lam) * F.cross_entropy(logits, labels[order], label_smoothing=0.1)
    assert 0 < lam < 1 and float(mixed.detach()) == pytest.approx(float(expected))
    mixed.backward()
    assert head.weight.grad is not None
