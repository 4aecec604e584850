"""Stage 4: fine-tune `model.name` on the processed train share.

A fresh head sized to the data's classes replaces the pretrained one.
- train.mode=full: the transformers Trainer trains every weight, evaluates on the validation share
  and checkpoints every epoch, keeps the epoch train.keep_epoch names, and, when the stage is
  re-run after an interruption with the same inputs, resumes from the newest complete checkpoint
  (stages/checkpoints.py: where they live, when they go).
- train.mode=head: the backbone stays as pretrained; only the head is trained, on the features the
  features stage cached, in seconds. The epoch train.keep_epoch names is kept, as in full mode.
- train.mode=head-then-full: head mode first (train.head_lr, train.head_epochs), then full mode from
  that model (train.lr, train.epochs: a smaller step, fewer epochs), so that a fresh head's large early
  gradients do not wreck the pretrained features; BatchNorm layers keep the statistics the head was
  trained with. The trained head counts as epoch 0 of the full phase: it is kept if train.keep_epoch
  prefers it to every later epoch.
train.keep_epoch: val_loss (the default) keeps the epoch of lowest validation NLL, which moves smoothly
with the model, where validation accuracy on a few dozen images moves in steps of 1/n and ties often;
last keeps the schedule's end; val_accuracy the first epoch of highest accuracy. Training minimises
cross-entropy with train.label_smoothing and train.mixup, on images augmented by train.augment
(stages/regularisation.py); validation always measures the plain NLL.
Either way a temperature fitted on the validation split is folded into the classifier where it lowers
the validation NLL enough (stages/calibration.py),
and the whole model goes to models/finetuned/, with its ONNX graph (`model.onnx`, stages/runtime.py). Each epoch's row is added to metrics/finetune_epochs.csv
as the epoch ends, so `dvc plots show` and `dvc exp show` follow a running experiment.

With train.processes N > 1, the Trainer's training (full mode, and the full phase of head-then-full)
runs as N data-parallel processes under torchrun: gloo on CPU, NCCL on GPUs, train.batch_size still
the global batch. This process prepares the checkpoints, starts them and waits; only the first of them
saves the model and writes metrics/. Head mode trains in this one process (seconds), whatever N.
"""
from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.nn import functional as F
from transformers import (
    AutoImageProcessor,
    AutoModelForImageClassification,
    PreTrainedModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    get_cosine_schedule_with_warmup,
    set_seed,
)

from stages import figures
from stages.calibration import CONFIG_KEY, MIN_NLL_GAIN, TemperatureChoice, choose_temperature, fold_temperature
from stages.checkpoints import Checkpoints, checkpoints_for, inputs_fingerprint
from stages.dataformat import EPOCHS_FILE, FINETUNE_FILE, FINETUNED_DIR, TensorSplit, load_features, load_split, read_json
from stages.errors import PipelineError, run_stage
from stages.hardware import pick_device_and_precision
from stages.modeling import PixelTransform, base_model_revision, check_model_name, classifier_head, load_pretrained, quiet_transformers, save_model, split_logits
from stages.params import Params, load_params
from stages.regularisation import Augment, TrainingLoss

METRICS_FILE = FINETUNE_FILE
SPEED_FILE = Path("metrics/finetune_speed.json")  # apart, so that finetune.json of a deterministic run is deterministic
EPOCH_COLUMNS = ["epoch", "train_loss", "val_loss", "val_accuracy"]
CURVES_PNG = Path("metrics/learning_curves.png")
CHECKPOINTS_ENV = "FINETUNE_CHECKPOINTS"  # the data-parallel processes' checkpoint folder
RESUME_ENV = "FINETUNE_RESUME"  # the checkpoint they resume from ("": none)


