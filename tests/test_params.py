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
    """The embedded offline job: the committed CIFAR-10 archive, the embedded Lite0, head mode at 1%."""
    params = load_params(ROOT / "params.yaml")
    assert params.fraction == 0.01
    assert params.data.source == "data/cifar10-jpg.tgz" and (ROOT / params.data.source).is_file()
    assert params.model.name == "efficientnet-lite0" and params.train.mode == "head"
    assert (params.train.lr, params.train.epochs) == (3e-3, 30)  # head mode's auto recipe
    assert params.data.storage_size is None  # mixed-size images are stored at the model's input size
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
        ("train.lr", "fast"),
        ("train.epochs", "many"),
        ("train.epochs", 0),
        ("train.precision", "fp8"),
        ("train.mode", "frozen"),
        ("train.augment", "yes"),
        ("train.augment", True),
        ("train.keep_epoch", "best"),
        ("train.label_smoothing", 1),
        ("train.mixup", -0.2),
        ("data.test_fraction", 0),
        ("data.val_fraction", 1),
        ("model.image_size", 4),
        ("data.storage_size", 4),
        ("data.storage_size", "big"),
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
    assert params_from_dict(with_value("data.storage_size", 64)).data.storage_size == 64


def test_missing_params_file_says_where_to_run(tmp_path):
    with pytest.raises(PipelineError, match="params.yaml not found"):
        load_params(tmp_path / "params.yaml")


@pytest.mark.parametrize(
    "mode, model, lr, epochs",
    [
        ("head", "efficientnet-lite0", 3e-3, 30),
        ("full", "efficientnet-lite0", 5e-4, 5),
        ("full", "google/vit-base-patch16-224", 5e-5, 5),
        ("head", "google/vit-base-patch16-224", 3e-3, 30),
        ("head-then-full", "efficientnet-lite2", 1e-4, 3),
        ("head-then-full", "google/vit-base-patch16-224", 1e-5, 3),
    ],
)
def test_auto_recipe_follows_the_mode_and_the_kind_of_model(mode, model, lr, epochs):
    raw = with_value("train.mode", mode)
    raw["model"]["name"], raw["train"]["lr"], raw["train"]["epochs"] = model, "auto", "auto"
    raw["train"]["head_lr"], raw["train"]["head_epochs"] = "auto", "auto"
    train = params_from_dict(raw).train
    assert (train.lr, train.epochs) == (lr, epochs)
    assert (train.head_lr, train.head_epochs) == (3e-3, 30)  # head mode's recipe, whatever the mode
    assert flatten(params_from_dict(raw))["train.lr"] == lr  # what MLflow logs: the resolved value


def test_an_explicit_number_wins_over_auto_and_a_saved_model_is_known_by_its_config(tmp_path):
    raw = with_value("train.mode", "head")
    raw["train"]["lr"], raw["train"]["epochs"] = 0.01, "auto"
    assert (params_from_dict(raw).train.lr, params_from_dict(raw).train.epochs) == (0.01, 30)
    (tmp_path / "config.json").write_text('{"model_type": "efficientnet_lite"}')
    raw = with_value("train.mode", "full")
    raw["model"]["name"], raw["train"]["lr"] = str(tmp_path), "auto"
    assert params_from_dict(raw).train.lr == 5e-4


def test_head_mode_allows_only_the_augmentation_its_cached_features_hold():
    for augment in ("none", "flip"):
        assert params_from_dict(with_value("train.augment", augment)).train.augment == augment
    with pytest.raises(PipelineError, match=r"train\.augment='trivialaugment' is invalid in train\.mode=head; allowed: none or flip: .*needs train\.mode full or head-then-full") as refused:
        params_from_dict(with_value("train.augment", "trivialaugment"))
    assert "\n" not in str(refused.value)
    full = with_value("train.augment", "randaugment")
    full["train"]["mode"] = "head-then-full"
    assert params_from_dict(full).train.augment == "randaugment"
