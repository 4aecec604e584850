"""Are the embedded EfficientNet-Lite weights and their input right? A check on real images, no training.

Each variant, with its own ImageNet head (the `_fc` layer the pipeline replaces), classifies the
CIFAR-10 test images of the four vehicle classes, fed exactly as the pipeline feeds them (its image
processor through stages.modeling.PixelTransform). A hit is a top-5 ImageNet class that names such a
vehicle. Wrong weights drop the hit rate towards chance (about 5%); right ones score alike across
variants, however blurred the 32-px images are when enlarged. Also the
mean norm of the pooled features the head trains on: a variant whose features had another scale would
need another head learning rate.
Run: python -m bench.lite_backbones   -> bench/results/lite_backbones.md (a few minutes on 2 cores)
"""
from __future__ import annotations

import torch
from efficientnet_lite_pytorch import EfficientNet

from bench.common import cifar_images, write_result
from stages.efficientnet_lite import image_processor, weights_file
from stages.modeling import PixelTransform
from stages.params import EMBEDDED_MODELS

PER_CLASS = 100  # test images of each vehicle class
# ImageNet-1k class indices that name each CIFAR-10 vehicle class
IMAGENET_CLASSES = {
    "airplane": {404, 405, 895, 908},  # airliner, airship, warplane, wing
    "automobile": {436, 468, 511, 581, 609, 627, 656, 661, 751, 817},  # beach wagon, cab, convertible, grille, jeep, limousine, minivan, Model T, racer, sports car
    "ship": {484, 510, 554, 576, 625, 628, 724, 814, 833, 871, 913},  # catamaran, container ship, fireboat, gondola, lifeboat, liner, pirate, speedboat, submarine, trimaran, wreck
    "truck": {555, 569, 595, 656, 675, 717, 734, 864, 867},  # fire engine, garbage truck, harvester, minivan, moving van, pickup, police van, tow truck, trailer truck
}


def main() -> None:
    split = cifar_images(10_000, "test")
    wanted = {split.classes.index(name): ids for name, ids in IMAGENET_CLASSES.items()}
    keep = torch.cat([(split.labels == label).nonzero()[:PER_CLASS, 0] for label in wanted])
    pixels, labels = split.pixels[keep], split.labels[keep]
    rows = []
    for variant in EMBEDDED_MODELS:
        model = EfficientNet.from_name(variant)
        model.load_state_dict(torch.load(weights_file(variant), map_location="cpu", weights_only=True))
        model.eval()
        head, model._fc = model._fc, torch.nn.Identity()  # the model now returns the pooled features
        transform = PixelTransform(image_processor(variant))
        with torch.no_grad():
            features = torch.cat([model(transform(batch)) for batch in pixels.split(50)])
            top5 = head(features).topk(5).indices
        hits = sum(bool(set(top.tolist()) & wanted[int(label)]) for top, label in zip(top5, labels))
        rows.append({
            "model": variant, "input px": transform.size[0], "vehicle images": len(labels),
            "top-5 hit rate": f"{hits / len(labels):.3f}", "pooled feature norm, mean": f"{features.norm(dim=1).mean():.1f}",
        })
        print(rows[-1], flush=True)
    notes = [
        f"The first {PER_CLASS} airplane, automobile, ship and truck images of CIFAR-10's test split, enlarged to each model's input size.",
        "A hit: one of the top 5 ImageNet classes names that vehicle (the class lists are in bench/lite_backbones.py); chance is about 5% (about 10 of 1,000 classes, 5 guesses).",
    ]
    write_result("lite_backbones", "Embedded EfficientNet-Lite backbones on CIFAR-10 vehicles, with their ImageNet heads", rows, notes)


if __name__ == "__main__":
    main()
