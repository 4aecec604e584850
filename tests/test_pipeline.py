"""End to end: the real `dvc repro` / `dvc exp run` in a temporary git repo on real CIFAR-10 images."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
import yaml

from tests.conftest import ROOT

FEATURES = {"features@train", "features@val", "features@test"}
STAGES = {"download", "preprocess", *FEATURES, "finetune", "evaluate", "export"}


def run(cmd: list[str], repo: Path) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    done = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{output[-4000:]}"
    return output


def ran_stages(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([\w@]+)'", output))


def set_params(repo: Path, **values) -> None:
    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for key, value in values.items():
        node = params
        *parents, leaf = key.split("__")
        for part in parents:
            node = node[part]
        node[leaf] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture(scope="session")
def dvc_cache(tmp_path_factory) -> Path:
    """One DVC cache for all test repos: its run-cache lets later repos skip the identical download."""
    return tmp_path_factory.mktemp("dvc-cache")


def make_repo(path: Path, dvc_cache: Path, **values) -> Path:
    """A new git repo holding the project's tracked files (its DVC set-up included), with `values` set."""
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for name in filter(None, tracked.split("\0")):
        if (ROOT / name).is_file():
            (path / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / name, path / name)
    set_params(path, **values)
    run(["git", "init", "-q"], path)
    run(["git", "config", "user.name", "Pipeline Test"], path)
    run(["git", "config", "user.email", "pipeline-test@example.com"], path)
    run([sys.executable, "-m", "dvc", "config", "cache.dir", str(dvc_cache)], path)
    commit(path, "project")
    return path


def commit(repo: Path, message: str) -> None:
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-q", "-m", message], repo)


def dvc(repo: Path, *args: str) -> str:
    return run([sys.executable, "-m", "dvc", *args], repo)


def mlflow_runs(repo: Path) -> list:
    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    experiment = mlflow.get_experiment_by_name("cifar10-transfer")
    return mlflow.search_runs([experiment.experiment_id], output_format="list", order_by=["attributes.start_time ASC"])


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def a_test_image(repo: Path, tmp_path: Path) -> tuple[Path, str]:
    """The most confidently evaluated test image, written back out as its original JPEG file."""
    from stages.dataformat import read_raw

    predictions = pd.read_csv(repo / "metrics/test_predictions.csv")
    first = predictions.loc[predictions["confidence"].idxmax()]
    raw = read_raw("test", repo / "data/raw")
    path = tmp_path / "image.jpg"
    path.write_bytes(raw["image"].iloc[int(first["index"])])
    return path, first["predicted"]


def assert_same_weights(left: Path, right: Path) -> None:
    from transformers import AutoModelForImageClassification

    a, b = (AutoModelForImageClassification.from_pretrained(p).state_dict() for p in (left, right))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def classify_in_fresh_python(repo: Path, image: Path, preamble: str) -> str:
    """The label transformers.pipeline gives `image` with models/export, in a new interpreter."""
    code = f"{preamble}\nfrom transformers import pipeline\nprint('label=' + pipeline('image-classification', model='models/export')('{image}')[0]['label'])"
    return re.search(r"^label=(.*)$", run([sys.executable, "-c", code], repo), re.M).group(1)