def world_size() -> int:
    """The number of data-parallel processes this one belongs to (torchrun sets WORLD_SIZE), 1 outside torchrun."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_first_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


class PixelDataset(torch.utils.data.Dataset):
    """Items of a processed split as uint8 tensors; training items augmented by train.augment."""

    def __init__(self, split: TensorSplit, augment: str = "none"):
        self.split, self.augment = split, Augment(augment)

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.augment(self.split.pixels[i]), "labels": self.split.labels[i]}


class Collate:
    """Stack uint8 items and resize/normalise the whole batch at once."""

    def __init__(self, transform: PixelTransform):
        self.transform = transform

    def __call__(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        pixels = torch.stack([item["pixel_values"] for item in items])
        return {"pixel_values": self.transform(pixels), "labels": torch.stack([item["labels"] for item in items])}


def accuracy(eval_pred) -> dict[str, float]:
    logits, labels = eval_pred
    return {"accuracy": float((np.argmax(logits, axis=-1) == labels).mean())}


# train.keep_epoch: the column of the epoch table that chooses, and whether larger is better. Ties go to the
# first such epoch, as the Trainer keeps it; `last` keeps the schedule's end.
SELECTION = {"val_loss": ("val_loss", False), "val_accuracy": ("val_accuracy", True)}
TRAINER_METRIC = {"val_loss": "loss", "val_accuracy": "accuracy", "last": "loss"}  # the Trainer's metric_for_best_model


# train.keep_epoch: auto keeps the last epoch on a validation split below this many images, else the one of
# lowest validation NLL. On 50 and 100 images the NLL-chosen epoch gained nothing over the last in head mode,
# and in head-then-full at 1% it went back to the head phase on one seed of three (test accuracy 0.718
# against 0.749 for the last; seed spread 0.020 against 0.001); from 250 images on it gained 0.002-0.004
# in head mode (bench/results/selection.md, accuracy.md).
SMALL_VALIDATION = 200


def keep_rule(setting: str, val_images: int) -> str:
    """The rule train.keep_epoch stands for on a validation split of `val_images` images."""
    if setting != "auto":
        return setting
    return "last" if val_images < SMALL_VALIDATION else "val_loss"


def kept_row(epochs: pd.DataFrame, rule: str) -> int:
    """The index of the epoch train.keep_epoch keeps in an epoch table."""
    if rule == "last":
        return int(epochs.index[-1])
    column, larger = SELECTION[rule]
    return int(epochs[column].idxmax() if larger else epochs[column].idxmin())


class RegularisedTrainer(Trainer):
    """The Trainer, with train.label_smoothing and train.mixup in its training loss (stages/regularisation.py).
    Evaluation keeps the model's own plain cross-entropy: the validation NLL that train.keep_epoch reads."""

    loss_is_scaled_for_ga = False  # a per-batch mean

    def __init__(self, *args, loss: TrainingLoss, **kwargs):
        super().__init__(*args, **kwargs)
        self.training_loss = loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss = self.training_loss(lambda pixels: model(pixel_values=pixels).logits, inputs["pixel_values"], inputs["labels"])
        return (loss, None) if return_outputs else loss


def check_forward(model: torch.nn.Module, collate: Collate, split: TensorSplit, params: Params) -> None:
    """One tiny forward pass, so a model that cannot take these inputs fails now, not mid-epoch."""
    batch = collate([PixelDataset(split)[i] for i in range(min(2, len(split)))])
    try:
        with torch.no_grad():
            model.eval()(**batch)
    except (RuntimeError, ValueError) as err:
        raise PipelineError(
            f"model.name={params.model.name!r} cannot classify {tuple(batch['pixel_values'].shape[1:])} inputs "
            f"(model.image_size={params.model.image_size}): {str(err).splitlines()[0]}"
        ) from None
    model.train()


