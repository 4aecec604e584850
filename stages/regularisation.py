"""What helps a small training share generalise: augmentation of the stored uint8 images, label smoothing
and mixup in the training loss (train.augment, train.label_smoothing, train.mixup).

- Augmentation works on each stored image at its stored size, before the batch is resized for the model:
  `flip` mirrors half the images; `trivialaugment` (Müller & Hutter, ICCV 2021) adds one random operation
  at a random strength, `randaugment` (Cubuk et al., 2020) two at strength 9 of 30, each after a random
  flip: kornia's implementations, an image at a time, because kornia draws one policy per batch.
- Label smoothing (Szegedy et al., 2016) trains towards 1 - e on the true class and e spread over all.
- Mixup (Zhang et al., ICLR 2018) trains on blends lam·x_i + (1 - lam)·x_j of a batch and its shuffled
  self, the loss blended alike, lam ~ Beta(alpha, alpha) once per batch. In head mode the blend is of the
  cached features, which for a linear head is the same as blending its inputs.
Random draws use torch's generator, which the stages seed (and the Trainer restores on a resume).
Only training uses these; validation and evaluation see the images and the plain loss.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.nn import functional as F

RANDAUGMENT_OPS, RANDAUGMENT_STRENGTH = 2, 9  # timm's rand-m9-n2, as torchvision's RandAugment defaults


class Augment:
    """train.augment on one uint8 C×H×W image: a uint8 image of the same size."""

    def __init__(self, name: str):
        self.name, self.policy = name, None
        if name in ("trivialaugment", "randaugment"):
            from kornia.augmentation.auto import RandAugment, TrivialAugment  # here: its import takes most of a second

            self.policy = TrivialAugment() if name == "trivialaugment" else RandAugment(n=RANDAUGMENT_OPS, m=RANDAUGMENT_STRENGTH)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.name == "none":
            return pixels
        if torch.rand(()) < 0.5:
            pixels = pixels.flip(-1)
        if self.policy is None:
            return pixels
        return (self.policy(pixels[None].float() / 255)[0] * 255).round().clamp(0, 255).to(torch.uint8)


@dataclass(frozen=True)
class TrainingLoss:
    """The loss a training step minimises: cross-entropy with train.label_smoothing, on mixup blends when train.mixup > 0."""

    label_smoothing: float
    mixup: float  # alpha; 0: off

    def __call__(self, forward: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.mixup == 0:
            return F.cross_entropy(forward(inputs), labels, label_smoothing=self.label_smoothing)
        lam = float(torch.distributions.Beta(self.mixup, self.mixup).sample())
        order = torch.randperm(len(labels), device=labels.device)
        logits = forward(lam * inputs + (1 - lam) * inputs[order])
        return (
            lam * F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
            + (1 - lam) * F.cross_entropy(logits, labels[order], label_smoothing=self.label_smoothing)
        )
