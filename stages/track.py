"""Stage 7: the execution's one MLflow run, made at its end from what the other stages wrote.

The run is named after the DVC experiment and holds: the git commit, the parameters (train.lr and
train.epochs as finetune resolved them), every number in metrics/*.json, the per-epoch curves as
stepped metrics (metrics/finetune_epochs.csv), the hardware and library versions, each stage's
start-up, wall time and peak memory (metrics/stages/), the processed splits as MLflow datasets with
the digest dvc.lock holds for data/processed, the figures, and the exported model, registered as
`tracking.registered_model` (log_model: the alias rules). No other stage imports MLflow, so
an execution that fails before the end has no run: DVC shows it.

If the store cannot be reached, or fails (connection, HTTP or database errors), the stage prints one
warning and succeeds: the results are in DVC's files. With `tracking.required: true` it fails instead.
Any other error while logging is a bug here and raises.
"""
from __future__ import annotations

import base64
import os
import subprocess
import time
import warnings
from importlib.metadata import version
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import mlflow
import pandas as pd
import yaml
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.protos import databricks_pb2 as codes

from stages import hardware, tracking
from stages.dataformat import (
    EPOCHS_FILE, EVAL_FILE, EXPORT_DIR, EXPORT_FILE, FINETUNE_FILE, PREDICTIONS_FILE, PROCESSED_DIR, PROCESSED_SPLITS, load_labels, read_json, read_raw,
)
from stages.errors import STAGE_COSTS_DIR, run_stage
from stages.params import Params, flatten, load_params

METRICS = Path("metrics")
RESOLVED = ("lr", "epochs", "head_lr", "head_epochs", "keep_epoch")  # finetune.json's train.* values resolved from `auto`
MODEL_ALIAS = "candidate"  # the newest version that passed export's sanity bar
ARTIFACTS = ("learning_curves.png", "confusion_matrix.png", "misclassified.png", "reliability.png", "eval_per_class.csv")


def numbers(values: dict, prefix: str = "", skip: tuple[str, ...] = ()) -> dict[str, float]:
    return {prefix + key: float(value) for key, value in values.items() if isinstance(value, (int, float)) and key not in skip}


def run_metrics(splits: dict[str, tuple]) -> dict[str, float]:
    """Every number the stages wrote, under the names the runs have always had; `splits`: load_labels of each."""
    metrics = numbers(read_json(FINETUNE_FILE), skip=RESOLVED) | numbers(read_json(METRICS / "finetune_speed.json"))
    for path in (EVAL_FILE, METRICS / "eval_speed.json"):  # test_accuracy, test_ece, ..., test_eval_images_per_second
        metrics |= {"test_" + key.removeprefix("test_"): value for key, value in numbers(read_json(path)).items()}
    per_class = pd.read_csv(METRICS / "eval_per_class.csv")
    metrics |= {f"test_f1.{row['class']}": float(row["f1-score"]) for row in per_class.to_dict("records")}
    metrics |= numbers(read_json(EXPORT_FILE), prefix="export_")
    for name, (labels, classes) in splits.items():
        metrics |= {f"data.{name}_images": len(labels), "data.classes": len(classes)}
    for costs in sorted(STAGE_COSTS_DIR.glob("*.json")):  # features@train: features_train_seconds
        if costs.stem == "track":  # (an earlier execution's: this one's is written once the run is made)
            continue
        metrics |= {f"{costs.stem}_{key}": value for key, value in numbers(read_json(costs)).items()}
    return metrics


def processed_md5() -> str | None:
    """The md5 dvc.lock records for data/processed, None outside DVC (a stage run by hand)."""
    lock = yaml.safe_load(Path("dvc.lock").read_text()) if Path("dvc.lock").exists() else {}
    outs = lock.get("stages", {}).get("preprocess", {}).get("outs", [])
    return next((out["md5"] for out in outs if out["path"] == str(PROCESSED_DIR)), None)


def log_datasets(params: Params, digest: str | None, splits: dict[str, tuple]) -> None:
    """The processed splits as the run's inputs: their labels, the source they came from, DVC's digest."""
    source = str(without_credentials(params.data.source))
    with warnings.catch_warnings():  # MLflow registers its local-file source twice and warns that it is ambiguous
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple ways")
        for name, (indices, classes) in splits.items():
            labels = pd.DataFrame({"label": [classes[i] for i in indices.tolist()]})
            dataset = mlflow.data.from_pandas(labels, source=source, targets="label", name=f"processed-{name}", digest=digest and digest.removesuffix(".dir"))
            log_input(dataset, context=name)


def log_input(dataset, context: str, tries: int = 3) -> None:
    """mlflow.log_input, tried again when the store says the dataset row exists: two executions of one
    data version logging it at once race in MLflow's find-or-insert (a unique-key error for the second,
    whose transaction is rolled back); on the next try it finds the row."""
    for attempt in range(1, tries + 1):
        try:
            return mlflow.log_input(dataset, context=context)
        except MlflowException as err:  # SQLite: "UNIQUE constraint failed"; PostgreSQL: "violates unique constraint"
            if attempt == tries or "unique constraint" not in err.message.lower():
                raise
            time.sleep(0.2 * attempt)