def check_finite_loss(value: float, which: str, epoch: int, params: Params, phase: str = "") -> None:
    """Stop at a non-finite loss (diverged training), naming the learning rate, before anything is written.
    `phase` "head_": the head phase of head-then-full, whose keys are train.head_lr and train.head_epochs."""
    if not math.isfinite(value):
        lr, epochs, key = getattr(params.train, f"{phase}lr"), getattr(params.train, f"{phase}epochs"), f"train.{phase}lr"
        raise PipelineError(
            f"{key}={lr:g}: the {which} loss became {value} in epoch {epoch} of {epochs} (train.mode={params.train.mode}); "
            f"training diverged and no model was written: lower {key} (e.g. {lr / 10:g}) or set {key}: auto"
        )


class FiniteLossCallback(TrainerCallback):
    """Full mode: the Trainer logs the epoch's mean training loss, then the validation loss, before it
    saves the epoch's checkpoint; a non-finite one stops training there."""

    def __init__(self, params: Params):
        self.params = params

    def on_log(self, args, state, control, logs=None, **kwargs):
        epoch = max(1, math.ceil(state.epoch or 0))
        for key, which in (("loss", "training"), ("eval_loss", "validation")):
            if logs and key in logs:
                check_finite_loss(float(logs[key]), which, epoch, self.params)


def epoch_table(log_history: list[dict]) -> pd.DataFrame:
    """One row per epoch: train_loss (mean over the epoch), val_loss, val_accuracy."""
    rows: dict[int, dict] = {}
    for entry in log_history:
        epoch = int(round(entry.get("epoch", 0)))
        if "loss" in entry:
            rows.setdefault(epoch, {"epoch": epoch})["train_loss"] = entry["loss"]
        if "eval_accuracy" in entry:
            rows.setdefault(epoch, {"epoch": epoch}).update(val_loss=entry["eval_loss"], val_accuracy=entry["eval_accuracy"])
    return pd.DataFrame([rows[epoch] for epoch in sorted(rows)], columns=EPOCH_COLUMNS)


def write_epochs(rows: pd.DataFrame, append: bool = False) -> None:
    """metrics/finetune_epochs.csv as training goes: rewritten with `rows`, or `rows` added as epochs end.
    Only the first data-parallel process writes."""
    if is_first_process():
        EPOCHS_FILE.parent.mkdir(parents=True, exist_ok=True)
        rows.to_csv(EPOCHS_FILE, mode="a" if append else "w", header=not append, index=False, columns=EPOCH_COLUMNS)


class LiveEpochsCallback(TrainerCallback):
    """Full mode: the epochs so far when training starts (a resumed run's, after head-then-full's epoch 0),
    then each epoch's row once it is evaluated (the Trainer logs the epoch's loss, then evaluates)."""

    def __init__(self, before: list[dict]):
        self.before = before

    def on_train_begin(self, args, state, control, **kwargs):
        write_epochs(pd.DataFrame(self.before + epoch_table(state.log_history).to_dict("records"), columns=EPOCH_COLUMNS))

    def on_evaluate(self, args, state, control, **kwargs):
        write_epochs(epoch_table(state.log_history).tail(1), append=True)


def as_epoch_0(head: Trained, rule: str) -> pd.DataFrame:
    """head-then-full: its head phase's kept epoch, the full phase's epoch 0."""
    kept = head.epochs.loc[kept_row(head.epochs, rule)]
    return pd.DataFrame([{"epoch": 0} | {k: kept[k] for k in EPOCH_COLUMNS[1:]}])


@dataclass
class Trained:
    model: PreTrainedModel  # the kept epoch's (train.keep_epoch)
    processor: object
    epochs: pd.DataFrame  # one row per epoch: epoch, train_loss, val_loss, val_accuracy
    images_per_second: float  # training throughput


def keep_batchnorm_statistics(model: torch.nn.Module) -> None:
    """Every BatchNorm layer normalises with its pretrained running statistics, as the head was trained on,
    instead of the statistics of each small batch (which also overwrite the running ones): the Trainer
    puts the whole model in training mode every step, so a hook puts these layers back before each forward."""
    def inference_mode(layer: torch.nn.Module, _inputs) -> None:
        layer.eval()

    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.register_forward_pre_hook(inference_mode)


