from pathlib import Path

import pytest
import yaml

from stages.errors import PipelineError
from stages.params import flatten, load_params, params_from_dict

ROOT = Path(__file__).resolve().parents[1]


def repo_params() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def with_value(key: str, value) -> dict:
    raw = repo_params()
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        node = node[part]
    node[leaf] = value
    return raw


def test_repo_params_load_with_the_documented_defaults():
    params = load_params(ROOT / "params.yaml")
    assert params.fraction == 0.01
    assert params.data.source == "uoft-cs/cifar10"
    assert params.model.name == "google/vit-base-patch16-224"
    # at least 1,000 CIFAR-10 test images are evaluated by default
    assert params.data.test_fraction * 10_000 >= 1_000
    assert flatten(params)["train.lr"] == params.train.lr


@pytest.mark.parametrize(
    "key, value",
    [
        ("fraction", 0),
        ("fraction", 1.5),
        ("fraction", "lots"),
        ("seed", -1),
        ("train.batch_size", 0),
        ("train.batch_size", 2.5),
        ("train.lr", -1e-4),
        ("train.lr", 0),
        ("train.epochs", 0),
        ("train.precision", "fp8"),
        ("train.mode", "frozen"),
        ("train.augment", "yes"),
        ("data.test_fraction", 0),
        ("data.val_fraction", 1),
        ("model.image_size", 4),
        ("model.name", " "),
    ],
)
def test_invalid_values_name_the_key_and_what_is_allowed(key, value):
    with pytest.raises(PipelineError, match=rf"{key}=.*allowed"):
        params_from_dict(with_value(key, value))


def test_unknown_and_missing_keys_are_named():
    raw = with_value("train.lrr", 0.1)
    with pytest.raises(PipelineError, match="unknown key train.lrr"):
        params_from_dict(raw)
    raw = repo_params()
    del raw["train"]["lr"]
    with pytest.raises(PipelineError, match="missing key train.lr"):
        params_from_dict(raw)


def test_numbers_as_dvc_writes_them_are_accepted():
    # `dvc exp run -S train.lr=5e-5` writes 5e-05, which YAML 1.1 reads as a string
    params = params_from_dict(yaml.safe_load(yaml.safe_dump(with_value("train.lr", "5e-05"))))
    assert params.train.lr == pytest.approx(5e-5)
    assert params_from_dict(with_value("model.image_size", 128)).model.image_size == 128


def test_missing_params_file_says_where_to_run(tmp_path):
    with pytest.raises(PipelineError, match="params.yaml not found"):
        load_params(tmp_path / "params.yaml")
