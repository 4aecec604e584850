"""Which epoch to keep, and when to trust a fitted temperature, on small validation splits: head mode.

For each share and seed, the real preprocess and features stages make the split and its cached
features (EfficientNet-Lite0, 224 px, all 10,000 test images); then finetune's own head training runs
once per train.keep_epoch rule (same seed: the same 30 epochs, a different epoch kept). Each kept head
is scored on the test split; a temperature fitted on the validation split is scored there too, at
T = 1 and at the fitted T, beside how much it lowered the validation NLL: what MIN_NLL_GAIN
(stages/calibration.py) is chosen from. The validation split makes every choice; the test split reports.
Run: python -m bench.selection [--fractions 0.01 0.05] [--seeds 42 43]   -> bench/results/selection.md
(and selection_runs.csv, one row per share, seed and rule)
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import shutil
from pathlib import Path

import pandas as pd
import torch
from transformers import set_seed

from bench.common import RESULTS, cifar_work_dir, machine, project_params, run_stage
from stages.calibration import MIN_NLL_GAIN, calibration, choose_temperature
from stages.dataformat import features_path, load_features, load_split, processed_path
from stages.finetune import kept_row, train_head
from stages.modeling import classifier_head
from stages.params import KEEP_EPOCH_RULES, load_params

FRACTIONS, SEEDS = (0.01, 0.02, 0.05, 0.1), (42, 43, 44)


def prepare(params: dict, work: Path) -> None:
    """data/processed and data/features of `params` in `work`. The test split's features, the same for
    every share and seed (all of it is drawn), are computed once and kept beside."""
    run_stage("preprocess", params, work)
    for split in ("train", "val"):
        run_stage("features", params, work, split)
    digest = hashlib.sha256(processed_path("test", work / "data/processed").read_bytes()).hexdigest()[:16]
    kept = work / f"test-features-{digest}.safetensors"
    if not kept.exists():
        run_stage("features", params, work, "test")
        shutil.copy(features_path("test", work / "data/features"), kept)
    shutil.copy(kept, features_path("test", work / "data/features"))


def scored(head: torch.nn.Module, val: dict, test: dict) -> dict:
    """Test accuracy of the kept head; the temperature fitted on validation, its validation NLL gain and the
    test calibration at T = 1 and at it."""
    with torch.no_grad():
        val_logits, test_logits = head(val["features"]).double(), head(test["features"]).double()
    choice = choose_temperature(val_logits, val["labels"])  # finetune's own fit, before its gate decides
    fitted = choice.fitted_temperature
    at_1, at_fitted = (calibration((test_logits / t).softmax(-1).numpy(), test["labels"].numpy()) for t in (1.0, fitted))
    return {
        "test_accuracy": float((test_logits.argmax(-1) == test["labels"]).double().mean()),
        "fitted_temperature": fitted, "val_nll_gain": 1 - choice.val_nll_fitted / choice.val_nll,
        "test_ece_at_1": at_1.ece, "test_ece_fitted": at_fitted.ece, "test_nll_at_1": at_1.nll, "test_nll_fitted": at_fitted.nll,
    }


def runs(fractions: list[float], seeds: list[int]) -> pd.DataFrame:
    work = cifar_work_dir()
    rows = []
    for fraction in fractions:
        for seed in seeds:
            params = project_params()
            params.update(fraction=fraction, seed=seed)
            params["data"]["test_fraction"] = 1.0
            params["train"].update(mode="head", lr="auto", epochs="auto")
            prepare(params, work)
            os.chdir(work)
            typed = load_params()
            train, val_split = load_split("train"), load_split("val")
            val, test = load_features("val", val_split.labels), load_features("test", load_split("test").labels)
            for rule in KEEP_EPOCH_RULES:
                set_seed(seed)  # as finetune does: the same initial head and draws for every rule
                trained = train_head(dataclasses.replace(typed, train=dataclasses.replace(typed.train, keep_epoch=rule)), train, val_split)
                kept = trained.epochs.loc[kept_row(trained.epochs, rule)]
                row = {"fraction": fraction, "seed": seed, "val_images": len(val_split), "rule": rule, "kept_epoch": int(kept["epoch"])}
                row |= scored(classifier_head(trained.model, typed.model.name), val, test)
                rows.append(row)
                print(row, flush=True)
    return pd.DataFrame(rows)


GAINS = (0.0, 0.02, 0.05, 0.1, 0.2)  # candidate MIN_NLL_GAIN values


def report(table: pd.DataFrame) -> list[str]:
    lines = [
        "# Keeping an epoch and a temperature on small validation splits (head mode, EfficientNet-Lite0, 224 px)",
        "", f"Machine: {machine()}. `python -m bench.selection`; every run in `selection_runs.csv`. Test: all 10,000 CIFAR-10 test images.",
        "", "## train.keep_epoch: test accuracy of the kept epoch, mean ± std over seeds (mean kept epoch of 30)", "",
        "| fraction | validation images | seeds | " + " | ".join(KEEP_EPOCH_RULES) + " |", "| --- | --- | --- |" + " --- |" * len(KEEP_EPOCH_RULES),
    ]
    for fraction, runs_at in table.groupby("fraction"):
        cells = []
        for rule in KEEP_EPOCH_RULES:
            r = runs_at[runs_at["rule"] == rule]
            std = f" ± {r['test_accuracy'].std():.3f}" if len(r) > 1 else ""
            cells.append(f"{r['test_accuracy'].mean():.4f}{std} ({r['kept_epoch'].mean():.1f})")
        lines.append(f"| {fraction} | {runs_at['val_images'].iloc[0]} | {runs_at['seed'].nunique()} | " + " | ".join(cells) + " |")
    kept = table[table["rule"] == "val_loss"]
    lines += [
        "", "## The temperature, fitted on the validation split, of each run's kept epoch (train.keep_epoch: val_loss)", "",
        "| fraction | seed | fitted T | validation NLL gain | test ECE at T = 1 | at fitted T | test NLL at T = 1 | at fitted T |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {r.fraction} | {r.seed} | {r.fitted_temperature:.3f} | {r.val_nll_gain:.1%} | {r.test_ece_at_1:.4f} | {r.test_ece_fitted:.4f} | {r.test_nll_at_1:.4f} | {r.test_nll_fitted:.4f} |"
        for r in kept.itertuples()
    ]
    lines += ["", "Applying the fitted T only where it lowers the validation NLL by at least a share g (MIN_NLL_GAIN):", "",
              "| g | runs where T is applied | of them, test ECE worse | mean test ECE |", "| --- | --- | --- | --- |"]
    for gain in GAINS:
        applied = kept["val_nll_gain"] >= gain
        ece = kept["test_ece_fitted"].where(applied, kept["test_ece_at_1"])
        worse = (applied & (kept["test_ece_fitted"] > kept["test_ece_at_1"])).sum()
        lines.append(f"| {gain:.0%}{' (chosen)' if gain == MIN_NLL_GAIN else ''} | {applied.sum()} of {len(kept)} | {worse} | {ece.mean():.4f} |")
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fractions", type=float, nargs="+", default=FRACTIONS)
    parser.add_argument("--seeds", type=int, nargs="+", default=SEEDS)
    args = parser.parse_args()
    table = runs(args.fractions, args.seeds)
    RESULTS.mkdir(exist_ok=True)
    table.to_csv(RESULTS / "selection_runs.csv", index=False)
    text = "\n".join(report(table))
    (RESULTS / "selection.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