def train_full(params: Params, train: TensorSplit, val: TensorSplit, device: str, precision: str, checkpoints: Checkpoints, start: Trained | None = None) -> Trained | None:
    """Every weight with the Trainer, from the pretrained model with a fresh head, or from `start` (a trained head:
    its BatchNorm layers keep their statistics, see keep_batchnorm_statistics). In a data-parallel run, None
    in every process but the first, which alone saves."""
    # transformers 5 names ViT's weights differently in memory than in its files, and the Trainer
    # loads checkpoints by raw name with strict=False: the encoder would silently keep other weights
    # (on resume, and for load_best_model_at_end). So checkpoints are loaded with from_pretrained.
    resume = checkpoints.resume
    if resume:
        model, processor = AutoModelForImageClassification.from_pretrained(resume), AutoImageProcessor.from_pretrained(resume)
    elif start:
        model, processor = start.model, start.processor
    else:
        model, processor = load_pretrained(params.model.name, train.classes, params.model.image_size)
    model = model.to(memory_format=torch.channels_last)  # faster convolutions; a no-op for pure transformers
    if start:
        keep_batchnorm_statistics(model)
    collate = Collate(PixelTransform(processor))
    check_forward(model, collate, train, params)

    per_process_batch = params.train.batch_size // world_size()  # train.batch_size is the global batch
    args = TrainingArguments(
        output_dir=str(checkpoints.folder),
        num_train_epochs=params.train.epochs,
        per_device_train_batch_size=per_process_batch,
        per_device_eval_batch_size=per_process_batch,
        learning_rate=params.train.lr,
        weight_decay=params.train.weight_decay,  # AdamW; the Trainer exempts biases and norms
        warmup_steps=params.train.warmup_ratio,  # a float below 1 is a share of all steps
        lr_scheduler_type="cosine",
        eval_strategy="epoch",
        save_strategy="epoch",
        logging_strategy="epoch",
        metric_for_best_model=TRAINER_METRIC[params.train.keep_epoch],  # tracked in trainer.state; loaded below, not by the Trainer
        greater_is_better=params.train.keep_epoch == "val_accuracy",
        save_total_limit=2,  # the best epoch and the last, to resume from
        bf16=precision == "bf16",
        use_cpu=device == "cpu",
        seed=params.seed,
        data_seed=params.seed,
        dataloader_num_workers=0,  # the data is already in memory
        remove_unused_columns=False,
        report_to="none",  # the track stage logs to MLflow, once, from metrics/
        logging_nan_inf_filter=False,  # a non-finite loss must show, so FiniteLossCallback stops training
        ddp_backend=("gloo" if device == "cpu" else "nccl") if world_size() > 1 else None,
        ddp_find_unused_parameters=False,  # every weight gets a gradient: no extra pass over the graph
    )
    trainer = RegularisedTrainer(
        model=model,
        args=args,
        loss=TrainingLoss(params.train.label_smoothing, params.train.mixup),
        train_dataset=PixelDataset(train, params.train.augment),
        eval_dataset=PixelDataset(val),
        data_collator=collate,
        processing_class=processor,
        compute_metrics=accuracy,
        callbacks=[FiniteLossCallback(params), LiveEpochsCallback(as_epoch_0(start, params.train.keep_epoch).to_dict("records") if start else [])],
    )
    resumed_epochs = read_json(Path(resume) / "trainer_state.json")["epoch"] if resume else 0
    result = trainer.train(resume_from_checkpoint=resume)
    if not is_first_process():
        return None
    # `last`: the final checkpoint; save_total_limit keeps it beside the best one.
    kept = trainer.state.best_model_checkpoint if params.train.keep_epoch != "last" else f"{checkpoints.folder}/checkpoint-{trainer.state.global_step}"
    model = AutoModelForImageClassification.from_pretrained(kept)
    # Images actually trained on per second: the Trainer's own figure counts padded global batches.
    images_per_second = len(train) * (trainer.state.epoch - resumed_epochs) / result.metrics["train_runtime"]
    return Trained(model, processor, epoch_table(trainer.state.log_history), images_per_second)


