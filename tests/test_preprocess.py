"""preprocess stores mixed-size photos at the model's input size (its processor's filter), at
data.storage_size when that is set, and same-size data (CIFAR) at its native size."""
from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
import yaml
from PIL import Image

from stages import efficientnet_lite, preprocess
from stages.dataformat import load_split, read_raw
from stages.download import resolve_source, write_raw
from stages.errors import PipelineError
from stages.inputsize import ModelInput, model_input
from tests.test_params import repo_params

SIZES = [(120, 90), (90, 120), (150, 150)]  # (width, height): three sizes, landscape, portrait, square
CLASSES = ("apple", "boat")


def photo(size: tuple[int, int], seed: int) -> bytes:
    """A real JPEG with detail at every scale (smooth gradients plus noise), so filters differ."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (w + h)], axis=-1)
    pixels = np.clip(base + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def mixed_tree(tmp_path_factory):
    """2 classes, 3 sizes: 6 train and 3 test images per class."""
    root = tmp_path_factory.mktemp("mixed") / "tree"
    seed = 0
    for split, per_class in (("train", 6), ("test", 3)):
        for label in CLASSES:
            (root / split / label).mkdir(parents=True)
            for i in range(per_class):
                seed += 1
                (root / split / label / f"{i}.jpg").write_bytes(photo(SIZES[i % len(SIZES)], seed))
    return root


def run_preprocess(source, tmp_path, monkeypatch, **values) -> dict[str, np.ndarray]:
    """download + preprocess of `source` in a project at tmp_path with `values` set; the stored uint8 pixels."""
    raw = repo_params()
    raw["fraction"], raw["data"]["test_fraction"], raw["data"]["source"] = 1.0, 1.0, str(source)
    for key, value in values.items():
        section, leaf = key.split("__")
        raw[section][leaf] = value
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)
    write_raw(resolve_source(str(source)), str(source))
    preprocess.main()
    return {split: load_split(split).pixels.numpy() for split in ("train", "val", "test")}


def originals(split: str = "test") -> list[Image.Image]:
    """The test images as downloaded, in the processed split's order."""
    frame = read_raw(split)
    return [Image.open(io.BytesIO(frame["image"].iloc[int(i)])).convert("RGB") for i in load_split(split).index]


def test_mixed_sizes_are_stored_at_the_models_input_size_as_its_processor_resizes(mixed_tree, tmp_path, monkeypatch):
    stored = run_preprocess(mixed_tree, tmp_path, monkeypatch, model__name=efficientnet_lite.NAME)  # data.storage_size: null
    assert all(pixels.shape[1:] == (3, 224, 224) for pixels in stored.values())
    assert sum(len(p) for p in stored.values()) == 18
    # exactly what the model's own image processor makes of the original files (no rescale, no normalise)
    processor = efficientnet_lite.image_processor(efficientnet_lite.NAME)
    images = originals()
    expected = processor(images, do_rescale=False, do_normalize=False, return_tensors="np")["pixel_values"]
    assert np.array_equal(stored["test"], expected.round().astype(np.uint8))
    assert model_input(efficientnet_lite.NAME, None) == ModelInput(224, 224, processor.resample)


def test_model_image_size_and_a_saved_models_processor_set_the_stored_size_and_filter(mixed_tree, tiny_vit, tmp_path, monkeypatch):
    stored = run_preprocess(mixed_tree, tmp_path / "a", monkeypatch, model__name=str(tiny_vit))  # its processor: 32×32
    assert stored["train"].shape[1:] == (3, 32, 32)
    # a processor that resizes bicubic: the stored images are resized bicubic, to model.image_size
    bicubic = tmp_path / "bicubic-vit"
    shutil.copytree(tiny_vit, bicubic)
    config = json.loads((bicubic / "preprocessor_config.json").read_text())
    (bicubic / "preprocessor_config.json").write_text(json.dumps(config | {"resample": int(Image.BICUBIC)}))
    stored = run_preprocess(mixed_tree, tmp_path / "b", monkeypatch, model__name=str(bicubic), model__image_size=48)
    assert stored["test"].shape[1:] == (3, 48, 48)
    resized = {f: np.stack([np.asarray(img.resize((48, 48), f)) for img in originals()]).transpose(0, 3, 1, 2) for f in (Image.BICUBIC, Image.BILINEAR)}
    assert np.array_equal(stored["test"], resized[Image.BICUBIC]) and not np.array_equal(stored["test"], resized[Image.BILINEAR])


def test_an_explicit_storage_size_wins(mixed_tree, tmp_path, monkeypatch):
    stored = run_preprocess(mixed_tree, tmp_path, monkeypatch, model__name=efficientnet_lite.NAME, data__storage_size=64)
    assert all(pixels.shape[1:] == (3, 64, 64) for pixels in stored.values())


@pytest.mark.parametrize("storage_size", [None, 64])
def test_same_size_data_keeps_its_native_size(small_tree, tmp_path, monkeypatch, storage_size):
    stored = run_preprocess(small_tree, tmp_path, monkeypatch, model__name=efficientnet_lite.NAME, data__storage_size=storage_size)
    assert all(pixels.shape[1:] == (3, 32, 32) for pixels in stored.values())
    images = originals()
    assert np.array_equal(stored["test"], np.stack([np.asarray(img) for img in images]).transpose(0, 3, 1, 2))


def test_a_model_without_an_image_processor_is_named(mixed_tree, tiny_vit, tmp_path, monkeypatch):
    bare = tmp_path / "bare"
    shutil.copytree(tiny_vit, bare)
    (bare / "preprocessor_config.json").unlink()
    with pytest.raises(PipelineError, match="has no preprocessor_config.json"):
        run_preprocess(mixed_tree, tmp_path / "p", monkeypatch, model__name=str(bare))


def test_every_core_stores_the_same_files_as_one(mixed_tree, tmp_path, monkeypatch):
    """The worker processes' path (the stage decodes in its own process below PARALLEL_MIN_IMAGES images):
    mixed sizes resized, byte for byte the files one process writes."""
    from stages import decoding

    run_preprocess(mixed_tree, tmp_path / "one", monkeypatch, model__name=efficientnet_lite.NAME)
    monkeypatch.setattr(decoding, "PARALLEL_MIN_IMAGES", 0)
    monkeypatch.setattr(decoding, "cores", lambda: 2)
    monkeypatch.setattr(preprocess, "CHUNK_IMAGES", 4)  # several tasks, written out of order
    run_preprocess(mixed_tree, tmp_path / "two", monkeypatch, model__name=efficientnet_lite.NAME)
    for split in ("train", "val", "test"):
        name = f"data/processed/{split}.safetensors"
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
