"""Summarise bench/results/accuracy_runs.csv (written by bench/accuracy_grid.sh) as accuracy.md:
test accuracy on the full CIFAR-10 test split, mean ± std over seeds, per train.mode and fraction.
Run: python -m bench.accuracy_table
"""
from __future__ import annotations

import pandas as pd

from bench.common import RESULTS, machine


def main() -> None:
    runs = pd.read_csv(RESULTS / "accuracy_runs.csv")
    summary = runs.groupby(["mode", "fraction"], sort=False).agg(
        seeds=("seed", "count"),
        accuracy_mean=("accuracy", "mean"),
        accuracy_std=("accuracy", "std"),
        train_images=("train_images", "first"),
        wall_seconds_median=("wall_seconds", "median"),
    )
    lines = [
        "# Test accuracy per data share: EfficientNet-Lite0, offline job",
        "",
        f"Machine: {machine()}. Each run is `dvc exp run` of the whole pipeline on all "
        f"{runs['test_images'].iloc[0]:,} CIFAR-10 test images (`bash bench/accuracy_grid.sh`).",
        "",
        "| train.mode | fraction | train images | seeds | test accuracy, mean ± std | median wall s per run |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for (mode, fraction), row in summary.iterrows():
        lines.append(
            f"| {mode} | {fraction} | {int(row.train_images):,} | {int(row.seeds)} | {row.accuracy_mean:.3f} ± {row.accuracy_std:.3f} | {row.wall_seconds_median:.0f} |"
        )
    better = summary["accuracy_mean"].groupby(level="fraction").idxmax()
    lines += ["", "Better mode per share: " + "; ".join(f"{fraction}: {mode} ({summary.loc[(mode, fraction), 'accuracy_mean']:.3f})" for fraction, (mode, _) in better.items()) + "."]
    lines += ["", "Every run (95% Wilson interval of each accuracy):", "", "| train.mode | fraction | seed | test accuracy (95% CI) | wall s | stages run |", "| --- | --- | --- | --- | --- | --- |"]
    for run in runs.itertuples():
        lines.append(f"| {run.mode} | {run.fraction} | {run.seed} | {run.accuracy:.4f} ({run.ci95_low:.3f}-{run.ci95_high:.3f}) | {run.wall_seconds:.0f} | {run.stages_run} |")
    missing = sorted({"head", "full"} - set(runs["mode"]))
    if missing:
        lines += ["", f"Not run yet: train.mode={', '.join(missing)} (the grid was stopped before reaching it)."]
    (RESULTS / "accuracy.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
