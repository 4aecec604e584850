"""What the DVC cache holds per image at each storage size: `python -m bench.storage` -> bench/results/storage.md.

Runs the real preprocess stage on a folder of generated photos of mixed sizes (300-500 px, real
JPEGs) with `data.storage_size` set to each side, and once with null (EfficientNet-Lite0: 224 px),
and divides the bytes of data/processed/ (the files DVC caches) by the images in it.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import yaml

from bench.export_check import ROOT, working_directory
from tests.test_preprocess import photo

SIDES = (32, 64, 224, 240, 260)  # CIFAR native; the old default; Lite0 (and ViT-B/16); Lite1; Lite2
PHOTO_SIZES = [(300, 400), (400, 300), (500, 500), (480, 360)]


def main() -> None:
    from stages import preprocess
    from stages.download import resolve_source, write_raw

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        seed = 0
        for split, per_class in (("train", 20), ("test", 10)):
            for label in ("a", "b"):
                (tmp / "photos" / split / label).mkdir(parents=True)
                for i in range(per_class):
                    seed += 1
                    (tmp / "photos" / split / label / f"{i}.jpg").write_bytes(photo(PHOTO_SIZES[i % len(PHOTO_SIZES)], seed))
        params = yaml.safe_load((ROOT / "params.yaml").read_text())
        params["fraction"], params["data"]["test_fraction"], params["data"]["source"] = 1.0, 1.0, str(tmp / "photos")
        params["model"]["name"] = "efficientnet-lite0"
        project = tmp / "project"
        project.mkdir()
        with working_directory(project):
            write_raw(resolve_source(params["data"]["source"]), params["data"]["source"])
            for side in (*SIDES, None):
                params["data"]["storage_size"] = side
                Path("params.yaml").write_text(yaml.safe_dump(params))
                preprocess.main()
                files = list(Path("data/processed").glob("*.safetensors"))
                images = 60
                rows.append((side, sum(f.stat().st_size for f in files) / images))
    lines = ["# Bytes per image in data/processed (what DVC caches), by storage side", "",
             "60 generated JPEG photos of 300-500 px, 2 classes; uint8 pixels plus int64 label and index, safetensors.", "",
             "| data.storage_size | side | bytes per image | 3·side² |", "| --- | --- | --- | --- |"]
    for side, per_image in rows:
        actual = side or 224
        lines.append(f"| {side if side else 'null (Lite0)'} | {actual} | {per_image:,.0f} | {3 * actual * actual:,} |")
    out = ROOT / "bench" / "results" / "storage.md"
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text())


if __name__ == "__main__":
    main()
