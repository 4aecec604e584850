import json
from collections import Counter

import numpy as np
import pytest
import torch
import yaml

from stages.dataformat import TensorSplit, load_split, processed_path, save_split, split_off, stratified_share
from stages.errors import PipelineError
from stages.params import params_from_dict
from stages.preprocess import draw_indices
from tests.test_params import with_value

CIFAR_LIKE = np.repeat(np.arange(10), 5000)  # CIFAR-10 train: 5,000 images per class


def test_stratified_share_keeps_class_proportions_and_is_seeded():
    picked = stratified_share(CIFAR_LIKE, 0.01, seed=42)
    assert len(picked) == 500
    assert Counter(CIFAR_LIKE[picked].tolist()) == {c: 50 for c in range(10)}
    assert np.array_equal(picked, stratified_share(CIFAR_LIKE, 0.01, seed=42))
    assert not np.array_equal(picked, stratified_share(CIFAR_LIKE, 0.01, seed=7))
    assert np.array_equal(stratified_share(CIFAR_LIKE, 1.0, seed=42), np.arange(len(CIFAR_LIKE)))


def test_validation_is_held_out_of_the_drawn_share():
    drawn = stratified_share(CIFAR_LIKE, 0.01, seed=0)
    train, val = split_off(drawn, CIFAR_LIKE, 0.1, seed=0)
    assert set(train).isdisjoint(val) and set(train) | set(val) == set(drawn)
    assert Counter(CIFAR_LIKE[val].tolist()) == {c: 5 for c in range(10)}


def test_draw_indices_refuses_a_fraction_that_empties_a_class():
    params = params_from_dict(with_value("fraction", 0.0002))  # 10 images for 10 classes: none left to validate
    with pytest.raises(PipelineError, match=r"fraction=0.0002 leaves class .* allowed: fraction >= 0.0004"):
        draw_indices(CIFAR_LIKE, np.repeat(np.arange(10), 1000), [str(c) for c in range(10)], params)


def test_draw_indices_sizes_follow_the_parameters():
    params = params_from_dict(yaml.safe_load(yaml.safe_dump(with_value("fraction", 0.05))))
    rows = draw_indices(CIFAR_LIKE, np.repeat(np.arange(10), 1000), [str(c) for c in range(10)], params)
    assert len(rows["train"]) + len(rows["val"]) == 2500
    assert len(rows["val"]) == round(2500 * params.data.val_fraction)
    assert len(rows["test"]) == round(10_000 * params.data.test_fraction)


def test_tensor_split_round_trip_is_compact(tmp_path):
    pixels = torch.randint(0, 256, (100, 3, 32, 32), dtype=torch.uint8)
    split = TensorSplit(pixels, torch.arange(100) % 3, torch.arange(100) * 7, ["a", "b", "c"])
    save_split(split, processed_path("train", tmp_path))
    back = load_split("train", tmp_path)
    assert back.pixels.dtype == torch.uint8 and torch.equal(back.pixels, pixels)
    assert torch.equal(back.labels, split.labels) and torch.equal(back.index, split.index)
    assert back.classes == ["a", "b", "c"]
    per_image = processed_path("train", tmp_path).stat().st_size / 100
    assert per_image < 3.2 * 1024  # 3,072 pixel bytes + label + index, vs ~605 KB as float32 224×224


def test_a_split_filled_in_out_of_order_is_what_safetensors_writes(tmp_path):
    """create_split leaves room for the pixels, which decoding workers write in any order; the file is then
    byte for byte safetensors' save_file (class names beyond ASCII too), and so is save_split's."""
    from safetensors.numpy import save_file

    from stages.dataformat import create_split

    rng = np.random.default_rng(0)
    pixels, labels, index = rng.integers(0, 256, (5, 3, 4, 6), dtype=np.uint8), np.array([0, 1, 2, 1, 0]), np.array([3, 9, 11, 20, 21])
    classes = ["chat", "chien", "éléphant"]
    save_file({"pixels": pixels, "labels": labels, "index": index}, str(tmp_path / "library.safetensors"), metadata={"classes": json.dumps(classes, ensure_ascii=False)})
    start = create_split(tmp_path / "in-place.safetensors", labels, index, classes, (3, 4, 6))
    with open(tmp_path / "in-place.safetensors", "r+b") as out:
        for first, end in ((2, 5), (0, 2)):
            out.seek(start + first * pixels[0].nbytes)
            out.write(pixels[first:end].tobytes())
    assert (tmp_path / "in-place.safetensors").read_bytes() == (tmp_path / "library.safetensors").read_bytes()
    save_split(TensorSplit(pixels, labels, index, classes), tmp_path / "saved.safetensors")
    assert (tmp_path / "saved.safetensors").read_bytes() == (tmp_path / "library.safetensors").read_bytes()


@pytest.mark.parametrize("mode, file", [("I;16", "deep.png"), ("I", "deep.tif")])  # PIL writes no mode-I PNG; TIFF keeps it
def test_a_16_bit_png_is_scaled_to_8_bits_not_clipped_to_white(mode, file, tmp_path):
    import io

    from PIL import Image

    from stages.dataformat import decode_rgb

    ramp = np.linspace(0, 65535, 32 * 32).round().astype(np.uint16).reshape(32, 32)
    image = Image.fromarray(ramp) if mode == "I;16" else Image.fromarray(ramp.astype(np.int32))
    assert image.mode == mode
    image.save(tmp_path / file)
    data = (tmp_path / file).read_bytes()
    with Image.open(io.BytesIO(data)) as reread:
        assert reread.mode == mode  # a 16-bit greyscale PNG opens as I;16
    decoded = np.asarray(decode_rgb(data, file))
    assert decoded.shape == (32, 32, 3) and decoded.dtype == np.uint8
    expected = np.rint(ramp / 257).astype(np.uint8)
    assert np.array_equal(decoded[..., 0], expected) and np.array_equal(decoded[..., 1], expected)
    assert decoded.min() == 0 and decoded.max() == 255 and len(np.unique(decoded)) > 200  # not all white


def test_an_8_bit_image_decodes_as_before(tmp_path):
    from tests.conftest import jpeg_bytes

    from stages.dataformat import decode_rgb

    assert np.asarray(decode_rgb(jpeg_bytes((10, 200, 30)), "x.jpg")).mean(axis=(0, 1)).round().tolist() == pytest.approx([10, 200, 30], abs=3)


SMALL = np.repeat(np.arange(3), 20)  # the small tree: 20 train images per class
SMALL_TEST = np.repeat(np.arange(3), 6)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("fraction", 1e-9, r"^params.yaml: fraction=1e-09 leaves class '0' with 0 train image\(s\); allowed: fraction >= 0.1 for this data$"),
        ("data.test_fraction", 1e-9, r"^params.yaml: data.test_fraction=1e-09 leaves class '0' with 0 test image\(s\); allowed: data.test_fraction >= 0.1667 for this data$"),
        ("data.val_fraction", 1e-9, r"^params.yaml: data.val_fraction=1e-09 holds out 1 of 60 drawn train images, fewer than the 3 classes; allowed: data.val_fraction >= 0.05"),
    ],
)
def test_a_share_too_small_for_a_stratified_draw_is_named_not_sklearns_error(key, value, message):
    raw = with_value(key, value)
    raw["fraction"] = value if key == "fraction" else 1.0
    raw["data"]["test_fraction"] = value if key == "data.test_fraction" else 1.0
    params = params_from_dict(raw)
    with pytest.raises(PipelineError, match=message):
        draw_indices(SMALL, SMALL_TEST, ["0", "1", "2"], params)