def test_tiny_vit_pipeline_repro_experiments_and_resume(cifar_archive, tiny_vit, dvc_cache, tmp_path):
    repo = make_repo(
        tmp_path / "repo", dvc_cache,
        data__source=str(cifar_archive), model__name=str(tiny_vit), train__epochs=2, train__lr=1e-3, data__test_fraction=0.02,
    )

    # 1. the whole pipeline
    assert ran_stages(dvc(repo, "repro")) == STAGES
    evaluation = read_json(repo / "metrics/eval.json")
    assert evaluation["test_images"] == 200
    assert 0 <= evaluation["accuracy_ci95_low"] <= evaluation["accuracy"] <= evaluation["accuracy_ci95_high"] <= 1
    finetune = read_json(repo / "metrics/finetune.json")
    assert (finetune["train_images"], finetune["val_images"]) == (450, 50)
    epochs = pd.read_csv(repo / "metrics/finetune_epochs.csv")
    assert list(epochs["epoch"]) == [1, 2] and epochs["val_accuracy"].max() == finetune["best_val_accuracy"]
    per_class = pd.read_csv(repo / "metrics/eval_per_class.csv")
    assert len(per_class) == 10 and per_class["support"].sum() == 200
    assert (repo / "metrics/confusion_matrix.png").stat().st_size > 10_000
    export_check = read_json(repo / "metrics/export.json")
    assert export_check["check_images"] == 200 and export_check["agreement"] >= 0.95
    assert abs(export_check["pipeline_accuracy"] - export_check["evaluated_accuracy"]) <= 0.02
    config = read_json(repo / "models/export/config.json")
    assert config["id2label"]["3"] == "cat" and (repo / "models/export/model.safetensors").exists()

    # 2. one MLflow run for the execution, holding params, curves, test accuracy and hardware
    [first] = mlflow_runs(repo)
    assert first.data.params["fraction"] == "0.01" and first.data.params["model.name"] == str(tiny_vit)
    assert first.data.metrics["test_accuracy"] == pytest.approx(evaluation["accuracy"])
    history = mlflow.MlflowClient().get_metric_history(first.info.run_id, "val_accuracy")
    assert [m.step for m in history] == [1, 2]
    tags = first.data.tags
    assert tags["hardware.device"] == "cpu" and tags["hardware.precision"] == "fp32"
    assert tags["hardware.cpu"] and int(tags["hardware.cpu_cores"]) >= 1 and float(tags["hardware.ram_gb"]) > 0
    assert tags["version.torch"] and tags["version.dvc"] and tags["version.mlflow"]

    plots = json.loads(dvc(repo, "plots", "show", "--json"))
    assert not plots.get("errors")
    named = {"Loss per epoch", "Validation accuracy per epoch", "Test confusion matrix", "metrics/confusion_matrix.png"}
    assert set(plots["data"]) == named and all(plots["data"][name] for name in named)

    # 3. nothing changed: nothing runs, no new MLflow run
    assert ran_stages(dvc(repo, "repro")) == set()
    assert len(mlflow_runs(repo)) == 1
    commit(repo, "baseline")

    # 4. a learning-rate change re-runs finetune, evaluate, export and nothing before them
    assert ran_stages(dvc(repo, "exp", "run", "-S", "train.lr=0.002")) == {"finetune", "evaluate", "export"}
    # 5. a fraction change re-runs from preprocess on, but the test split is the same
    after_fraction = {"preprocess", "features@train", "features@val", "finetune", "evaluate", "export"}
    assert ran_stages(dvc(repo, "exp", "run", "-S", "fraction=0.02")) == after_fraction
    assert read_json(repo / "metrics/finetune.json")["train_images"] == 900
    runs = mlflow_runs(repo)
    assert len(runs) == 3
    for later in runs[1:]:
        assert later.info.run_name == later.data.tags["dvc.exp_name"]  # named after the DVC experiment
    assert runs[2].data.params["fraction"] == "0.02"

    shown = json.loads(dvc(repo, "exp", "show", "--json"))
    experiments = [exp for row in shown for exp in (row.get("experiments") or [])]
    fractions = {
        run["data"]["params"]["params.yaml"]["data"]["fraction"] for exp in experiments for run in exp["revs"]
    }
    assert {0.02} <= fractions

    # 6. the exported ViT needs nothing but transformers; the CLI classifies image files
    image, evaluated_label = a_test_image(repo, tmp_path)
    assert classify_in_fresh_python(repo, image, "") == evaluated_label
    assert f"{image}\t{evaluated_label}\t" in run([sys.executable, "-m", "stages.predict", str(image)], repo)

    # 7. the kept model is the best epoch's, whole (transformers 5 renames ViT weights on load)
    checkpoints = sorted((repo / "models/checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    state = read_json(checkpoints[-1] / "trainer_state.json")
    assert state["best_metric"] == read_json(repo / "metrics/finetune.json")["best_val_accuracy"]
    assert_same_weights(repo / "models/finetuned", repo / state["best_model_checkpoint"])

    # 8. an interrupted finetune resumes from its last checkpoint and ends exactly where it would have
    before = pd.read_csv(repo / "metrics/finetune_epochs.csv")
    shutil.rmtree(checkpoints[-1])  # as if killed during the last epoch
    assert f"resuming from models/checkpoints/{checkpoints[0].name}" in run([sys.executable, "-m", "stages.finetune"], repo)
    pd.testing.assert_frame_equal(pd.read_csv(repo / "metrics/finetune_epochs.csv"), before)


def test_efficientnet_lite_pipeline_offline(cifar_archive, dvc_cache, tmp_path):
    repo = make_repo(
        tmp_path / "repo", dvc_cache,
        data__source=str(cifar_archive), model__name="efficientnet-lite0", model__image_size=64,
        fraction=0.004, train__epochs=2, train__lr=1e-3, data__test_fraction=0.01,
    )
    dvc(repo, "repro")
    evaluation = read_json(repo / "metrics/eval.json")
    assert evaluation["test_images"] == 100
    assert evaluation["accuracy"] > 0.2  # ImageNet features beat chance (0.1) after 180 images
    [tracked] = mlflow_runs(repo)
    assert tracked.data.metrics["test_accuracy"] == pytest.approx(evaluation["accuracy"])
    assert ran_stages(dvc(repo, "repro")) == set()

    # the export loads through the Auto classes once the package is imported, no trust_remote_code
    image, evaluated_label = a_test_image(repo, tmp_path)
    assert classify_in_fresh_python(repo, image, "import stages") == evaluated_label
    assert read_json(repo / "models/export/preprocessor_config.json")["size"] == {"height": 64, "width": 64}


def test_head_mode_trains_on_cached_features(cifar_archive, tiny_vit, dvc_cache, tmp_path):
    repo = make_repo(
        tmp_path / "repo", dvc_cache,
        data__source=str(cifar_archive), model__name=str(tiny_vit), train__mode="head", train__epochs=4, train__lr=3e-3,
        data__test_fraction=0.02,
    )
    assert ran_stages(dvc(repo, "repro")) == STAGES
    assert list(pd.read_csv(repo / "metrics/finetune_epochs.csv")["epoch"]) == [1, 2, 3, 4]

    # the backbone is the pretrained one, untouched; only the fresh 10-way head was trained
    from transformers import AutoModelForImageClassification

    pretrained = AutoModelForImageClassification.from_pretrained(tiny_vit).state_dict()
    tuned = AutoModelForImageClassification.from_pretrained(repo / "models/finetuned").state_dict()
    assert all(torch.equal(tuned[k], pretrained[k]) for k in tuned if not k.startswith("classifier."))
    assert tuned["classifier.weight"].shape == (10, 48)

    # evaluate applied the head to cached features: the whole model on the test pixels agrees
    from stages.dataformat import load_split
    from stages.evaluate import predict
    from stages.params import load_params

    os.chdir(repo)  # the stages read params.yaml and data/ relative to the project
    params = dataclasses.replace(load_params(), train=dataclasses.replace(load_params().train, mode="full"))
    whole_model, _ = predict(load_split("test"), params)
    evaluated = pd.read_csv(repo / "metrics/test_predictions.csv")["predicted"]
    assert [load_split("test").classes[i] for i in whole_model.tolist()] == list(evaluated)

    # a learning-rate change re-trains the head only: the cached features are reused
    commit(repo, "head mode")
    output = dvc(repo, "exp", "run", "-S", "train.lr=0.01")
    assert ran_stages(output) == {"finetune", "evaluate", "export"}
    # a new share recomputes train/val features; the unchanged test split's are kept
    assert ran_stages(dvc(repo, "exp", "run", "-S", "fraction=0.02")) == {
        "preprocess", "features@train", "features@val", "finetune", "evaluate", "export"
    }
    assert read_json(repo / "metrics/finetune.json")["train_images"] == 900