def train_head(params: Params, train: TensorSplit, val_split: TensorSplit, phase: str = "") -> Trained:
    """Only the classifier, on the cached features, in a plain loop: same outputs as train_full, the same train.keep_epoch.
    With `phase` "head_" (head-then-full) for train.head_epochs at train.head_lr."""
    model, processor = load_pretrained(params.model.name, train.classes, params.model.image_size)
    head = classifier_head(model, params.model.name)
    data, val = load_features("train", train.labels), load_features("val", val_split.labels)
    n, batch_size, epochs = len(data["labels"]), params.train.batch_size, getattr(params.train, f"{phase}epochs")
    steps = epochs * math.ceil(n / batch_size)
    optimizer = torch.optim.AdamW(head.parameters(), lr=getattr(params.train, f"{phase}lr"), weight_decay=params.train.weight_decay)
    schedule = get_cosine_schedule_with_warmup(optimizer, int(params.train.warmup_ratio * steps), steps)
    generator = torch.Generator().manual_seed(params.seed)
    loss_of = TrainingLoss(params.train.label_smoothing, params.train.mixup)
    rows, states = [], []
    write_epochs(pd.DataFrame(columns=EPOCH_COLUMNS))
    started = time.perf_counter()
    for epoch in range(1, epochs + 1):
        head.train()
        # the cached features hold each image and its mirror: flips, also under head-then-full's stronger train.augment
        flip = torch.rand(n, generator=generator) < 0.5 if params.train.augment != "none" else torch.zeros(n, dtype=torch.bool)
        features = torch.where(flip[:, None], data["flipped"], data["features"])
        losses = []
        for batch in torch.randperm(n, generator=generator).split(batch_size):
            loss = loss_of(head, features[batch], data["labels"][batch])
            loss_value = loss.item()
            check_finite_loss(loss_value, "training", epoch, params, phase)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss_value * len(batch))
        head.eval()
        with torch.no_grad():
            logits = head(val["features"])
        val_accuracy = float((logits.argmax(-1) == val["labels"]).float().mean())
        val_loss = F.cross_entropy(logits, val["labels"]).item()
        check_finite_loss(val_loss, "validation", epoch, params, phase)
        rows.append({"epoch": epoch, "train_loss": sum(losses) / n, "val_loss": val_loss, "val_accuracy": val_accuracy})
        write_epochs(pd.DataFrame(rows[-1:]), append=True)
        states.append(copy.deepcopy(head.state_dict()))  # a linear layer's weights: small
    seconds = time.perf_counter() - started
    epochs_table = pd.DataFrame(rows)
    head.load_state_dict(states[kept_row(epochs_table, params.train.keep_epoch)])
    return Trained(model, processor, epochs_table, n * epochs / seconds)


def train_head_then_full(params: Params, train: TensorSplit, val: TensorSplit, device: str, precision: str, checkpoints: Checkpoints) -> Trained | None:
    """Head mode with train.head_lr/head_epochs, then full mode from its kept epoch; the trained head is epoch 0.
    The head phase runs on a resume too (seconds, deterministic): epoch 0 and the choice below need it; in
    a data-parallel run every process runs it alike, and only the first goes on after the full phase."""
    head = train_head(params, train, val, phase="head_")
    head_model = copy.deepcopy(head.model)  # the full phase trains head.model in place
    full = train_full(params, train, val, device, precision, checkpoints, start=head)
    if full is None:
        return None
    epochs = pd.concat([as_epoch_0(head, params.train.keep_epoch), full.epochs], ignore_index=True)
    model = head_model if kept_row(epochs, params.train.keep_epoch) == 0 else full.model  # the same rule as within each phase
    return Trained(model, full.processor, epochs, full.images_per_second)


