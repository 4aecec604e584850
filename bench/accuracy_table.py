"""Summarise bench/results/accuracy_runs.csv (written by bench/accuracy_grid.sh) as accuracy.md:
test accuracy on the full CIFAR-10 test split, mean ± std over seeds, per model, train.mode and fraction,
with the calibration error after temperature scaling (and before) where the run recorded it.
Run: python -m bench.accuracy_table
"""
from __future__ import annotations

import pandas as pd

from bench.common import RESULTS, machine

MODE_ORDER = {"head": 0, "full": 1, "head-then-full": 2}


def main() -> None:
    runs = pd.read_csv(RESULTS / "accuracy_runs.csv")
    runs = runs.sort_values(["model", "mode", "fraction", "recipe", "seed"], key=lambda c: c.map(MODE_ORDER) if c.name == "mode" else c)
    summary = runs.groupby(["model", "mode", "fraction", "recipe"], sort=False).agg(
        seeds=("seed", "count"),
        accuracy_mean=("accuracy", "mean"),
        accuracy_std=("accuracy", "std"),
        ece=("ece", "mean"),
        ece_at_1=("ece_at_temperature_1", "mean"),
        train_images=("train_images", "first"),
        val_accuracy=("kept_val_accuracy", "mean"),
        val_loss=("kept_val_loss", "mean"),
        wall_seconds_median=("wall_seconds", "median"),
    )
    lines = [
        "# Test accuracy per data share: embedded EfficientNet-Lite, offline job",
        "",
        f"Machine: {machine()}. Each run is `dvc exp run` of the whole pipeline on all "
        f"{runs['test_images'].iloc[0]:,} CIFAR-10 test images (`bash bench/accuracy_grid.sh MODEL MODE...`), "
        "each mode with its `auto` recipe; full mode at `model.image_size: 128`, the others at the model's own size. "
        "ECE: expected calibration error on the test split after temperature scaling (before it); runs made before "
        "calibration existed have none. `recipe`: the params set beyond the mode's (`EXTRA=` of the grid); runs made "
        "before 2026-12-07 kept the epoch of highest validation accuracy and always applied the fitted temperature, "
        "later ones the temperature only where stages/calibration.py's gate lets it. Validation: the kept epoch's accuracy "
        "and NLL on the validation split (mean over seeds), what a recipe is chosen by; recorded from 2026-12-07 on.",
        "",
        "| model | train.mode | fraction | recipe | train images | seeds | test accuracy, mean ± std | ECE (before) | validation accuracy / NLL | median wall s per run |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for (model, mode, fraction, recipe), row in summary.iterrows():
        ece = "-" if pd.isna(row.ece) else f"{row.ece:.3f} ({row.ece_at_1:.3f})"
        spread = "" if pd.isna(row.accuracy_std) else f" ± {row.accuracy_std:.3f}"  # one seed: no spread
        validation = "-" if pd.isna(row.val_loss) else f"{row.val_accuracy:.3f} / {row.val_loss:.3f}"
        lines.append(
            f"| {model} | {mode} | {fraction} | {recipe} | {int(row.train_images):,} | {int(row.seeds)} | {row.accuracy_mean:.3f}{spread} | {ece} | {validation} | {row.wall_seconds_median:.0f} |"
        )
    best = summary["accuracy_mean"].groupby(level="fraction").idxmax()
    lines += ["", "Best per share: " + "; ".join(f"{fraction}: {model} {mode}, {recipe} ({summary.loc[key, 'accuracy_mean']:.3f})" for fraction, key in best.items() for model, mode, _, recipe in [key]) + "."]
    lines += ["", "Every run (95% Wilson interval of each accuracy; the kept epoch and the temperature applied, where recorded):", "",
              "| model | train.mode | fraction | recipe | seed | test accuracy (95% CI) | kept epoch (by) | T applied (fitted) | ECE (at T = 1) | wall s | stages run |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for run in runs.itertuples():
        kept = "-" if pd.isna(run.kept_epoch) else f"{int(run.kept_epoch)}" + ("" if pd.isna(run.kept_by) else f" ({run.kept_by})")
        temperature = "-" if pd.isna(run.temperature) else f"{run.temperature:.3f}" + ("" if pd.isna(run.fitted_temperature) else f" ({run.fitted_temperature:.3f})")
        ece = "-" if pd.isna(run.ece) else f"{run.ece:.4f} ({run.ece_at_temperature_1:.4f})"
        lines.append(f"| {run.model} | {run.mode} | {run.fraction} | {run.recipe} | {run.seed} | {run.accuracy:.4f} ({run.ci95_low:.3f}-{run.ci95_high:.3f}) | {kept} | {temperature} | {ece} | {run.wall_seconds:.0f} | {run.stages_run} |")
    (RESULTS / "accuracy.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