def log_run(params: Params) -> str:
    """Make the run; its id."""
    experiment = tracking.use_experiment(params.tracking.experiment)
    finetuned, export = read_json(FINETUNE_FILE), read_json(EXPORT_FILE)
    tags = hardware.describe() | {"hardware.device": finetuned["device"], "hardware.precision": finetuned["precision"]}
    tags |= {"git.commit": git_commit(), "model.name": str(without_credentials(params.model.name)), "model.revision": str(finetuned["base_model_revision"])}
    if digest := processed_md5():
        tags["data.processed_md5"] = digest
    if exp_name := os.environ.get("DVC_EXP_NAME"):
        tags["dvc.exp_name"] = exp_name
    values = flatten(params) | {f"train.{key}": finetuned[key] for key in RESOLVED if key in finetuned}
    splits = {name: load_labels(name) for name in PROCESSED_SPLITS}
    with mlflow.start_run(experiment_id=experiment, run_name=exp_name, tags=tags) as run:
        mlflow.log_params({key: without_credentials(value) for key, value in values.items()})
        mlflow.log_metrics(run_metrics(splits))
        now = int(time.time() * 1000)
        curves = [Metric(key, float(row[key]), now, int(row["epoch"])) for row in pd.read_csv(EPOCHS_FILE).to_dict("records") for key in ("train_loss", "val_loss", "val_accuracy")]
        mlflow.MlflowClient().log_batch(run.info.run_id, metrics=curves)
        log_datasets(params, digest, splits)
        for name in ARTIFACTS:
            mlflow.log_artifact(str(METRICS / name))
        example = read_raw("test")["image"].iloc[int(pd.read_csv(PREDICTIONS_FILE)["index"].iloc[0])]
        log_model(EXPORT_DIR, params.tracking.registered_model, example, alias=export["candidate"])
    return run.info.run_id


def git_commit() -> str:
    """The commit the experiment is based on (DVC says so for experiments), else HEAD."""
    if os.environ.get("DVC_EXP_BASELINE_REV"):
        return os.environ["DVC_EXP_BASELINE_REV"]
    done = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False)
    return done.stdout.strip() if done.returncode == 0 else "none"


def without_credentials(value: object) -> object:
    """A URL's user:password@ part removed: a parameter may name a source that carries a token."""
    if not isinstance(value, str) or "@" not in value or "://" not in value:
        return value
    parts = urlsplit(value)
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def log_model(model_dir: Path, registered_name: str, example_image: bytes, alias: bool = True) -> None:
    """Log an exported model directory to the active run as `stages.pyfuncmodel`'s pyfunc (its ONNX graph
    in ONNX Runtime), register it, and alias the new version `candidate` when `alias` (the export stage's
    sanity bar passed) and no newer version holds the alias."""
    from stages import pyfuncmodel

    info = mlflow.pyfunc.log_model(
        name="model",
        python_model=pyfuncmodel.__file__,
        artifacts={pyfuncmodel.MODEL_ARTIFACT: str(model_dir)},
        code_paths=[str(Path(__file__).parent)],
        input_example=[base64.b64encode(example_image).decode()],  # what a REST request carries: base64 of an image file
        pip_requirements=[f"{p}=={version(p)}" for p in ("onnxruntime", "numpy", "pillow", "pandas", "pydantic", "pyyaml")],
        registered_model_name=registered_name,
    )
    if not alias:
        print(f"track: registered {registered_name} version {info.registered_model_version}, not aliased @{MODEL_ALIAS}")
        return
    client, number = mlflow.MlflowClient(), int(info.registered_model_version)
    holder = aliased_version(client, registered_name)
    if holder > number:  # an execution running at the same time registered after this one and passed the bar too
        print(f"track: registered {registered_name} version {number}; @{MODEL_ALIAS} stays on the newer version {holder}")
        return
    client.set_registered_model_alias(registered_name, MODEL_ALIAS, str(number))
    print(f"track: registered {registered_name} version {number} as @{MODEL_ALIAS}")


def aliased_version(client, registered_name: str) -> int:
    """The version that holds the alias `candidate`, 0 for none."""
    try:
        return int(client.get_model_version_by_alias(registered_name, MODEL_ALIAS).version)
    except MlflowException as err:  # no such alias: MLflow answers INVALID_PARAMETER_VALUE ("... not found")
        if err.error_code not in {codes.ErrorCode.Name(c) for c in (codes.INVALID_PARAMETER_VALUE, codes.RESOURCE_DOES_NOT_EXIST)}:
            raise
        return 0


def main() -> None:
    params = load_params()
    uri = tracking.tracking_uri()
    try:
        run_id = log_run(params)
    except Exception as err:
        if not tracking.is_store_failure(err):
            raise
        tracking.report_outage(uri, err, params.tracking.required)
        return
    print(f"track: MLflow run {run_id} in experiment {params.tracking.experiment!r} at {uri}")


if __name__ == "__main__":
    run_stage(main, "track")