def calibrate(model: PreTrainedModel, processor: object, val: TensorSplit, params: Params) -> TemperatureChoice | None:
    """Fit the temperature on the validation split and, where it lowers the validation NLL enough, fold it into
    the classifier (stages/calibration.py): the saved model's probabilities come out calibrated, its predictions
    unchanged. None for a model whose head is not named `classifier` (a few transformers models call it
    `head`): it is left as it is, at temperature 1."""
    if not isinstance(getattr(model, "classifier", None), torch.nn.Module):
        print(f"finetune: {type(model).__name__} has no `classifier` head to fold a temperature into; its probabilities are left uncalibrated")
        return None
    choice = choose_temperature(split_logits(model, processor, "val", val, params, params.train.batch_size), val.labels)
    if not choice.applied:
        print(
            f"finetune: temperature left at 1: the fitted {choice.fitted_temperature:.3f} lowers the validation NLL only from {choice.val_nll:.4f} "
            f"to {choice.val_nll_fitted:.4f} on {len(val)} images (less than {MIN_NLL_GAIN:.0%}), too little to trust"
        )
    fold_temperature(model.classifier, choice.temperature)
    setattr(model.config, CONFIG_KEY, choice.temperature)  # saved in config.json: what evaluate undoes to report the raw calibration
    return choice


NEAR_CHANCE = 0.05  # validation accuracy this close to 1/classes means the model learned next to nothing


def warn_if_near_chance(best_val_accuracy: float, n_classes: int, params: Params) -> None:
    chance = 1 / n_classes
    if best_val_accuracy < chance + NEAR_CHANCE:
        print(
            f"warning: the best validation accuracy {best_val_accuracy:.3f} is within {NEAR_CHANCE:.2f} of chance ({chance:.3f}): "
            f"the model learned next to nothing with train.lr={params.train.lr:g}, train.epochs={params.train.epochs} in train.mode={params.train.mode}; "
            "try train.lr: auto and train.epochs: auto, more epochs, or a larger fraction",
            file=sys.stderr,
        )


def train_and_save(params: Params, device: str, precision: str, checkpoints: Checkpoints | None) -> None:
    """Train (in this process, or as one of the data-parallel ones), calibrate, and write the model and metrics/.
    `checkpoints`: the full training's; None in head mode."""
    train, val = load_split("train"), load_split("val")
    params = replace(params, train=replace(params.train, keep_epoch=keep_rule(params.train.keep_epoch, len(val))))  # auto resolved
    set_seed(params.seed)  # the new head's initial weights
    started = time.perf_counter()
    if params.train.mode == "head":
        trained = train_head(params, train, val)
    elif params.train.mode == "full":
        trained = train_full(params, train, val, device, precision, checkpoints)
    else:
        trained = train_head_then_full(params, train, val, device, precision, checkpoints)
    if trained is None:  # a data-parallel process other than the first: it saves nothing
        return
    seconds = time.perf_counter() - started
    model, processor, epochs = trained.model, trained.processor, trained.epochs
    choice = calibrate(model, processor, val, params)

    save_model(model, processor, FINETUNED_DIR, tuple(train.pixels.shape[-2:]))  # its ONNX graph: what evaluate, export and serving run on a CPU
    kept = epochs.loc[kept_row(epochs, params.train.keep_epoch)]
    summary = {
        "kept_epoch": int(kept["epoch"]),
        "kept_val_accuracy": float(kept["val_accuracy"]),
        "kept_val_loss": float(kept["val_loss"]),
        "train_images": len(train),
        "val_images": len(val),
        # temperature: folded into the classifier; fitted_temperature and the validation NLL at 1 and at it: what chose it
        **(choice.as_dict() if choice else {"temperature": 1.0}),
        "world_size": world_size(),  # data-parallel training processes
    }
    speed = {"train_seconds": round(seconds, 2), "train_images_per_second": round(trained.images_per_second, 2)}
    # What differs between machines or over time for the same params, so `dvc exp show` shows it too.
    provenance = {"device": device, "precision": precision, "base_model_revision": base_model_revision(params.model.name)}
    provenance |= {"lr": params.train.lr, "epochs": params.train.epochs, "keep_epoch": params.train.keep_epoch}  # as resolved from `auto`
    if params.train.mode == "head-then-full":
        provenance |= {"head_lr": params.train.head_lr, "head_epochs": params.train.head_epochs}
    write_epochs(epochs)  # the whole table again: what the epochs written live add up to
    figures.save(figures.learning_curves(epochs), CURVES_PNG)
    METRICS_FILE.write_text(json.dumps(summary | provenance, indent=2) + "\n")
    SPEED_FILE.write_text(json.dumps(speed, indent=2) + "\n")
    on = f"{device}/{precision}" + (f" x {summary['world_size']} processes" if summary["world_size"] > 1 else "")
    print(
        f"finetune ({params.train.mode}): kept epoch {summary['kept_epoch']} of {len(epochs) - 1 if params.train.mode == 'head-then-full' else len(epochs)} "
        f"(keep_epoch {params.train.keep_epoch}; val accuracy {summary['kept_val_accuracy']:.4f}, val loss {summary['kept_val_loss']:.4f}) "
        f"on {on}, temperature {summary['temperature']:.3f} -> {FINETUNED_DIR}/"
    )
    warn_if_near_chance(float(epochs["val_accuracy"].max()), len(train.classes), params)


