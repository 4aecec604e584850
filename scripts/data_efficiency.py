"""How much labelled data does the model need? Test accuracy against the number of training images.

    python scripts/data_efficiency.py --fractions 0.005 0.01 0.02 0.05 0.1 --seeds 42 43 44 \\
        -S model.name=efficientnet-lite0 -S data.source=/abs/path/cifar10-jpg.tgz -S train.mode=head
    python scripts/data_efficiency.py                   # only collect and draw what has been run

Queues one `dvc exp run` per share and seed (the workspace's params.yaml with the -S values), skips
those an experiment already ran with exactly these parameters, runs the queue (`dvc exp run
--run-all`; DVC's run-cache restores any stage already run with the same inputs), then draws every
experiment of this repository's history, run by this command or by hand. The results are read with
`dvc.api.exp_show` rather than from MLflow: DVC holds exactly the parameters and metrics each
experiment's outputs were made from, in the repository itself, with no tracking server needed.

One line per configuration: experiments that differ only in `fraction` and `seed` lie on one line
(`tracking`, `export` and `evaluate` settings do not count; they change no accuracy). Each run is a
point with its 95% (Wilson) interval, the line joins the mean per share. Writes
reports/data_efficiency.png and reports/data_efficiency.md, and logs both to MLflow as a run
named `data-efficiency`.
"""
from __future__ import annotations

import argparse
import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stages.params import load_params  # noqa: E402

REPORTS = Path("reports")
ACROSS = ("fraction", "seed")  # what varies along a line
NOT_RESULTS = ("tracking.", "export.", "evaluate.")  # settings that change no accuracy
METRICS = {"accuracy": "accuracy", "accuracy_ci95_low": "ci95_low", "accuracy_ci95_high": "ci95_high", "train_images": "train_images"}


def experiments() -> pd.DataFrame:
    """One row per experiment or commit of this repository's history that has a test accuracy: its parameters and results."""
    import dvc.api

    return with_results(pd.DataFrame(dvc.api.exp_show(num=-1)))


def with_results(rows: pd.DataFrame) -> pd.DataFrame:
    """The rows of `dvc exp show` that hold results, the metrics as numbers, renamed as METRICS says. DVC
    writes `!` where a commit has no metrics file (e.g. the project's first commit)."""
    if rows.empty or not set(METRICS) <= set(rows.columns):
        return pd.DataFrame()
    rows = rows[rows["rev"] != "workspace"]  # the workspace repeats a commit's or an applied experiment's results
    rows = rows.assign(**{key: pd.to_numeric(rows[key], errors="coerce") for key in METRICS})
    return rows.dropna(subset=["accuracy"]).rename(columns=METRICS)


def workspace_params() -> dict[str, object]:
    """params.yaml as written (`auto` unresolved, as `dvc exp show` lists it), with dotted keys."""
    flat: dict[str, object] = {}

    def walk(raw: dict, prefix: str) -> None:
        for key, value in raw.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                flat[prefix + key] = value

    walk(yaml.safe_load(Path("params.yaml").read_text()), "")
    return flat


def configuration_keys(params: dict[str, object]) -> list[str]:
    """The parameters that define a line: every params.yaml key but the shares, seeds and result-free settings."""
    return [key for key in params if key not in ACROSS and not key.startswith(NOT_RESULTS)]


def as_text(value: object) -> str:
    """A parameter value to compare: numbers as floats, so `0.01`, `1e-2` and 0.01 (from params.yaml, -S or DVC) agree."""
    if value is None or (isinstance(value, float) and math.isnan(value)):  # null, as pandas may hold it
        return "None"
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return value
    return repr(float(value)) if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


def already_run(rows: pd.DataFrame, wanted: dict[str, object]) -> bool:
    if rows.empty or not set(wanted) <= set(rows.columns):
        return False
    same = rows[list(wanted)].map(as_text) == pd.Series({key: as_text(value) for key, value in wanted.items()})
    return bool(same.all(axis=1).any())


def requested_runs(fractions: list[float], seeds: list[int], overrides: list[str], rows: pd.DataFrame) -> list[list[str]]:
    """The `-S` arguments of each (fraction, seed) not yet run with these parameters."""
    params = workspace_params()
    for override in overrides:
        key, _, value = override.partition("=")
        params[key] = yaml.safe_load(value)
    configuration = {key: params[key] for key in configuration_keys(params)}
    runs = []
    for fraction in fractions:
        for seed in seeds:
            if already_run(rows, configuration | {"fraction": fraction, "seed": seed}):
                print(f"data_efficiency: fraction={fraction} seed={seed} already run with these parameters")
            else:
                runs.append([arg for o in overrides for arg in ("-S", o)] + ["-S", f"fraction={fraction}", "-S", f"seed={seed}"])
    return runs


def run_experiments(runs: list[list[str]], jobs: int) -> None:
    for args in runs:
        subprocess.run([sys.executable, "-m", "dvc", "exp", "run", "--queue", *args], check=True)
    if runs:
        print(f"data_efficiency: running {len(runs)} queued experiment(s), {jobs} at a time")
        subprocess.run([sys.executable, "-m", "dvc", "exp", "run", "--run-all", "--jobs", str(jobs)], check=True)


