"""Shared fixtures: real CIFAR-10 JPEGs from the committed archive, small trees of them, a tiny saved ViT."""
from __future__ import annotations

import io
import os
import shutil
import tarfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CIFAR_ARCHIVE = ROOT / "data" / "cifar10-jpg.tgz"  # data/README.md
SMALL_CLASSES = ("cat", "dog", "ship")


@pytest.fixture(scope="session")
def cifar_archive() -> Path:
    return CIFAR_ARCHIVE


@pytest.fixture(scope="session")
def small_tree(cifar_archive, tmp_path_factory) -> Path:
    """A 3-class folder `<split>/<class>/<image>` of real CIFAR JPEGs: 20 train and 6 test per class."""
    root = tmp_path_factory.mktemp("small") / "tree"
    wanted = {"train": 20, "test": 6}
    counts: dict[tuple[str, str], int] = {}
    with tarfile.open(cifar_archive, "r:gz") as archive:
        for member in archive:
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) < 3 or parts[-3] not in wanted or parts[-2] not in SMALL_CLASSES:
                continue
            key = (parts[-3], parts[-2])
            if counts.get(key, 0) < wanted[parts[-3]]:
                counts[key] = counts.get(key, 0) + 1
                target = root / parts[-3] / parts[-2] / parts[-1]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(archive.extractfile(member).read())
            if len(counts) == 6 and all(counts[k] >= wanted[k[0]] for k in counts):
                break
    (root / "README.md").write_text("not an image: skipped by the loaders\n")
    return root


@pytest.fixture(scope="session")
def small_archives(small_tree, tmp_path_factory) -> dict[str, Path]:
    """The small tree as .tgz (with a wrapping folder, as archives often have) and as .zip."""
    out = tmp_path_factory.mktemp("archives")
    tgz = out / "small.tgz"
    with tarfile.open(tgz, "w:gz") as archive:
        archive.add(small_tree, arcname="small")
    zipped = Path(shutil.make_archive(str(out / "small"), "zip", small_tree))
    return {"tgz": tgz, "zip": zipped}


@pytest.fixture(scope="session")
def dvc_cache(tmp_path_factory) -> Path:
    """One DVC cache for all test repos: its run-cache lets later repos skip the identical download."""
    return tmp_path_factory.mktemp("dvc-cache")


@pytest.fixture(scope="session")
def tiny_vit(tmp_path_factory) -> Path:
    """A tiny ViT with a 1,000-class head saved by save_pretrained: the path google/vit-base-patch16-224 takes."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessorPil

    path = tmp_path_factory.mktemp("models") / "tiny-vit"
    config = ViTConfig(
        image_size=32, patch_size=8, hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=96, num_labels=1000
    )
    ViTForImageClassification(config).save_pretrained(path)
    ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(path)  # needs no torchvision
    return path


@pytest.fixture(scope="session")
def exported_tiny_vit(tiny_vit, tmp_path_factory) -> Path:
    """The tiny ViT with a fresh head for the small tree's classes, saved as finetune saves a model (with model.onnx)."""
    import torch

    from stages.modeling import load_pretrained, save_model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("models") / "exported-tiny-vit"
    save_model(*load_pretrained(str(tiny_vit), list(SMALL_CLASSES)), path, (32, 32))
    return path


def require_debian_package(package: str, installed: bool) -> None:
    """A test that needs a Debian package PyPI lacks (chromium, postgresql) skips, in one line naming it,
    where it is missing; under CI=true it fails instead (`make test` installs both where apt-get can)."""
    if installed:
        return
    message = f"needs Debian's {package} package: apt-get install {package} (make test installs it as root or with sudo)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true: {message}")
    pytest.skip(message)


def jpeg_bytes(color: tuple[int, int, int], size: tuple[int, int] = (32, 32)) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="JPEG")
    return buffer.getvalue()


def set_params(project: Path, **values) -> None:
    """Set params.yaml keys in `project`, nested keys spelled with `__` (train__lr=1e-3)."""
    path = project / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for key, value in values.items():
        node = params
        *parents, leaf = key.split("__")
        for part in parents:
            node = node[part]
        node[leaf] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under `make test`'s workers (pytest-xdist --dist loadgroup), keep each module's tests on one worker, so
    its module-scoped fixtures are built once; test_pipeline's end-to-end tests share none and spread."""
    for item in items:
        if item.module.__name__ != "test_pipeline":
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))