def train_in_processes(params: Params, checkpoints: Checkpoints) -> None:
    """train_and_save as train.processes data-parallel processes under torchrun (a free rendezvous port, so that
    queued experiments can train at once), each with its share of the cores; wait for them."""
    n = params.train.processes
    threads = max(1, (os.cpu_count() or 1) // n)  # torchrun's default is 1 thread each
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", "-m", "stages.finetune"]
    done = subprocess.run(cmd, env=os.environ | {"OMP_NUM_THREADS": str(threads), CHECKPOINTS_ENV: str(checkpoints.folder), RESUME_ENV: checkpoints.resume or ""})
    if done.returncode:
        raise PipelineError(f"the {n} data-parallel training processes (train.processes) stopped with exit status {done.returncode}; their own lines above say why")


def main() -> None:
    params = load_params()
    check_model_name(params.model.name)
    quiet_transformers()
    device, precision = pick_device_and_precision(params.train.precision)
    processes = params.train.processes if params.train.mode != "head" else 1
    if processes < params.train.processes:
        print(f"finetune: head mode trains the head in this one process (seconds); train.processes={params.train.processes} applies to full training")
    if device == "cuda" and processes > torch.cuda.device_count():  # NCCL: one GPU per process
        raise PipelineError(f"train.processes={processes} but this machine has {torch.cuda.device_count()} GPU(s); set train.processes to at most that")
    if params.train.mode == "head":  # seconds on cached features: nothing to checkpoint or resume
        train_and_save(params, device, precision, checkpoints=None)
        return
    with checkpoints_for(inputs_fingerprint(params, device, precision), processes) as checkpoints:
        if processes > 1:
            train_in_processes(params, checkpoints)
        else:
            train_and_save(params, device, precision, checkpoints)


def data_parallel_process() -> None:
    """One of train_in_processes' processes: the checkpoint folder is ready, the starting checkpoint in RESUME_ENV."""
    params = load_params()
    quiet_transformers()
    device, precision = pick_device_and_precision(params.train.precision)
    train_and_save(params, device, precision, Checkpoints(Path(os.environ[CHECKPOINTS_ENV]), os.environ[RESUME_ENV] or None))


if __name__ == "__main__":
    if "LOCAL_RANK" in os.environ:  # started by torchrun
        run_stage(data_parallel_process)
    else:
        run_stage(main, "finetune")