def lines(rows: pd.DataFrame) -> pd.DataFrame:
    """The runs with a `line` label: model and mode, plus whatever else tells its configuration apart."""
    keys = [key for key in configuration_keys(workspace_params()) if key in rows.columns]
    compared = rows[keys].map(as_text)
    differing = [k for k in keys if compared[k].nunique() > 1 and k not in ("model.name", "train.mode")]
    rows = rows.assign(line=rows.apply(lambda r: ", ".join([str(r["model.name"]), str(r["train.mode"])] + [f"{k}={r[k]}" for k in differing]), axis=1))
    rows[list(ACROSS)] = rows[list(ACROSS)].astype(float)
    return rows.drop_duplicates(subset=["line", *ACROSS])  # runs with the same parameters give the same accuracy: count one


def summary(runs: pd.DataFrame) -> pd.DataFrame:
    return (
        runs.groupby(["line", "fraction"])
        .agg(train_images=("train_images", "first"), runs=("accuracy", "count"), mean=("accuracy", "mean"), std=("accuracy", "std"))
        .reset_index()
        .sort_values(["line", "fraction"])
    )


def plot(runs: pd.DataFrame, table: pd.DataFrame, path: Path) -> None:
    from stages import figures  # sets matplotlib's file-only backend

    fig, ax = figures.plt.subplots(figsize=(7, 4.5))
    for i, (line, points) in enumerate(runs.groupby("line")):
        color = f"C{i}"
        means = table[table["line"] == line]
        ax.plot(means["train_images"], means["mean"], "-", color=color, label=line)
        # each run with its 95% interval, seeds spread a little sideways so their bars do not hide each other
        spread = 1 + 0.02 * (points["seed"].rank(method="dense") - 1)
        errors = [points["accuracy"] - points["ci95_low"], points["ci95_high"] - points["accuracy"]]
        ax.errorbar(points["train_images"] * spread, points["accuracy"], yerr=errors, fmt="o", color=color, alpha=0.6, capsize=2, markersize=4)
    ax.set(xscale="log", xlabel="training images (log scale)", ylabel="test accuracy", title="Test accuracy against labelled training data")
    ax.set_xticks(sorted(table["train_images"].unique()), [f"{n:,.0f}" for n in sorted(table["train_images"].unique())])
    ax.minorticks_off()
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    figures.save(fig, path)


def markdown(table: pd.DataFrame, runs: pd.DataFrame) -> str:
    out = ["# Data efficiency: test accuracy against training images", "", "Written by `python scripts/data_efficiency.py` from `dvc exp show`.", ""]
    out += ["| configuration | fraction | train images | runs | test accuracy, mean ± std | each run (95% CI) |", "| --- | --- | --- | --- | --- | --- |"]
    for row in table.itertuples():
        each = runs[(runs["line"] == row.line) & (runs["fraction"] == row.fraction)].sort_values("seed")
        cells = ", ".join(f"{r.accuracy:.4f} ({r.ci95_low:.3f}-{r.ci95_high:.3f})" for r in each.itertuples())
        std = "" if pd.isna(row.std) else f" ± {row.std:.3f}"
        out.append(f"| {row.line} | {row.fraction:g} | {int(row.train_images):,} | {row.runs} | {row.mean:.3f}{std} | {cells} |")
    return "\n".join(out) + "\n"


def log_to_mlflow(paths: list[Path]) -> None:
    """Both files as artifacts of one run named data-efficiency in the project's experiment; a warning when MLflow is out of reach."""
    import mlflow

    from stages import tracking

    try:
        with mlflow.start_run(experiment_id=tracking.use_experiment(load_params().tracking.experiment), run_name="data-efficiency"):
            for path in paths:
                mlflow.log_artifact(str(path))
    except Exception as err:
        if not tracking.is_store_failure(err):  # a bug here, not an outage
            raise
        print(f"warning: data_efficiency: not logged to MLflow ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fractions", type=float, nargs="*", default=[], help="shares of the train split to run")
    parser.add_argument("--seeds", type=int, nargs="*", default=[42], help="seeds per share (default 42)")
    parser.add_argument("-S", "--set-param", dest="overrides", action="append", default=[], help="key=value, as for dvc exp run")
    parser.add_argument("--jobs", type=int, default=1, help="experiments at a time (default 1)")
    args = parser.parse_args()

    run_experiments(requested_runs(args.fractions, args.seeds, args.overrides, experiments()), args.jobs)
    runs = experiments()
    if runs.empty:
        sys.exit("error: no experiment with a test accuracy yet; run some, e.g. python scripts/data_efficiency.py --fractions 0.01 0.05")
    runs = lines(runs)
    table = summary(runs)
    REPORTS.mkdir(exist_ok=True)
    png, md = REPORTS / "data_efficiency.png", REPORTS / "data_efficiency.md"
    plot(runs, table, png)
    md.write_text(markdown(table, runs))
    print(md.read_text(), end="")
    log_to_mlflow([png, md])


if __name__ == "__main__":
    main()
