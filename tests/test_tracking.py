"""The track stage on a project the real stages made (the tiny ViT on the small tree, in head mode):
where the default store is, what the run holds, what is never logged, what happens when MLflow is down,
and the registry's alias rules."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from unittest import mock

import mlflow
import pytest
import torch

from bench.export_check import working_directory
from scripts.servers import free_port
from stages import download, evaluate, export, features, figures, finetune, preprocess, track, tracking
from stages.dataformat import EXPORT_FILE
from stages.errors import PipelineError, run_stage
from stages.params import load_params
from tests.conftest import ROOT, set_params


@pytest.fixture(scope="module")
def finished(small_tree, tiny_vit, tmp_path_factory) -> Path:
    """Every stage before track has run in this project, each recording its costs as under DVC."""
    project = tmp_path_factory.mktemp("track") / "project"
    project.mkdir()
    (project / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    set_params(
        project, fraction=1.0, data__source=str(small_tree), data__test_fraction=1.0, model__name=str(tiny_vit),
        train__mode="head", train__epochs=2, train__lr=1e-3, export__check_images=18, export__max_mean_probability_diff=0.99,
    )
    with working_directory(project):
        run_stage(download.main, "download")
        run_stage(preprocess.main, "preprocess")
        for split in ("train", "val", "test"):
            with mock.patch.object(sys, "argv", ["features", split]):
                run_stage(features.main, f"features_{split}")
        for stage in (finetune, evaluate, export):
            run_stage(stage.main, stage.__name__.removeprefix("stages."))
    return project


@pytest.fixture
def project(finished, tmp_path, monkeypatch) -> Path:
    """A copy of the finished project, current directory, with its own store (mlflow.db in it)."""
    copy = tmp_path / "project"
    shutil.copytree(finished, copy)
    monkeypatch.chdir(copy)
    for name in ("MLFLOW_TRACKING_URI", "DVC_ROOT", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV"):
        monkeypatch.delenv(name, raising=False)
    mlflow.set_tracking_uri(f"sqlite:///{copy / 'mlflow.db'}")
    return copy


def export_says_candidate(candidate: bool) -> None:
    """What export wrote for a model above chance (True) or at chance (False): the tiny ViT may be either."""
    EXPORT_FILE.write_text(json.dumps(json.loads(EXPORT_FILE.read_text()) | {"candidate": candidate}))


def the_runs() -> list:
    return mlflow.search_runs(search_all_experiments=True, output_format="list", order_by=["attributes.start_time ASC"])


def test_the_default_store_is_the_project_root_even_in_a_queued_experiments_copy(tmp_path, monkeypatch):
    project = tmp_path / "project"
    copy = project / ".dvc" / "tmp" / "exps" / "tmp1234"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(project))  # what DVC sets for a queued experiment's stages
    assert tracking.tracking_uri() == f"sqlite:///{project}/mlflow.db"
    assert tracking.artifact_location() == f"file://{project}/mlruns"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.tracking_uri() == "http://127.0.0.1:5000"
    assert tracking.artifact_location() is None  # the server decides


def test_an_experiment_another_execution_created_meanwhile_is_used_not_an_error(tmp_path, monkeypatch):
    """Two teammates' first executions on a fresh tracking server (no lock there) both find no experiment;
    the second one's create_experiment is refused as already existing, and it takes the first one's."""
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    created = mlflow.create_experiment("shared", artifact_location=(tmp_path / "mlruns").as_uri())  # by the other execution
    real, looks = mlflow.get_experiment_by_name, []

    def not_yet_then_there(name: str):  # the first look came before the other execution created it
        looks.append(name)
        return real(name) if len(looks) > 1 else None

    monkeypatch.setattr(mlflow, "get_experiment_by_name", not_yet_then_there)
    assert tracking.experiment_id("shared", None) == created


def test_a_sqlite_store_keeps_its_artifacts_beside_it_not_in_a_queued_experiments_copy(tmp_path, monkeypatch):
    project = tmp_path / "project"
    monkeypatch.chdir(tmp_path)  # as in a queued experiment's copy: not the project root
    monkeypatch.setenv("DVC_ROOT", str(project))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///stores/mlflow.db")  # relative: to the project root
    assert tracking.tracking_uri() == f"sqlite:///{project}/stores/mlflow.db"
    assert tracking.artifact_location() == f"file://{project}/stores/mlruns"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////srv/mlflow/store.db")
    assert tracking.artifact_location() == "file:///srv/mlflow/mlruns"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "postgresql+psycopg2://db.example.org/mlflow")
    assert tracking.artifact_location() == f"file://{project}/mlruns"


def test_credentials_in_a_url_are_not_logged():
    assert track.without_credentials("https://user:hf_secret@example.org/data.tgz") == "https://example.org/data.tgz"
    assert track.without_credentials("uoft-cs/cifar10") == "uoft-cs/cifar10"
    assert track.without_credentials(0.01) == 0.01


def test_the_gallery_shows_the_most_confidently_wrong_images_first():
    pixels = torch.zeros(4, 3, 8, 8, dtype=torch.uint8)
    actual = ["cat", "dog", "ship", "cat"]
    predicted = ["cat", "cat", "dog", "ship"]  # image 0 is right; 1, 2 and 3 are wrong
    confidence = torch.tensor([0.99, 0.6, 0.9, 0.7])
    fig = figures.most_confidently_wrong(pixels, actual, predicted, confidence)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == ["true: ship\npredicted: dog (90%)", "true: cat\npredicted: ship (70%)", "true: dog\npredicted: cat (60%)"]
    assert fig.texts[0].get_text() == "Most confidently wrong test images (3 of 3 wrong)"


def test_store_failures_are_told_from_bugs():
    import requests
    import sqlalchemy.exc
    from mlflow.exceptions import MlflowException, RestException

    try:  # how MLflow's REST client reports a refused connection
        try:
            raise requests.exceptions.ConnectionError("Connection refused")
        except requests.exceptions.ConnectionError as err:
            raise MlflowException(f"API request to http://127.0.0.1:1/api failed with exception {err}")
    except MlflowException as wrapped:
        assert tracking.is_store_failure(wrapped)
    database = MlflowException("locked", error_code="TEMPORARILY_UNAVAILABLE")
    database.__cause__ = sqlalchemy.exc.OperationalError("INSERT", {}, Exception("database is locked"))
    assert tracking.is_store_failure(database)
    assert tracking.is_store_failure(RestException({"error_code": "INTERNAL_ERROR", "message": "server error"}))
    assert not tracking.is_store_failure(RestException({"error_code": "INVALID_PARAMETER_VALUE", "message": "bad metric"}))
    assert not tracking.is_store_failure(MlflowException("Couldn't find a loader class"))  # client-side, no transport error
    assert not tracking.is_store_failure(ValueError("could not convert string to float: 'high'"))
    assert not tracking.is_store_failure(FileNotFoundError("metrics/missing.png"))


def test_the_run_holds_every_result_the_stages_wrote(project, monkeypatch, capsys):
    monkeypatch.setenv("DVC_EXP_NAME", "lr-sweep")
    track.main()
    [run] = the_runs()
    assert run.info.status == "FINISHED" and run.info.run_name == run.data.tags["dvc.exp_name"] == "lr-sweep"
    evaluation, finetuned = (json.loads(Path(f"metrics/{name}.json").read_text()) for name in ("eval", "finetune"))
    metrics = run.data.metrics
    assert metrics["test_accuracy"] == pytest.approx(evaluation["accuracy"]) and metrics["test_ece"] == pytest.approx(evaluation["ece"])
    assert metrics["kept_val_accuracy"] == pytest.approx(finetuned["kept_val_accuracy"])
    assert metrics["export_mean_probability_diff"] == pytest.approx(json.loads(EXPORT_FILE.read_text())["mean_probability_diff"])
    assert (metrics["data.classes"], metrics["data.train_images"], metrics["data.test_images"]) == (3, 54, 18)
    for stage in ("download", "preprocess", "features_train", "features_test", "finetune", "evaluate", "export"):
        assert metrics[f"{stage}_seconds"] > 0 and metrics[f"{stage}_peak_memory_mib"] > 0, stage
    assert run.data.params["train.lr"] == str(finetuned["lr"]) and run.data.params["train.mode"] == "head"
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "val_accuracy")
    assert [m.step for m in history] == [1, 2]  # the curves as steps, as finetune_epochs.csv holds them
    assert run.data.tags["hardware.device"] == finetuned["device"] and run.data.tags["version.torch"] == torch.__version__
    assert {i.dataset.name for i in run.inputs.dataset_inputs} == {"processed-train", "processed-val", "processed-test"}
    logged = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert set(track.ARTIFACTS) <= logged
    [version] = mlflow.MlflowClient().search_model_versions("name='cifar10-classifier'")
    assert version.run_id == run.info.run_id  # MLflow 3 keeps the model apart from the run's artifacts
    assert f"track: MLflow run {run.info.run_id}" in capsys.readouterr().out


def test_an_unreachable_server_costs_one_warning_and_nothing_else(project, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    track.main()
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: MLflow tracking at http://127.0.0.1:")
    assert "this execution was not logged to MLflow" in lines[0] and "dvc repro -f track" in lines[0] and "tracking.required: true" in lines[0]


def test_a_required_server_that_is_unreachable_stops_the_stage(project, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    set_params(project, tracking__required=True)
    with pytest.raises(PipelineError, match=r"^MLflow tracking at http://127\.0\.0\.1:\d+ failed \(ConnectionError.*tracking\.required: false"):
        track.main()


def test_a_programming_error_while_logging_raises_and_fails_the_run(project, capsys):
    import pandas as pd

    per_class = pd.read_csv("metrics/eval_per_class.csv")
    per_class["f1-score"] = per_class["f1-score"].astype(object)
    per_class.loc[0, "f1-score"] = "high"  # a word where a number belongs
    per_class.to_csv("metrics/eval_per_class.csv", index=False)
    with pytest.raises(ValueError, match="could not convert string to float"):
        track.main()
    assert "MLflow tracking" not in capsys.readouterr().err
    assert [run.info.status for run in the_runs()] == ["FAILED"]


def test_a_value_mlflow_rejects_raises(project, capsys):
    from mlflow.exceptions import MlflowException

    evaluation = Path("metrics/eval.json")
    evaluation.write_text(json.dumps(json.loads(evaluation.read_text()) | {"bad name!\0": 1.0}))  # INVALID_PARAMETER_VALUE: the store is fine
    with pytest.raises(MlflowException, match="Invalid value"):
        track.main()
    assert "MLflow tracking" not in capsys.readouterr().err


def test_a_model_below_the_sanity_bar_is_registered_without_the_candidate_alias(project, capsys):
    export_says_candidate(True)
    track.main()
    export_says_candidate(False)
    track.main()
    out = capsys.readouterr().out
    assert "registered cifar10-classifier version 1 as @candidate" in out and "registered cifar10-classifier version 2, not aliased @candidate" in out
    client = mlflow.MlflowClient()
    assert str(client.get_model_version_by_alias("cifar10-classifier", track.MODEL_ALIAS).version) == "1"  # the alias stays on the sane version
    assert len(client.search_model_versions("name='cifar10-classifier'")) == 2


def test_the_alias_stays_on_a_newer_version_registered_by_an_execution_running_at_the_same_time(project, monkeypatch, capsys):
    log_pyfunc = mlflow.pyfunc.log_model

    def and_meanwhile_another_execution(*args, **kwargs):  # registers version 2 and aliases it, between our steps
        info = log_pyfunc(*args, **kwargs)
        client = mlflow.MlflowClient()
        newer = client.create_model_version("cifar10-classifier", client.get_model_version("cifar10-classifier", info.registered_model_version).source)
        client.set_registered_model_alias("cifar10-classifier", track.MODEL_ALIAS, newer.version)
        return info

    monkeypatch.setattr(mlflow.pyfunc, "log_model", and_meanwhile_another_execution)
    export_says_candidate(True)
    track.main()
    assert "registered cifar10-classifier version 1; @candidate stays on the newer version 2" in capsys.readouterr().out
    assert str(mlflow.MlflowClient().get_model_version_by_alias("cifar10-classifier", track.MODEL_ALIAS).version) == "2"


@pytest.mark.parametrize("kind", ["vit", "efficientnet-lite0"])
def test_every_registered_model_loads_with_pyfunc_and_predicts_as_its_pipeline(kind, exported_tiny_vit, small_tree, tmp_path, monkeypatch):
    """Every model is registered as the pyfunc around its ONNX graph: from the registry by alias it gives
    transformers' pipeline()'s top label and score, from a path or from base64 of the file."""
    import base64

    from transformers import pipeline

    from stages import efficientnet_lite
    from stages.modeling import save_model

    model_dir = exported_tiny_vit
    if kind != "vit":
        model_dir = tmp_path / "lite"
        save_model(efficientnet_lite.from_imagenet(kind, {0: "cat", 1: "dog", 2: "ship"}), efficientnet_lite.image_processor(kind), model_dir, (32, 32))
    image = next((small_tree / "test/ship").glob("*.jpg"))
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    with mlflow.start_run():
        track.log_model(model_dir, "classifier", image.read_bytes())
    registered = mlflow.pyfunc.load_model("models:/classifier@candidate")
    [expected] = pipeline("image-classification", model=str(model_dir))(str(image), top_k=1)
    for given in (str(image), base64.b64encode(image.read_bytes()).decode()):  # a path, and what the input example holds
        [top] = registered.predict([given]).to_dict("records")
        assert top["label"] == expected["label"] and top["score"] == pytest.approx(expected["score"], abs=1e-4)


def _log_in_a_fresh_process(start, uri: str) -> None:
    """What track does first, once every process is ready: they open the store at once."""
    start.wait()
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(experiment_id=tracking.experiment_id("cifar10-transfer", tracking.artifact_location())):
        mlflow.log_metric("data.classes", 3)


def test_processes_creating_one_fresh_sqlite_store_at_once_all_log(tmp_path, monkeypatch):
    import multiprocessing

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    fork = multiprocessing.get_context("fork")  # MLflow is imported already: the processes start together
    start = fork.Barrier(3)
    workers = [fork.Process(target=_log_in_a_fresh_process, args=(start, uri)) for _ in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
    assert [worker.exitcode for worker in workers] == [0, 0, 0]
    mlflow.set_tracking_uri(uri)
    runs = the_runs()
    assert len(runs) == 3 and all(run.data.metrics["data.classes"] == 3 for run in runs)


def _log_the_same_split_at_once(start, uri: str, experiment: str) -> None:
    """What two executions of one data version do at the same moment: log the same processed split."""
    import numpy as np

    mlflow.set_tracking_uri(uri)
    params = load_params(ROOT / "params.yaml")
    with mlflow.start_run(experiment_id=experiment):
        start.wait()
        track.log_datasets(params, "0fe908732b2e338566f73c4c0f76d31f.dir", {"train": (np.array([0, 1, 1]), ["cat", "dog"])})


def test_executions_logging_the_same_dataset_at_once_all_log_it(tmp_path):
    import multiprocessing

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.create_experiment("cifar10-transfer")
    fork = multiprocessing.get_context("fork")
    start = fork.Barrier(6)
    workers = [fork.Process(target=_log_the_same_split_at_once, args=(start, uri, experiment)) for _ in range(6)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
    assert [worker.exitcode for worker in workers] == [0] * 6
    runs = the_runs()
    assert len(runs) == 6 and all([put.dataset.name for put in run.inputs.dataset_inputs] == ["processed-train"] for run in runs)
